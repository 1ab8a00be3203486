"""Reliability calibration: matching features → P(pair is correct).

Consumes `UnitMatches` features (and, to fit, correctness labels from ground truth); produces a
reliability in [0, 1] per pair. The calibrator is a logistic regression on standardised features,
fitted by Newton's method with a small L2 penalty (deterministic; a dozen features need nothing
heavier). It is saved as versioned JSON beside the CLIP model it was fitted with
(`<model_dir>/rsm-calibrator.json`) and refuses to load for a different model fingerprint.

Without labels, `default_calibrator()` is a documented, *uncalibrated* prior (`calibrated: false`):
sigmoid(-2.5 + 3·softmax_prob + 4·margin + 1·mutual_best + 3·agree − 3·contradict − 1.5·no_part_words
+ 0.5·region_quality). It ranks pairs sensibly but its numbers are not probabilities; QA says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miners.matching import UnitMatches
from storage.schemas import BODY_PARTS

# 2: per-part label features; 3: content features vs the reference bank; 4: the garment probe
CALIBRATOR_VERSION = 4
CALIBRATOR_FILENAME = "rsm-calibrator.json"
# Rows of the fitting data's feature matrix kept in the calibrator (`reference`), with their labels: what
# qa.domain compares a run with to say whether the calibrator applies there. 1000 rows are enough for a
# two-sample test to see a new domain and keep the JSON a few hundred kB (the project's own choice).
REFERENCE_ROWS = 1000


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(−z)) without overflow: exp is only ever taken of −|z| (a confident logit of −800 is
    0.0, not a RuntimeWarning)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# One indicator per body-part label of the chosen region: how reliable a part's regions are differs by
# part (a prior zone holds a head far more often than a bag), which a single quality number cannot say.
LABEL_FEATURES = tuple(f"label_{part}" for part in BODY_PARTS)

# What the pixels say (miners.bank): used when the model folder has a reference bank.
CONTENT_FEATURES = ("bank_region_z", "bank_sentence_z")
# The attribute probes (miners.attribute_probe): need no bank.
COLOUR_FEATURES = ("colour_logit",)
GARMENT_FEATURES = ("garment_logit",)
# How much a content feature says differs by body part (a bag zone is often empty, a head zone never):
# one product per part lets the linear model weigh it per part. "a*b" is the product of columns a, b.
CONTENT_BY_PART = tuple(f"bank_sentence_z*{label}" for label in LABEL_FEATURES)
COLOUR_BY_PART = tuple(f"colour_logit*{label}" for label in LABEL_FEATURES)
GARMENT_BY_PART = tuple(f"garment_logit*{label}" for label in LABEL_FEATURES)

FEATURES_BY_MODE = {
    "clip": ("clip_cosine", "softmax_prob", "margin", "mutual_best"),
    "lexical": ("agree", "contradict", "no_part_words", "region_quality", *LABEL_FEATURES),
    "combined": (
        "clip_cosine",
        "softmax_prob",
        "margin",
        "mutual_best",
        "agree",
        "contradict",
        "no_part_words",
        "region_quality",
        *LABEL_FEATURES,
    ),
}


def features_for(mode: str, content: bool, colour: bool = False, garment: bool = False) -> tuple[str, ...]:
    """The calibrator's inputs in `mode`, with the content features when a bank is there and each
    attribute probe's when it ran (none in `lexical` mode, which reads no pixels)."""
    names = FEATURES_BY_MODE[mode]
    if mode == "lexical":
        return names
    return (
        *names,
        *((*CONTENT_FEATURES, *CONTENT_BY_PART) if content else ()),
        *((*COLOUR_FEATURES, *COLOUR_BY_PART) if colour else ()),
        *((*GARMENT_FEATURES, *GARMENT_BY_PART) if garment else ()),
    )


def feature_matrix(m: UnitMatches, names: tuple[str, ...]) -> np.ndarray:
    read = {part for n in names for part in n.split("*")}
    missing = [n for n in CONTENT_FEATURES if n in read and getattr(m, n) is None]
    if missing:
        raise ValueError(
            f"the calibrator reads {', '.join(missing)} but these pairs have none (no reference bank); "
            "build one with `python -m miners.bank --manifest M --clip-model DIR`"
        )
    off = [n for n in (*COLOUR_FEATURES, *GARMENT_FEATURES) if n in read and getattr(m, n) is None]
    if off:
        raise ValueError(
            f"the calibrator reads {', '.join(off)} but these pairs have none (mined with that probe off)"
        )
    cols = {
        "clip_cosine": m.clip_cosine,
        "softmax_prob": m.softmax_prob,
        "margin": m.margin,
        "mutual_best": m.mutual_best.astype(np.float32),
        "agree": (m.part_agreement == 1.0).astype(np.float32),
        "contradict": (m.part_agreement == 0.0).astype(np.float32),
        "no_part_words": (~m.has_part_words).astype(np.float32),
        "region_quality": m.region_quality,
        "bank_region_z": m.bank_region_z,
        "bank_sentence_z": m.bank_sentence_z,
        "colour_logit": m.colour_logit,
        "garment_logit": m.garment_logit,
    }
    for part in BODY_PARTS:
        cols[f"label_{part}"] = np.array([label == part for label in m.region_label], dtype=np.float32)

    def column(name: str) -> np.ndarray:
        if "*" in name:
            a, b = name.split("*", 1)
            return column(a) * column(b)
        return np.asarray(cols[name], dtype=np.float64)

    return np.stack([column(n) for n in names], axis=1)


@dataclass
class Calibrator:
    features: tuple[str, ...]
    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    std: np.ndarray
    calibrated: bool
    model_fingerprint: str | None = None
    fit_info: dict = field(default_factory=dict)
    # A sample of the fitting data: {"x": rows of raw features (self.features' order), "correct": 0/1};
    # None for the default prior and for calibrators written before it was kept.
    reference: dict | None = None

    def _reads(self, names: tuple[str, ...]) -> bool:
        return any(part in names for n in self.features for part in n.split("*"))

    @property
    def uses_content(self) -> bool:
        return self._reads(CONTENT_FEATURES)

    @property
    def uses_colour(self) -> bool:
        return self._reads(COLOUR_FEATURES)

    @property
    def uses_garment(self) -> bool:
        return self._reads(GARMENT_FEATURES)

    def predict(self, m: UnitMatches) -> np.ndarray:
        x = (feature_matrix(m, self.features) - self.mean) / self.std
        return sigmoid(x @ self.coef + self.intercept).astype(np.float32)

    def to_json(self) -> dict:
        return {
            "version": CALIBRATOR_VERSION,
            "features": list(self.features),
            "coef": self.coef.tolist(),
            "intercept": float(self.intercept),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "calibrated": self.calibrated,
            "model_fingerprint": self.model_fingerprint,
            "fit_info": self.fit_info,
            **({"reference": self.reference} if self.reference is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CALIBRATOR_FILENAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> Calibrator:
        path = Path(path)
        if path.is_dir():
            path = path / CALIBRATOR_FILENAME
        raw = json.loads(path.read_text())
        if raw.get("version") != CALIBRATOR_VERSION:
            raise ValueError(f"{path}: calibrator version {raw.get('version')} != {CALIBRATOR_VERSION}")
        if expect_fingerprint and raw.get("model_fingerprint") not in (None, expect_fingerprint):
            raise ValueError(
                f"{path}: fitted for CLIP model {raw['model_fingerprint']}, not {expect_fingerprint}; "
                "refit it with `python -m miners.training.fit_calibrator`"
            )
        return cls(
            features=tuple(raw["features"]),
            coef=np.asarray(raw["coef"], dtype=np.float64),
            intercept=float(raw["intercept"]),
            mean=np.asarray(raw["mean"], dtype=np.float64),
            std=np.asarray(raw["std"], dtype=np.float64),
            calibrated=bool(raw["calibrated"]),
            model_fingerprint=raw.get("model_fingerprint"),
            fit_info=raw.get("fit_info", {}),
            reference=raw.get("reference"),
        )


def default_calibrator(mode: str = "combined") -> Calibrator:
    """The documented label-free prior (see the module docstring); restricted to the mode's features."""
    weights = {
        "clip_cosine": 0.0,
        "softmax_prob": 3.0,
        "margin": 4.0,
        "mutual_best": 1.0,
        "agree": 3.0,
        "contradict": -3.0,
        "no_part_words": -1.5,
        "region_quality": 0.5,
        **dict.fromkeys(LABEL_FEATURES, 0.0),
    }
    names = FEATURES_BY_MODE[mode]
    return Calibrator(
        features=names,
        coef=np.array([weights[n] for n in names]),
        intercept=-2.5,
        mean=np.zeros(len(names)),
        std=np.ones(len(names)),
        calibrated=False,
        fit_info={"kind": "default prior, not fitted on labels"},
    )


def newton_logistic(
    x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, l2: float, iters: int = 30
) -> np.ndarray:
    """Weighted L2-penalised logistic regression by Newton's method: the coefficients of `x` (whose last
    column is the intercept's ones, not shrunk). Weights are rescaled to mean 1, so the penalty means the
    same whatever their scale."""
    sw = sample_weight * (len(sample_weight) / sample_weight.sum())
    theta = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iters):
        p = sigmoid(x @ theta)
        grad = x.T @ (sw * (p - y)) / len(y) + penalty * theta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x / len(y) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta


def fit_calibrator(
    matches: UnitMatches,
    correct: np.ndarray,
    mode: str = "combined",
    l2: float = 1e-2,
    iters: int = 50,
    content: bool | None = None,
    colour: bool | None = None,
    garment: bool | None = None,
    sample_weight: np.ndarray | None = None,
    features: tuple[str, ...] | None = None,
    reference_rows: int = REFERENCE_ROWS,
) -> Calibrator:
    """Logistic regression of `correct` on the mode's features (Newton's method, L2 on weights);
    `content` adds the bank features (default: when the matches carry them). `sample_weight` weighs
    each pair (an audit sample's 1/π); `features` replaces the mode's list (refit a given calibrator).
    Up to `reference_rows` rows of the fitting data (drawn with a fixed seed) are kept as `reference`."""
    if content is None:
        content = matches.bank_region_z is not None
    if colour is None:
        colour = matches.colour_logit is not None
    if garment is None:
        garment = matches.garment_logit is not None
    names = features if features is not None else features_for(mode, content, colour, garment)
    x_raw = feature_matrix(matches, names)
    y = np.asarray(correct, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("need both correct and incorrect labelled pairs to fit a calibrator")
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    sw = sw * (len(y) / sw.sum())  # mean 1: the penalty means the same whatever the weights' scale
    mean = np.average(x_raw, axis=0, weights=sw)
    std = np.sqrt(np.average((x_raw - mean) ** 2, axis=0, weights=sw))
    std[std < 1e-8] = 1.0
    x = np.hstack([(x_raw - mean) / std, np.ones((len(y), 1))])
    w = newton_logistic(x, y, sw, l2, iters)
    pick = np.random.default_rng(0).permutation(len(y))[:reference_rows]
    pick.sort()
    reference = {
        # 5 significant digits: the test needs the shape of the distribution, not float64 noise
        "x": [[float(f"{v:.5g}") for v in row] for row in x_raw[pick]],
        "correct": [int(v) for v in y[pick]],
        **({"weight": [round(float(v), 5) for v in sw[pick]]} if sample_weight is not None else {}),
    }
    return Calibrator(
        reference=reference,
        features=names,
        coef=w[:-1],
        intercept=float(w[-1]),
        mean=mean,
        std=std,
        calibrated=True,
        fit_info={
            "n_pairs": int(len(y)),
            "positive_rate": float(y.mean()),
            "mode": mode,
            "l2": l2,
            "content": any(n in CONTENT_FEATURES for f in names for n in f.split("*")),
            "colour": any(n in COLOUR_FEATURES for f in names for n in f.split("*")),
            "garment": any(n in GARMENT_FEATURES for f in names for n in f.split("*")),
            "weighted": sample_weight is not None,
        },
    )
