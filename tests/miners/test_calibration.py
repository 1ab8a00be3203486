"""Calibrator fit, save/load, fingerprint guard and the default prior."""

import numpy as np
import pytest

from miners.calibration import Calibrator, default_calibrator, fit_calibrator
from miners.matching import UnitMatches
from miners.metrics import expected_calibration_error


def _matches(n, rng):
    agree = rng.random(n) < 0.6
    no_words = rng.random(n) < 0.2
    return UnitMatches(
        region_index=np.zeros(n, dtype=np.int64),
        clip_cosine=rng.normal(0.2, 0.1, n).astype(np.float32),
        softmax_prob=rng.random(n).astype(np.float32),
        margin=rng.random(n).astype(np.float32) * 0.3,
        mutual_best=rng.random(n) < 0.5,
        part_agreement=np.where(no_words, 0.5, np.where(agree, 1.0, 0.0)).astype(np.float32),
        has_part_words=~no_words,
        region_quality=np.full(n, 0.8, dtype=np.float32),
        region_label=[["head", "upper", "bag", None][k % 4] for k in range(n)],
    )


def _labels(m, rng):
    # Truth drawn from a known logistic model of the features.
    z = -1.0 + 3.0 * (m.part_agreement == 1.0) - 2.0 * (~m.has_part_words) + 4.0 * m.margin
    return rng.random(len(z)) < 1 / (1 + np.exp(-z))


def test_fitted_calibrator_is_calibrated_on_held_out_data(tmp_path):
    rng = np.random.default_rng(0)
    train, test = _matches(4000, rng), _matches(4000, rng)
    cal = fit_calibrator(train, _labels(train, rng))
    y_test = _labels(test, rng)
    p = cal.predict(test)
    ece, _ = expected_calibration_error(p, y_test)
    assert ece < 0.03
    # Far better than the uncalibrated default on the same data.
    ece_default, _ = expected_calibration_error(default_calibrator().predict(test), y_test)
    assert ece < ece_default

    cal.model_fingerprint = "abc"
    path = cal.save(tmp_path)
    again = Calibrator.load(path, expect_fingerprint="abc")
    np.testing.assert_allclose(again.predict(test), p, rtol=1e-6)
    with pytest.raises(ValueError, match="refit"):
        Calibrator.load(path, expect_fingerprint="other")


def test_fit_needs_both_classes_and_default_is_flagged():
    rng = np.random.default_rng(1)
    m = _matches(50, rng)
    with pytest.raises(ValueError, match="both correct and incorrect"):
        fit_calibrator(m, np.ones(50, dtype=bool))
    d = default_calibrator("clip")
    assert d.calibrated is False and d.features == ("clip_cosine", "softmax_prob", "margin", "mutual_best")
    p = d.predict(m)
    assert ((p >= 0) & (p <= 1)).all()


def test_the_fit_learns_from_known_wrong_text_units(tiny_dataset, tiny_clip_dir):
    """fit_calibrator's text noise: units made wrong (another person's same-part unit, or a colour /
    garment word the person does not wear) are re-mined in their captions and fitted as incorrect."""
    import pyarrow.compute as pc

    from miners.rsm import RSMConfig, RSMMiner
    from miners.training.fit_calibrator import fit_on_manifest, noisy_pairs
    from storage.manifest import read_manifest

    cfg = RSMConfig(clip_model=str(tiny_clip_dir))
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    miner = RSMMiner(cfg, calibrator=default_calibrator())
    clean = miner.mine(table, meta["root"]).pairs
    wrong, made = noisy_pairs(miner, table, meta["root"], clean, 0.3, ("same-part", "attribute"), seed=0)
    assert made["same-part"] > 5 and made["attribute"] > 5
    assert wrong.num_rows == made["same-part"] + made["attribute"]
    ids = wrong["sample_id"].to_pylist()
    assert all(s.endswith(("-same-part", "-attribute")) for s in ids) and len(set(ids)) == len(ids)
    own_units: dict[str, set[str]] = {}
    for sid, sentence in zip(clean["sample_id"].to_pylist(), clean["sentence"].to_pylist(), strict=True):
        own_units.setdefault(sid, set()).add(sentence)
    for sid, sentence in zip(ids, wrong["sentence"].to_pylist(), strict=True):
        assert sentence not in own_units[sid.split("#inject")[0]]  # a unit its caption did not have
    calibrator, report = fit_on_manifest(tiny_dataset / "manifest.parquet", cfg, None, None, text_noise=0.3)
    info = calibrator.fit_info
    assert info["n_pairs"] == clean.filter(pc.is_valid(clean["sample_id"])).num_rows + wrong.num_rows
    assert info["text_noise"]["made"] == made and info["text_noise"]["fraction"] == 0.3
    _, plain = fit_on_manifest(tiny_dataset / "manifest.parquet", cfg, None, None, text_noise=0.0)
    assert report["pairs"] == plain["pairs"]  # the report judges the clean pairs only


def test_sample_weights_act_like_repeated_pairs():
    """An integer weight k on a pair fits the same calibrator as the pair written k times (1/π weights of an
    audit sample rest on this)."""
    import dataclasses

    rng = np.random.default_rng(4)
    m = _matches(600, rng)
    y = _labels(m, rng)
    k = rng.integers(1, 4, len(y))
    idx = np.repeat(np.arange(len(y)), k)
    fields = {
        f.name: (
            None
            if (v := getattr(m, f.name)) is None
            else [v[i] for i in idx]
            if isinstance(v, list)
            else v[idx]
        )
        for f in dataclasses.fields(m)
    }
    repeated = fit_calibrator(UnitMatches(**fields), y[idx])
    weighted = fit_calibrator(m, y, sample_weight=k.astype(float))
    assert np.allclose(weighted.predict(m), repeated.predict(m), atol=1e-6)
    assert not np.allclose(fit_calibrator(m, y).predict(m), weighted.predict(m), atol=1e-3)


def test_fitting_on_a_manifest_without_ground_truth_says_what_it_needs(
    tiny_dataset, tiny_clip_dir, tmp_path, capsys
):
    """docs/walkthrough.md finding 4: a CUHK-PEDES-style manifest died with a raw
    `ArrowTypeError: Array type doesn't match type of values set: string vs null`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from miners.training.fit_calibrator import main

    table = pq.read_table(tiny_dataset / "manifest.parquet")
    no_truth = table.set_column(
        table.schema.get_field_index("gt_links"), "gt_links", pa.nulls(table.num_rows, table["gt_links"].type)
    )
    path = tmp_path / "manifest.parquet"
    pq.write_table(no_truth, path)
    assert (
        main(["--manifest", str(path), "--clip-model", str(tiny_clip_dir), "--out", str(tmp_path / "c.json")])
        == 2
    )
    said = capsys.readouterr().out
    assert (
        said.startswith(f"error: {path} (pvlg) holds no region ground truth")
        and "only a pvlg manifest" in said
    )
    assert "python -m qa.audit" in said and not (tmp_path / "c.json").exists()
    # A split without truth names the splits there are
    assert (
        main(
            [
                "--manifest",
                str(tiny_dataset / "manifest.parquet"),
                "--clip-model",
                str(tiny_clip_dir),
                "--split",
                "val",
            ]
        )
        == 2
    )
    assert (
        "no rows with ground truth in split 'val' (its splits: test, train; --split '' fits on all)"
        in capsys.readouterr().out
    )
