"""The one CLIP trainer: global identity-aware contrastive learning, plus (optionally) the ROGLE local
branch — reliability-weighted region–sentence alignment on mined pairs.

Consumes a CLIPModel + processor and `ClipData` (train, and optionally test for evaluation); produces a
run folder: `config.json` (resolved), `checkpoint/` (model in from_pretrained layout + `trainer_state.pt`
with optimizer, scheduler, step, epoch and RNG states: resuming continues exactly), `history.jsonl`,
`metrics.json`, `curves.png`. The tiny-CLIP bootstrap (global only) and `train_rogle` both call `fit`.
"""

from __future__ import annotations

import csv
import json
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from miners.encoders import (
    box_patch_weights,
    image_and_region_embeddings,
    normalisation,
    pad_token_ids,
    patch_grid_hw,
    pick_device,
    text_embeddings,
    to_pixel_values,
)
from miners.training.data import ClipData
from miners.training.evaluation import caption_embeddings, evaluate_global, evaluate_local

# TrainConfig fields that change no weight (where the run goes, how often it evaluates and logs): a model's
# identity (the bootstrap's reuse check) and a resume's refusal leave them out, so a release adding one of
# them neither retrains a finished model nor refuses a resume
RUN_ONLY_FIELDS = ("device", "eval_every_epochs", "log_every_steps")


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that decide the weights."""
    return {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS}


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM stopped `fit` at a step boundary, after saving a checkpoint that `resume` continues
    exactly (mid-epoch included). `where` says it for people: "at epoch 2, step 9" or "after epoch 1"."""

    def __init__(self, checkpoint: Path, signum: int, where: str):
        self.checkpoint, self.signum = checkpoint, signum
        super().__init__(f"{signal.Signals(signum).name} {where}: checkpoint saved in {checkpoint}")


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3  # from scratch; use ~1e-5 when fine-tuning a real CLIP
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    text_mode: str = "sentence-pool"  # or "truncate": how long captions become one global embedding
    local_weight: float = 0.0  # 0 = global only (the bootstrap); ROGLE uses > 0
    local_temperature: float = 0.05
    use_reliability: bool = True
    reliability_threshold: float = 0.5
    seed: int = 0
    eval_every_epochs: int = 1
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA only
    max_grad_norm: float = 5.0
    log_every_steps: int = 50  # one plain line + a steps.csv row every N optimizer steps (0: off)


def identity_aware_loss(text_emb, image_emb, pids, logit_scale) -> torch.Tensor:
    """Identity-aware InfoNCE: cross-entropy of the batch softmax against the normalised same-person
    label distribution, text→image and image→text. Several images of one person are positives, unlike
    plain InfoNCE which treats them as negatives. (IRRA's SDM is the reverse KL, KL(p‖q); measured here
    from scratch it stayed on its plateau for hundreds of steps, while this form reached 25% R1 in 240.)"""
    sim = logit_scale * text_emb @ image_emb.T
    labels = (pids[:, None] == pids[None, :]).float()
    t2i = -(labels / labels.sum(1, keepdim=True) * F.log_softmax(sim, 1)).sum(1).mean()
    i2t = -(labels / labels.sum(1, keepdim=True) * F.log_softmax(sim.T, 1)).sum(1).mean()
    return (t2i + i2t) / 2


def local_alignment_loss(sent_emb, region_emb, region_keys, weights, temperature) -> torch.Tensor:
    """Sentence→region contrastive over all regions in the batch; pairs pointing at the same region
    (same image and region id) are all positives. Each pair's loss is weighted (reliability)."""
    logits = sent_emb @ region_emb.T / temperature
    positive = region_keys[:, None] == region_keys[None, :]
    log_prob = F.log_softmax(logits, 1)
    pos_log_prob = torch.logsumexp(log_prob.masked_fill(~positive, -1e4), 1)
    return -(weights * pos_log_prob).sum() / weights.sum().clamp_min(1e-6)


class Objective(Protocol):
    """What a training run optimises, on what data; the Trainer owns the loop, the optimizer, AMP and
    exact resume. The default (`None`) is the caption objective: global identity-aware alignment plus,
    with `local_weight`, the ROGLE local branch. miners.training.refine adds region-crop ↔ sentence."""

    def batches(self, data: Any, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]: ...

    def loss(self, trainer: Trainer, data: Any, idx: np.ndarray) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, trainer: Trainer, test: Any) -> dict: ...


class Trainer:
    def __init__(
        self, model, processor, cfg: TrainConfig, run_dir: str | Path, objective: Objective | None = None
    ):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.objective = objective
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        self.run_dir = Path(run_dir)
        self.device = pick_device(cfg.device)
        self.model.to(self.device)
        self.mean, self.std = normalisation(processor)
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = None
        self.step = 0
        self.epoch = 0
        # Where in the current epoch a checkpoint taken mid-epoch (a preemption) stands: batches done and the
        # running sums of their logs, so the resumed epoch's record equals an uninterrupted one's
        self.batch_in_epoch = 0
        self.epoch_sums: dict[str, float] = {}
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM during fit: stop at the next step
        self._saving = False  # a second SIGINT waits while a checkpoint is being swapped in
        self._steps_per_epoch: int | None = None

    # --- checkpointing -------------------------------------------------------------------------
    def _make_scheduler(self, total_steps: int):
        warmup = max(1, int(total_steps * self.cfg.warmup_fraction))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def save_checkpoint(self) -> Path:
        self._saving = True
        try:
            return self._save_checkpoint()
        finally:
            self._saving = False

    def _save_checkpoint(self) -> Path:
        ckpt = self.run_dir / "checkpoint"
        tmp = self.run_dir / ".checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        self.processor.save_pretrained(tmp)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": dict(self.epoch_sums),
            "steps_per_epoch": self._steps_per_epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": asdict(self.cfg),
        }
        torch.save(state, tmp / "trainer_state.pt")
        # Swap in the new checkpoint whole, so a crash mid-save leaves the previous one intact.
        old = self.run_dir / ".checkpoint.old"
        if ckpt.exists():
            ckpt.rename(old)
        tmp.rename(ckpt)
        if old.exists():
            shutil.rmtree(old)
        return ckpt

    def load_state(self, ckpt: Path, total_steps: int) -> None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        saved_steps = state.get("steps_per_epoch")
        if saved_steps is not None and saved_steps != self._steps_per_epoch:
            # Another number of batches per epoch (other pairs or manifest, images now unreadable): the
            # schedule and the position in the epoch would not continue the run, they would restart another
            raise ValueError(
                f"the training data changed since the checkpoint: {saved_steps} steps per epoch then, "
                f"{self._steps_per_epoch} now (other --pairs / --manifest, or unreadable images)"
            )
        # The scheduler's constructor rewrites the groups' lr, so build it before restoring the optimizer.
        self.scheduler = self._make_scheduler(total_steps)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)  # checkpoints before mid-epoch saves: 0
        self.epoch_sums = dict(state.get("epoch_sums", {}))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    # --- one step --------------------------------------------------------------------------------
    def _batch_loss(self, data: ClipData, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.device
        img_rows = data.cap_image_index[idx]
        pix = to_pixel_values(data.images_u8[img_rows].to(dev), self.mean, self.std)
        pairs = (
            [(k, p) for k, i in enumerate(idx) for p in data.local_pairs[i]] if cfg.local_weight > 0 else []
        )
        size_hw = tuple(data.images_u8.shape[2:])
        if pairs:
            boxes = np.stack([p.box_xyxy for _, p in pairs])
            weights = box_patch_weights(boxes, patch_grid_hw(self.model, size_hw), size_hw)
            region_index = torch.tensor([k for k, _ in pairs], device=dev)
            image_emb, region_emb = image_and_region_embeddings(
                self.model, pix, region_index, torch.from_numpy(weights).to(dev)
            )
        else:
            image_emb, _ = image_and_region_embeddings(
                self.model, pix, torch.zeros(0, dtype=torch.long, device=dev), torch.zeros((0, 1), device=dev)
            )
        text_emb = caption_embeddings(self.model, data, idx, cfg.text_mode, self.pad_id, dev)
        scale = self.model.logit_scale.exp().clamp(max=100.0)
        pids = torch.from_numpy(data.cap_pids[idx]).to(dev)
        loss_global = identity_aware_loss(text_emb, image_emb, pids, scale)
        logs = {"loss_global": float(loss_global.detach())}
        loss = loss_global
        if pairs:
            ids, mask = pad_token_ids([p.token_ids for _, p in pairs], self.pad_id, dev)
            sent_emb = text_embeddings(self.model, ids, mask)
            # Region identity = (image row, region id): two captions of one image share its regions.
            key_ids: dict[tuple[int, int], int] = {}
            keys = torch.tensor(
                [key_ids.setdefault((int(img_rows[k]), p.region_id), len(key_ids)) for k, p in pairs],
                device=dev,
            )
            w = torch.tensor([p.weight for _, p in pairs], device=dev, dtype=sent_emb.dtype)
            loss_local = local_alignment_loss(sent_emb, region_emb, keys, w, cfg.local_temperature)
            loss = loss + cfg.local_weight * loss_local
            logs["loss_local"] = float(loss_local.detach())
            logs["local_pairs"] = len(pairs)
        logs["loss"] = float(loss.detach())
        return loss, logs

    # --- the loop ---------------------------------------------------------------------------------
    def fit(
        self,
        train: ClipData,
        test: ClipData | None = None,
        resume: bool = False,
        stop_after: int | None = None,
        stop_on_signals: bool = False,
    ) -> dict:
        """Train to cfg.epochs (or only `stop_after` more epochs: a time-boxed slice of a longer run,
        which `resume=True` later continues exactly); returns the last evaluation's metrics."""
        cfg = self.cfg
        if len(train) == 0:
            raise ValueError("no training captions (check the manifest's train split and image errors)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
        steps_per_epoch = len(self._epoch_batches(train, 0))
        self._steps_per_epoch = steps_per_epoch
        self.stop_signal = None
        total_steps = steps_per_epoch * cfg.epochs
        ckpt = self.run_dir / "checkpoint"
        history_path = self.run_dir / "history.jsonl"
        if resume and (ckpt / "trainer_state.pt").exists():
            self.load_state(ckpt, total_steps)
            # A process killed after its last checkpoint (SIGKILL, OOM) logged past it: those records go,
            # the resumed run writes them again
            _keep_records(history_path, lambda r: r.get("epoch", 0) <= self.epoch, jsonl=True)
            _keep_records(self.run_dir / STEPS_CSV, lambda r: int(r["step"]) <= self.step, jsonl=False)
        else:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            random.seed(cfg.seed)
            self.scheduler = self._make_scheduler(total_steps)
            history_path.write_text("")
            (self.run_dir / STEPS_CSV).unlink(missing_ok=True)
        self._step_log = StepLog(self.run_dir / STEPS_CSV, cfg.log_every_steps, self.device)
        use_amp = cfg.amp and self.device.type == "cuda"
        metrics: dict = {}
        last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, self.epoch + stop_after)
        with self._stop_on_signals() if stop_on_signals else nullcontext():
            metrics = self._train_epochs(train, test, last_epoch, steps_per_epoch, history_path, use_amp)
        if test is not None and not metrics:
            metrics = self.evaluate(test)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        plot_curves(history_path, self.run_dir / "curves.png")
        return metrics

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM (a preemption) during fit set `stop_signal`; the loop then saves a checkpoint at
        the next step boundary and raises TrainingInterrupted. A second SIGINT stops at once (no save).
        Handlers exist only in the main thread (Python's rule); elsewhere signals keep their default."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.stop_signal == signal.SIGINT and signum == signal.SIGINT and not self._saving:
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_epochs(
        self, train, test, last_epoch: int, steps_per_epoch: int, history_path: Path, use_amp
    ) -> dict:
        cfg = self.cfg
        metrics: dict = {}
        while self.epoch < last_epoch:
            self.model.train()
            batches = self._epoch_batches(train, self.epoch)
            t0 = time.perf_counter()
            # A bar on a terminal only (disable=None); every epoch also ends with one plain line below.
            todo = batches[self.batch_in_epoch :]  # a checkpoint taken mid-epoch continues where it stopped
            bar = tqdm(todo, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, disable=None)
            sums = self.epoch_sums
            for idx in bar:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    loss, logs = (
                        self.objective.loss(self, train, idx)
                        if self.objective
                        else self._batch_loss(train, idx)
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.batch_in_epoch += 1
                self._step_log.after_step(self, logs, len(idx), float(grad_norm))
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if self.stop_signal is not None:
                    bar.close()
                    where = f"at epoch {self.epoch + 1}, step {self.step}"
                    raise TrainingInterrupted(self.save_checkpoint(), self.stop_signal, where)
            self.epoch += 1
            self.batch_in_epoch, self.epoch_sums = 0, {}
            record = {k: v / steps_per_epoch for k, v in sums.items()}
            record.update(epoch=self.epoch, step=self.step, epoch_seconds=time.perf_counter() - t0)
            if test is not None and (self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs):
                metrics = self.evaluate(test)
                record["eval"] = metrics
            with history_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(epoch_line(record, cfg.epochs), flush=True)
            self.save_checkpoint()
            if self.stop_signal is not None and self.epoch < last_epoch:  # came during evaluation or save
                where = f"after epoch {self.epoch}, step {self.step}"
                raise TrainingInterrupted(self.run_dir / "checkpoint", self.stop_signal, where)
        return metrics

    def _epoch_batches(self, train, epoch: int) -> list[np.ndarray]:
        """The epoch's batches; they depend only on (seed, epoch), so a resumed run sees the same ones."""
        cfg = self.cfg
        if self.objective is not None:
            return self.objective.batches(train, cfg.batch_size, cfg.seed, epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        steps = max(1, len(train) // cfg.batch_size)
        return [order[b * cfg.batch_size : (b + 1) * cfg.batch_size] for b in range(steps)]

    def evaluate(self, test) -> dict:
        if self.objective is not None:
            return self.objective.evaluate(self, test)
        out = evaluate_global(self.model, test, self.processor, self.cfg.text_mode)
        out.update(evaluate_local(self.model, test, self.processor))
        return out


def _keep_records(path: Path, keep, jsonl: bool) -> None:
    """Rewrite a JSON-lines or CSV log keeping the records `keep(record)` accepts (no file: nothing)."""
    if not path.is_file():
        return
    if jsonl:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        path.write_text("".join(ln + "\n" for ln in lines if keep(json.loads(ln))))
        return
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(r for r in rows if keep(r))


STEPS_CSV = "steps.csv"
STEP_FIELDS = ["step", "epoch", "loss", "loss_global", "loss_local", "lr", "logit_scale", "grad_norm",
               "samples_per_s", "peak_mem_mb"]  # fmt: skip


class StepLog:
    """Every `every` optimizer steps: one plain line (batch jobs see progress without a terminal) and the
    same figures as a row of RUN_DIR/steps.csv (appended across resumes). Losses are the step's own, lr the
    first parameter group's, samples/s since the previous line, peak memory the CUDA allocator's peak on a
    GPU and the process's peak RSS on a CPU, in MiB."""

    def __init__(self, path: Path, every: int, device: torch.device):
        self.path, self.every, self.device = path, max(0, every), device
        self.samples, self.t_last = 0, time.perf_counter()

    def after_step(self, trainer: Trainer, logs: dict, batch_size: int, grad_norm: float) -> None:
        self.samples += batch_size
        if not self.every or trainer.step % self.every:
            return
        now = time.perf_counter()
        row = {k: logs.get(k) for k in ("loss", "loss_global", "loss_local")}
        row |= {
            "step": trainer.step,
            "epoch": trainer.epoch + 1,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "logit_scale": float(trainer.model.logit_scale.detach().exp())
            if hasattr(trainer.model, "logit_scale")
            else None,
            "grad_norm": grad_norm,
            "samples_per_s": self.samples / max(1e-9, now - self.t_last),
            "peak_mem_mb": self.peak_mem_mb(),
        }
        self.samples, self.t_last = 0, now
        print(
            f"step {row['step']} (epoch {row['epoch']}): "
            + "  ".join(f"{k} {row[k]:.4g}" for k in STEP_FIELDS[2:] if row.get(k) is not None),
            flush=True,
        )
        new = not self.path.is_file()
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=STEP_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in STEP_FIELDS})

    def peak_mem_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def epoch_line(record: dict, epochs: int) -> str:
    """One plain log line per epoch: the losses, the time, and the evaluation's headline figures."""
    losses = "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("loss"))
    line = f"epoch {record['epoch']}/{epochs}: {losses}  ({record['epoch_seconds']:.0f}s)"
    figures = {k: v for k, v in record.get("eval", {}).items() if isinstance(v, float)}
    if figures:
        line += "  " + "  ".join(f"{k} {v:.3g}" for k, v in list(figures.items())[:6])
    return line


def plot_curves(history_path: Path, out_png: Path) -> None:
    """Loss and retrieval curves per epoch, as a PNG people can glance at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "loss_global", "loss_local"):
        if key in rows[0]:
            axes[0].plot(epochs, [r.get(key) for r in rows], marker="o", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training loss")
    axes[0].legend()
    # Retrieval figures where the objective reports them (refine_clip reports its own keys instead).
    evals = [(r["epoch"], r["eval"]) for r in rows if "R1" in r.get("eval", {})]
    for key in ("R1", "mAP"):
        axes[1].plot([e for e, _ in evals], [m[key] for _, m in evals], marker="o", label=f"{key} (all)")
    long_r1 = [(e, m["long_query"]["R1"]) for e, m in evals if m.get("long_query", {}).get("R1") is not None]
    if long_r1:
        axes[1].plot([e for e, _ in long_r1], [v for _, v in long_r1], marker="s", label="R1 (long queries)")
    local = [(e, m.get("local_grounding_acc")) for e, m in evals if m.get("local_grounding_acc") is not None]
    if local:
        axes[1].plot([e for e, _ in local], [v for _, v in local], marker="^", label="local grounding acc")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("%")
    axes[1].set_title("test split")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
