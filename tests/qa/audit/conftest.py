"""An audit database sampled from the tiny mined run (tests/conftest.py `tiny_run`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qa.audit.sample import sample_pairs


@pytest.fixture
def audit_db(tiny_run, tmp_path) -> Path:
    """40 pairs of the tiny run in a fresh audit database (5 strata, seed 0)."""
    db = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db, n=40, n_strata=5, seed=0)
    return db
