"""Real-size training evidence on CPU: one step of a random-init ViT-B/16 in OpenAI's `.pt` layout, with
IRRA's recipe, through the `train_rogle` command.

The checkpoint is a float16 state dict of OpenAI's ViT-B/16 shapes (vision width 768, 12 layers, patch 16
at 224 x 224; text width 512, 12 layers, 8 heads, 77 tokens, 49,408-token vocabulary; embeddings of 512),
random, saved as `ViT-B-16.pt` beside a generated `bpe_simple_vocab_16e6.txt.gz` of OpenAI's layout
(48,894 merges). `--init ViT-B-16.pt` converts it once (miners.convert_clip, into a test-own cache) and the
trainer runs it at 384 x 128 (interpolated position embeddings). The manifest keeps 8 train captions (two
identities) and the tiny dataset's test split, so that `--batch-size 8` is exactly one training step.

Marked `realsize` (deselected by `make test`; `pytest -m realsize -s tests/miners/training/test_real_size_train.py`).
The command's wall time is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.miners.test_convert_clip import openai_state_dict, write_bpe_gz

pytestmark = [pytest.mark.realsize, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[3]
VIT_B16 = dict(vision_width=768, vision_layers=12, patch=16, resolution=224, text_width=512, text_layers=12)
VIT_B16 |= dict(context=77, embed_dim=512, merges=49408 - 2 * 256 - 2)
TRAIN_CAPTIONS = 8


def test_one_irra_b16_step_of_a_real_size_openai_checkpoint_through_train_rogle(tiny_dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from miners.clip_scorer import load_clip
    from storage.manifest import read_manifest

    # 8 train captions, 4 of each of the first two identities, and the whole test split
    table, _ = read_manifest(tiny_dataset / "manifest.parquet")
    train = table.filter(pc.equal(table["split"], "train")).sort_by("sample_id")
    ids = sorted(set(train["person_id"].to_pylist()))[:2]
    parts = [train.filter(pc.equal(train["person_id"], pid)).slice(0, TRAIN_CAPTIONS // 2) for pid in ids]
    parts.append(table.filter(pc.equal(table["split"], "test")))
    manifest = tmp_path / "manifest-8.parquet"
    pq.write_table(pa.concat_tables(parts).replace_schema_metadata(table.schema.metadata), manifest)
    test_rows = parts[-1].num_rows
    assert read_manifest(manifest)[0].num_rows == TRAIN_CAPTIONS + test_rows

    ckpt = tmp_path / "openai"
    ckpt.mkdir()
    sd = {k: v.half() for k, v in openai_state_dict(**VIT_B16).items()}  # OpenAI ships float16
    torch.save(sd, ckpt / "ViT-B-16.pt")
    del sd
    write_bpe_gz(ckpt / "bpe_simple_vocab_16e6.txt.gz", table["caption"].to_pylist(), VIT_B16["merges"])

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "miners.train_rogle", "--manifest", str(manifest)]
    argv += [
        "--init",
        str(ckpt / "ViT-B-16.pt"),
        "--preset",
        "irra-b16",
        "--method",
        "irra",
        "--epochs",
        "1",
        "--batch-size",
        "8",
    ]
    argv += ["--out", str(run)]
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "RSM_CONVERTED_CACHE": str(tmp_path / "converted"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700)
    wall_s = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"train_rogle failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert "converted once into" in proc.stdout

    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 1e-5 and config["epochs"] == 1 and config["batch_size"] == 8
    assert config["global_loss"] == "sdm"  # IRRA's recipe, not the tiny preset's
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    assert len(history) == 1
    model, processor = load_clip(run / "checkpoint", "cpu")
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.patch_size, vision.image_size) == (16, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (512, 12, 8)
    assert (text.vocab_size, text.max_position_embeddings, model.config.projection_dim) == (49408, 77, 512)
    assert dict(processor.image_processor.size) == {"height": 384, "width": 128}
    assert sum(p.numel() for p in model.parameters()) > 149_000_000  # ViT-B/16 CLIP: ~150 M
    assert all(torch.isfinite(p).all() for p in model.parameters())
    figures = {
        "train_captions": TRAIN_CAPTIONS,
        "steps": 1,
        "wall_s": round(wall_s, 1),
        "cpus": os.cpu_count(),
    }
    shown = [ln for ln in proc.stdout.splitlines() if ln.startswith(("convert_clip:", "epoch "))]
    print("\n" + "\n".join(shown))
    print(
        f"real-size train_rogle --method irra --preset irra-b16 (random ViT-B/16 .pt, 384 x 128, CPU): {json.dumps(figures)}"
    )
