"""Known-noise injection: the requested fraction of units replaced by another person's, spans intact."""

import pyarrow.compute as pc
import pytest

from miners.caption_noise import shuffle_caption_units
from miners.captions import CaptionSplitter
from storage.manifest import read_manifest


def test_shuffle_caption_units(tiny_dataset):
    table, _ = read_manifest(tiny_dataset / "manifest.parquet")
    noisy, injected = shuffle_caption_units(table, 0.3, seed=5)
    splitter = CaptionSplitter()
    train = table.filter(pc.equal(table["split"], "train"))
    n_units = sum(len(u) for u in splitter.split_many(train["caption"].to_pylist()))
    assert abs(len(injected) - 0.3 * n_units) <= 2
    before = dict(zip(table["sample_id"].to_pylist(), table.to_pylist(), strict=True))
    after = dict(zip(noisy["sample_id"].to_pylist(), noisy.to_pylist(), strict=True))
    changed = {i["sample_id"] for i in injected}
    pid_of_text = {}
    for row in before.values():
        for u in splitter.split(row["caption"]):
            pid_of_text.setdefault(u.text, set()).add(row["person_id"])
    for sid, row in after.items():
        if sid in changed:
            assert row["caption"] != before[sid]["caption"] and row["gt_links"] is None
        else:
            assert row == before[sid]  # test split and untouched captions unchanged
    for inj in injected:
        assert inj["replacement"] in after[inj["sample_id"]]["caption"]
        # the donor is another person's unit
        assert pid_of_text[inj["replacement"]] - {before[inj["sample_id"]]["person_id"]}
    again, injected_again = shuffle_caption_units(table, 0.3, seed=5)
    assert again.equals(noisy) and injected_again == injected
    with pytest.raises(ValueError, match="fraction"):
        shuffle_caption_units(table, 1.5, seed=0)
