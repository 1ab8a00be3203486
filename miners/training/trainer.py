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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from miners.encoders import normalisation, pad_token_ids, pick_device, text_embeddings
from miners.training.augment import IMAGE_AUGMENTS, TextAugment
from miners.training.config import TrainConfig
from miners.training.data import ClipData
from miners.training.distributed import DistInfo, any_process, barrier, gather_rows
from miners.training.evaluation import evaluate_global, evaluate_local
from miners.training.heads import FAST_LR_NAME_PARTS, mask_token_id
from miners.training.methods import build_method
from miners.training.methods.base import Batch


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM stopped `fit` at a step boundary, after saving a checkpoint that `resume` continues
    exactly (mid-epoch included). `where` says it for people: "at epoch 2, step 9" or "after epoch 1"."""

    def __init__(self, checkpoint: Path, signum: int, where: str):
        self.checkpoint, self.signum = checkpoint, signum
        super().__init__(f"{signal.Signals(signum).name} {where}: checkpoint saved in {checkpoint}")


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


# Parameter names without weight decay beyond biases and 1-D tensors (norms, the logit scale, CLIP's class
# embedding): the token and position embeddings (IRRA and TBPS-CLIP decay them; the project's choice
# follows the rule and common practice for transformers)
NO_DECAY_NAMES = ("token_embedding", "position_embedding", "class_embedding")


def parameter_groups(model: torch.nn.Module, heads: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's groups: no weight decay on biases, norms, embeddings and the logit scale; biases at
    lr x bias_lr_factor; the training-only heads' new layers (names with cross, classifier, mlm_head) at
    lr x head_lr_factor. A head's bias takes the bias
    factor, as in IRRA (its bias rule is applied after its new-module rule). Each group keeps its factor
    in "lr_factor" (the logs report the base lr); the order is the parameters' order, so a resumed run
    rebuilds the same groups."""
    grouped: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for module, is_head in ((model, False), (heads, True)):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            # IRRA's rule: the new modules' names hold cross / classifier / mlm_head; the fusion's input
            # and output norms (ln_pre_t, ln_pre_i, ln_post) keep the base lr
            fast = is_head and any(part in name for part in FAST_LR_NAME_PARTS)
            factor = cfg.head_lr_factor if fast else 1.0
            is_bias = name.endswith("bias")
            no_decay = cfg.weight_decay_exempt and (
                is_bias or param.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)
            )
            key = (cfg.bias_lr_factor if is_bias else factor, 0.0 if no_decay else cfg.weight_decay)
            grouped.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": cfg.lr * factor, "weight_decay": decay, "lr_factor": factor}
        for (factor, decay), params in grouped.items()
    ]


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The lr multiplier after `step` optimizer steps: a linear warm-up from warmup_start_factor, then a
    cosine to 0. Per step (the project's default: warm-up over warmup_fraction of all steps, the first step
    at 1/warmup) or, with schedule_per="epoch", constant within an epoch (IRRA: epoch e < warmup trains at
    start + (1 - start) e / warmup)."""
    start = cfg.warmup_start_factor
    if cfg.schedule_per == "epoch":
        unit, total = step // max(1, steps_per_epoch), max(1, cfg.epochs)
        warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else cfg.warmup_fraction * total
        warmup = max(1, round(warmup))
        if unit < warmup:
            return start + (1 - start) * unit / warmup
    else:
        unit, total = step, total_steps
        warmup = (
            cfg.warmup_epochs * steps_per_epoch
            if cfg.warmup_epochs is not None
            else total_steps * cfg.warmup_fraction
        )
        warmup = max(1, int(warmup))
        if unit < warmup:
            return start + (1 - start) * (unit + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (unit - warmup) / max(1, total - warmup))))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): augmentations and token masks of a resumed run
    are those of an uninterrupted one, whatever the global RNG did in between."""
    state = np.random.SeedSequence([seed, step, 0x5EED]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Trainer:
    def __init__(
        self,
        model,
        processor,
        cfg: TrainConfig,
        run_dir: str | Path,
        objective: Objective | None = None,
        dist: DistInfo | None = None,
    ):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.objective = objective
        # Several processes (torchrun): each computes its share of every global batch, losses see the whole
        # batch through `gather`, DistributedDataParallel averages the gradients; only rank 0 writes the run
        # folder, logs and evaluates (miners.training.distributed)
        self.dist = dist
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self.is_main = self.rank == 0
        if self.world_size > 1 and objective is not None:
            raise ValueError("several processes train the caption methods only (not refine objectives)")
        if cfg.batch_size % self.world_size:
            raise ValueError(
                f"batch size {cfg.batch_size} does not split over {self.world_size} processes: the global "
                f"batch must be a multiple of the number of processes"
            )
        self._ddp = None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        self.run_dir = Path(run_dir)
        self.device = pick_device(cfg.device)
        self.model.to(self.device)
        self.mean, self.std = normalisation(processor)
        self.pad_id = processor.tokenizer.pad_token_id or 0
        # Training-only modules (the ID classifier, IRRA's MLM fusion): built in `fit`, once the train
        # identities are known; saved as checkpoint/heads.pt beside the CLIP folder, never inside it
        self.heads = torch.nn.ModuleDict()
        self.pid_classes: list[int] = []  # class k of the ID classifier = person id pid_classes[k]
        self.class_of_pid: dict[int, int] = {}
        self.image_augment = IMAGE_AUGMENTS[cfg.augment]
        self.text_augment = TextAugment() if cfg.text_augment else None
        # the erased rectangle's fill: the normalisation mean, so it is 0 after normalising (IRRA: value=mean)
        self.fill_u8 = tuple(int(round(255 * float(m))) for m in self.mean.flatten())
        self.method = build_method(cfg.method, cfg.method_options) if objective is None else None
        self.local_on = objective is None and cfg.local == "rsm" and cfg.local_weight > 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.step = 0
        self.epoch = 0
        # Where in the current epoch a checkpoint taken mid-epoch (a preemption) stands: batches done and the
        # running sums of their logs, so the resumed epoch's record equals an uninterrupted one's
        self.batch_in_epoch = 0
        self.epoch_sums: dict[str, float] = {}
        self.best: dict | None = None  # the val split's best evaluated epoch so far: {"epoch", "R1", ...}
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM during fit: stop at the next step
        self._saving = False  # a second SIGINT waits while a checkpoint is being swapped in
        self._steps_per_epoch: int | None = None

    # --- heads and optimizer -------------------------------------------------------------------
    def _build_heads(self, train) -> None:
        """The identities' classes, the tokenizer's ids the text augmentations and MLM need, and the
        method's training-only heads."""
        self.pid_classes = sorted({int(p) for p in train.cap_pids})
        self.class_of_pid = {pid: k for k, pid in enumerate(self.pid_classes)}
        tok = self.processor.tokenizer
        self.mask_id = mask_token_id(tok)
        self.vocab_size = int(self.model.config.text_config.vocab_size)
        self.special_ids = {int(i) for i in tok.all_special_ids}
        self.heads = torch.nn.ModuleDict(self.method.build_heads(self, train))
        self.heads.to(self.device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `x` (one process: `x`); see methods.base.Batch.gather."""
        return gather_rows(x) if self.world_size > 1 else x

    def _wrap_ddp(self) -> None:
        """DistributedDataParallel around the step (CLIP + heads): it broadcasts rank 0's weights and
        averages every gradient across processes. Parameters a method leaves unused in a step (the logit
        scale under SDM, a head of another loss) are allowed."""
        if self.world_size == 1 or self.objective is not None or self._ddp is not None:
            return
        from torch.nn.parallel import DistributedDataParallel

        step = _StepModule(self)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)

    def _build_optimizer(self) -> None:
        groups = parameter_groups(self.model, self.heads, self.cfg)
        if self.cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=self.cfg.lr, eps=self.cfg.adam_eps)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, eps=self.cfg.adam_eps)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def base_lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_factor", 1.0)

    # --- checkpointing -------------------------------------------------------------------------
    def _make_scheduler(self, total_steps: int):
        spe = self._steps_per_epoch or 1
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(self.cfg, step, spe, total_steps)
        )

    def save_checkpoint(self) -> Path:
        """Rank 0 writes RUN_DIR/checkpoint (every process holds the same weights and optimizer state);
        the others wait until it is complete."""
        self._saving = True
        try:
            if self.is_main:
                self._save_checkpoint()
            barrier()
            return self.run_dir / "checkpoint"
        finally:
            self._saving = False

    def _stop_requested(self) -> bool:
        """A SIGINT/SIGTERM reached this process, or (several processes) any of them: all stop together at
        the same step, so that the checkpoint holds one consistent state."""
        if self.world_size == 1:
            return self.stop_signal is not None
        stop = any_process(self.stop_signal is not None, self.device)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another process's signal: stop as it does
        return stop

    def _save_checkpoint(self) -> Path:
        ckpt = self.run_dir / "checkpoint"
        tmp = self.run_dir / ".checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        self.processor.save_pretrained(tmp)
        if len(self.heads):
            torch.save({"heads": self.heads.state_dict(), "pid_classes": self.pid_classes}, tmp / HEADS_FILE)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": dict(self.epoch_sums),
            "steps_per_epoch": self._steps_per_epoch,
            "best": self.best,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": asdict(self.cfg),
        }
        torch.save(state, tmp / "trainer_state.pt")
        _swap_in(tmp, ckpt)
        return ckpt

    def _save_best(self) -> Path:
        """checkpoint-best/: the CLIP folder (and heads) of the best epoch on val, with best.json."""
        tmp = self.run_dir / ".checkpoint-best.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        self.processor.save_pretrained(tmp)
        if len(self.heads):
            torch.save({"heads": self.heads.state_dict(), "pid_classes": self.pid_classes}, tmp / HEADS_FILE)
        (tmp / "best.json").write_text(json.dumps(self.best, indent=2, sort_keys=True))
        _swap_in(tmp, self.run_dir / BEST_CHECKPOINT)
        return self.run_dir / BEST_CHECKPOINT

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
        if (ckpt / HEADS_FILE).is_file():
            heads = torch.load(ckpt / HEADS_FILE, weights_only=False, map_location="cpu")
            self.heads.load_state_dict(heads["heads"])
            self.pid_classes = list(heads["pid_classes"])
        # The scheduler's constructor rewrites the groups' lr, so build it before restoring the optimizer.
        self.scheduler = self._make_scheduler(total_steps)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)  # checkpoints before mid-epoch saves: 0
        self.epoch_sums = dict(state.get("epoch_sums", {}))
        self.best = state.get("best")
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    # --- one step --------------------------------------------------------------------------------
    def _batch_loss(self, data: ClipData, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        """The method's loss on the batch plus, with `local: rsm`, ROGLE's reliability-weighted
        region–sentence branch on the pairs the augmentation kept, from the same vision forward."""
        cfg, dev = self.cfg, self.device
        batch = Batch(self, data, idx, step_generator(cfg.seed, self.step))
        loss, logs = self.method.loss(batch)
        if self.local_on:
            region_emb = batch.vision(0).regions  # computes view 0, which drops the pairs cropped away
            # every process joins the gathers, even one whose share has no pair this step
            if batch.pairs or self.world_size > 1:
                if batch.pairs:
                    ids, mask = pad_token_ids([p.token_ids for _, p in batch.pairs], self.pad_id, dev)
                    sent_emb = text_embeddings(self.model, ids, mask)
                else:  # this process's share has no pair this step; the others' still count
                    sent_emb = region_emb.new_zeros((0, region_emb.shape[1]))
                # Region identity = (image row, region id): two captions of one image share its regions; the
                # image row indexes the whole training set, so keys from different processes never collide
                keys = torch.tensor(
                    [int(batch.img_rows[k]) * REGION_KEY_STRIDE + p.region_id for k, p in batch.pairs],
                    device=dev,
                    dtype=torch.long,
                )
                w = torch.tensor([p.weight for _, p in batch.pairs], device=dev, dtype=sent_emb.dtype)
                loss_local = local_alignment_loss(
                    batch.gather(sent_emb), batch.gather(region_emb), batch.gather(keys),
                    batch.gather(w), cfg.local_temperature,
                )  # fmt: skip
                loss = loss + cfg.local_weight * loss_local
                logs["loss_local"] = float(loss_local.detach())
                logs["local_pairs"] = len(batch.pairs)
        logs.update(batch.logs)
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
        val: ClipData | None = None,
    ) -> dict:
        """Train to cfg.epochs (or only `stop_after` more epochs: a time-boxed slice of a longer run,
        which `resume=True` later continues exactly); returns the reported test metrics: those of the best
        epoch on `val` when a val split is given (its weights in checkpoint-best/), else the last
        evaluation's. metrics.json's "selection" says which split chose which epoch."""
        cfg = self.cfg
        if len(train) == 0:
            raise ValueError("no training captions (check the manifest's train split and image errors)")
        main = self.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
        steps_per_epoch = len(self._epoch_batches(train, 0))
        self._steps_per_epoch = steps_per_epoch
        self.stop_signal = None
        total_steps = steps_per_epoch * cfg.epochs
        ckpt = self.run_dir / "checkpoint"
        history_path = self.run_dir / "history.jsonl"
        resuming = resume and (ckpt / "trainer_state.pt").exists()
        if not resuming:  # seeded before the heads are built: their initial weights belong to the run
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            random.seed(cfg.seed)
        if self.objective is None:
            self._build_heads(train)
        self._build_optimizer()
        if resuming:  # the heads' weights and the RNG states come from the checkpoint
            self.load_state(ckpt, total_steps)
            if main:
                # A process killed after its last checkpoint (SIGKILL, OOM) logged past it: those records go,
                # the resumed run writes them again
                _keep_records(history_path, lambda r: r.get("epoch", 0) <= self.epoch, jsonl=True)
                _keep_records(self.run_dir / STEPS_CSV, lambda r: int(r["step"]) <= self.step, jsonl=False)
        else:
            self.scheduler = self._make_scheduler(total_steps)
            self.best = None
            if main:
                history_path.write_text("")
                (self.run_dir / STEPS_CSV).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / BEST_CHECKPOINT, ignore_errors=True)
        self._wrap_ddp()
        barrier()  # every process starts once rank 0 has prepared the folder
        writer = tensorboard_writer(self.run_dir) if cfg.tensorboard and main else None
        self._step_log = StepLog(
            self.run_dir / STEPS_CSV, cfg.log_every_steps if main else 0, self.device, writer
        )
        use_amp = cfg.amp and self.device.type == "cuda"
        last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, self.epoch + stop_after)
        try:
            with self._stop_on_signals() if stop_on_signals else nullcontext():
                self._train_epochs(train, test, val, last_epoch, steps_per_epoch, history_path, use_amp)
        finally:
            if writer is not None:
                writer.close()
        metrics: dict = {}
        if main:
            metrics = self._reported_metrics(history_path, test, val)
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            plot_curves(history_path, self.run_dir / "curves.png")
        barrier()
        return metrics

    def _reported_metrics(self, history_path: Path, test, val) -> dict:
        """The test figures to report, and the "selection" that says where they come from."""
        if test is None:
            return {}
        records = [json.loads(ln) for ln in history_path.read_text().splitlines() if ln.strip()]
        evaluated = [r for r in records if "eval" in r]
        if val is not None and self.best is not None:
            chosen = next(r for r in evaluated if r["epoch"] == self.best["epoch"])
            metrics = dict(chosen["eval"])
            metrics["selection"] = {
                "checkpoint": BEST_CHECKPOINT,
                "chosen_on": "val",
                "epoch": self.best["epoch"],
                "metric": "R1",
                "val": {k: self.best[k] for k in ("R1", "mAP")},
                "reported_on": "test",
            }
            last = evaluated[-1]
            metrics["last_epoch"] = {"epoch": last["epoch"]} | {
                k: last["eval"][k] for k in ("R1", "R5", "R10", "mAP", "mINP")
            }
            return metrics
        # the latest epoch's evaluation, or one now (a time-boxed slice may end between evaluations)
        latest = records[-1] if records else None
        metrics = dict(latest["eval"]) if latest and "eval" in latest else self.evaluate(test)
        epoch = self.epoch
        metrics["selection"] = {
            "checkpoint": "checkpoint",
            "chosen_on": None,
            "epoch": epoch,
            "reported_on": "test",
            "why": "no val split in the manifest: the last epoch is reported",
        }
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
        self, train, test, val, last_epoch: int, steps_per_epoch: int, history_path: Path, use_amp
    ) -> None:
        cfg = self.cfg
        params = self.trainable_parameters()
        clip_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # inf: the norm, no clipping
        while self.epoch < last_epoch:
            self.model.train()
            self.heads.train()
            batches = self._epoch_batches(train, self.epoch)
            t0 = time.perf_counter()
            # A bar on a terminal only (disable=None); every epoch also ends with one plain line below.
            todo = batches[self.batch_in_epoch :]  # a checkpoint taken mid-epoch continues where it stopped
            bar = tqdm(todo, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, disable=None)
            sums = self.epoch_sums
            for idx in bar:
                logs, grad_norm = self.train_step(train, idx, params, clip_norm, use_amp)
                self.batch_in_epoch += 1
                self._step_log.after_step(self, logs, len(idx), grad_norm)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if self._stop_requested():
                    bar.close()
                    where = f"at epoch {self.epoch + 1}, step {self.step}"
                    raise TrainingInterrupted(self.save_checkpoint(), self.stop_signal, where)
            self.epoch += 1
            self.batch_in_epoch, self.epoch_sums = 0, {}
            record = {k: v / steps_per_epoch for k, v in sums.items()}
            record.update(epoch=self.epoch, step=self.step, epoch_seconds=time.perf_counter() - t0)
            new_best = False
            # Rank 0 evaluates, logs and saves; the other processes wait for it at the checkpoint's barrier
            if self.is_main and (self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs):
                if val is not None:
                    record["val"] = self.evaluate(val)
                    if self.best is None or record["val"]["R1"] > self.best["R1"]:
                        self.best = {
                            "epoch": self.epoch,
                            "R1": record["val"]["R1"],
                            "mAP": record["val"]["mAP"],
                        }
                        new_best = True
                if test is not None:
                    record["eval"] = self.evaluate(test)
            if self.is_main:
                with history_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                self._step_log.after_epoch(record)
                print(epoch_line(record, cfg.epochs), flush=True)
            if new_best:  # before the checkpoint: a crash between the two re-evaluates this epoch on resume
                self._save_best()
            self.save_checkpoint()
            if self._stop_requested() and self.epoch < last_epoch:  # came during evaluation or save
                where = f"after epoch {self.epoch}, step {self.step}"
                raise TrainingInterrupted(self.run_dir / "checkpoint", self.stop_signal, where)

    def train_step(
        self, train, idx: np.ndarray, params, clip_norm: float, use_amp: bool
    ) -> tuple[dict, float]:
        """One optimizer step on batch `idx` (forward under bf16 autocast on CUDA, backward, clipping, the
        optimizer and the schedule): (the step's logs, the gradient norm before clipping)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            if self._ddp is not None:  # through DDP's forward, so that its backward averages the gradients
                self._ddp.module.pending = (train, idx)
                loss = self._ddp()
                logs = self._ddp.module.logs
            elif self.objective:
                loss, logs = self.objective.loss(self, train, idx)
            else:
                loss, logs = self._batch_loss(train, idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return logs, float(grad_norm)

    def prepare(self, train, total_steps: int) -> None:
        """Heads, optimizer and schedule for a fresh run on `train` (what `fit` does before its loop when
        not resuming; bench/train_gpu.py times `train_step` after it)."""
        self._steps_per_epoch = len(self._epoch_batches(train, 0))
        if self.objective is None:
            self._build_heads(train)
        self._build_optimizer()
        self.scheduler = self._make_scheduler(total_steps)
        self._wrap_ddp()

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


class _StepModule(torch.nn.Module):
    """The CLIP and the heads as one module whose forward is the trainer's batch loss: what
    DistributedDataParallel wraps, so that its hooks see every parameter the step uses. The batch is handed
    over through `pending` (a forward argument would be copied to the device whole)."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = [trainer]  # a list: not a submodule
        self.model, self.heads = trainer.model, trainer.heads
        self.pending: tuple | None = None
        self.logs: dict = {}

    def forward(self) -> torch.Tensor:
        data, idx = self.pending
        loss, self.logs = self.trainer[0]._batch_loss(data, idx)
        return loss


# Region keys of the local branch: image row x stride + region id (region ids of one image stay far below)
REGION_KEY_STRIDE = 1 << 20

HEADS_FILE = "heads.pt"  # training-only modules beside a checkpoint's CLIP folder (the miner ignores it)
BEST_CHECKPOINT = "checkpoint-best"


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by the folder `tmp` whole, so a crash mid-save leaves the previous one intact."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter on RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # the package comes with the project; a trimmed install may lack it
        raise RuntimeError(
            f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


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
STEP_FIELDS = ["step", "epoch", "loss", "loss_global", "loss_local", "loss_id", "loss_mlm", "lr", "logit_scale",
               "grad_norm", "samples_per_s", "peak_mem_mb"]  # fmt: skip
LOSS_FIELDS = [f for f in STEP_FIELDS if f.startswith("loss")]


class StepLog:
    """Every `every` optimizer steps: one plain line (batch jobs see progress without a terminal) and the
    same figures as a row of RUN_DIR/steps.csv (appended across resumes) and, with a TensorBoard writer,
    as scalars under train/. Losses are the step's own, lr the base lr (a group's lr / its factor),
    samples/s since the previous line, peak memory the CUDA allocator's peak on a GPU and the process's
    peak RSS on a CPU, in MiB. `after_epoch` writes the epoch's evaluations to TensorBoard (val/, test/)."""

    def __init__(self, path: Path, every: int, device: torch.device, writer=None):
        self.path, self.every, self.device, self.writer = path, max(0, every), device, writer
        self.samples, self.t_last = 0, time.perf_counter()

    def after_step(self, trainer: Trainer, logs: dict, batch_size: int, grad_norm: float) -> None:
        self.samples += batch_size
        if not self.every or trainer.step % self.every:
            return
        now = time.perf_counter()
        row = {k: logs.get(k) for k in LOSS_FIELDS}
        row |= {
            "step": trainer.step,
            "epoch": trainer.epoch + 1,
            "lr": trainer.base_lr() if trainer.optimizer is not None else None,
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
        if self.writer is not None:
            for k in STEP_FIELDS[2:]:
                if row.get(k) is not None:
                    self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def after_epoch(self, record: dict) -> None:
        if self.writer is None:
            return
        for split, key in (("val", "val"), ("test", "eval")):
            for name, value in record.get(key, {}).items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"{split}/{name}", value, record["epoch"])
        self.writer.flush()

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
