"""miners.training.losses: each loss against a hand computation (plain-Python loops over written-out
numbers), the same-person property, gradients, non-negativity of the KL losses and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from miners.training.losses import (
    GLOBAL_LOSSES,
    USES_LOGIT_SCALE,
    cmpm,
    id_loss,
    identity_infonce,
    itc,
    mlm_loss,
    sdm,
)

# B = 3 pairs, E = 2; rows 0 and 1 show the same person
TEXT = [[1.0, 0.5], [-0.3, 0.8], [0.6, -1.2]]
IMAGE = [[0.9, 0.2], [-0.5, 1.0], [0.4, -0.7]]
PIDS_SHARED = [7, 7, 3]
PIDS_DISTINCT = [7, 8, 3]
EPS = 1e-8


# --- plain-Python references -------------------------------------------------------------------------
def _unit(x):
    n = math.sqrt(sum(a * a for a in x))
    return [a / n for a in x]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _log_softmax(row):
    m = max(row)
    log_z = m + math.log(sum(math.exp(r - m) for r in row))
    return [r - log_z for r in row]


def _label_dist(pids, i):
    count = sum(1 for p in pids if p == pids[i])
    return [1.0 / count if p == pids[i] else 0.0 for p in pids]


def _kl_row(logits, q):
    logp = _log_softmax(logits)
    return sum(math.exp(lp) * (lp - math.log(qj + EPS)) for lp, qj in zip(logp, q, strict=True))


def ref_identity_infonce(text, image, pids, scale):
    b = len(text)
    cos = [[_dot(_unit(text[i]), _unit(image[j])) for j in range(b)] for i in range(b)]  # text i, image j
    t2i = i2t = 0.0
    for i in range(b):
        q = _label_dist(pids, i)
        lp_t2i = _log_softmax([scale * cos[i][j] for j in range(b)])
        lp_i2t = _log_softmax([scale * cos[j][i] for j in range(b)])
        t2i -= sum(q[j] * lp_t2i[j] for j in range(b)) / b
        i2t -= sum(q[j] * lp_i2t[j] for j in range(b)) / b
    return (t2i + i2t) / 2


def ref_sdm(text, image, pids, tau=0.02):
    b = len(text)
    s = [[_dot(_unit(image[i]), _unit(text[j])) for j in range(b)] for i in range(b)]  # image i, text j
    i2t = sum(_kl_row([s[i][j] / tau for j in range(b)], _label_dist(pids, i)) for i in range(b)) / b
    t2i = sum(_kl_row([s[j][i] / tau for j in range(b)], _label_dist(pids, i)) for i in range(b)) / b
    return i2t + t2i  # IRRA sums the two directions


def ref_itc(text, image, scale):
    b = len(text)
    cos = [[_dot(_unit(text[i]), _unit(image[j])) for j in range(b)] for i in range(b)]
    t2i = -sum(_log_softmax([scale * cos[i][j] for j in range(b)])[i] for i in range(b)) / b
    i2t = -sum(_log_softmax([scale * cos[j][i] for j in range(b)])[i] for i in range(b)) / b
    return (t2i + i2t) / 2


def ref_cmpm(text, image, pids):
    b = len(text)
    i2t = sum(
        _kl_row([_dot(image[i], _unit(text[j])) for j in range(b)], _label_dist(pids, i)) for i in range(b)
    )
    t2i = sum(
        _kl_row([_dot(text[i], _unit(image[j])) for j in range(b)], _label_dist(pids, i)) for i in range(b)
    )
    return i2t / b + t2i / b


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _p(x):
    return torch.tensor(x, dtype=torch.long)


# --- hand computations -------------------------------------------------------------------------------
@pytest.mark.parametrize("pids", [PIDS_SHARED, PIDS_DISTINCT])
def test_identity_infonce_matches_hand_computation(pids):
    got = identity_infonce(_t(TEXT), _t(IMAGE), _p(pids), 10.0)
    assert float(got) == pytest.approx(ref_identity_infonce(TEXT, IMAGE, pids, 10.0), rel=1e-10)


@pytest.mark.parametrize("pids", [PIDS_SHARED, PIDS_DISTINCT])
def test_sdm_matches_hand_computation_with_fixed_temperature(pids):
    want = ref_sdm(TEXT, IMAGE, pids)
    # the learned scale is ignored: IRRA's τ = 0.02 is fixed
    for scale in (None, 1.0, 100.0):
        assert float(sdm(_t(TEXT), _t(IMAGE), _p(pids), scale)) == pytest.approx(want, rel=1e-10)
    other = float(sdm(_t(TEXT), _t(IMAGE), _p(pids), temperature=0.5))
    assert other == pytest.approx(ref_sdm(TEXT, IMAGE, pids, tau=0.5), rel=1e-10)


def test_sdm_sums_the_two_directions():
    # Text = image: both directions are the same KL, so the sum is twice one direction
    pids = PIDS_SHARED
    one = sum(
        _kl_row([_dot(_unit(IMAGE[i]), _unit(IMAGE[j])) / 0.02 for j in range(3)], _label_dist(pids, i))
        for i in range(3)
    )
    assert float(sdm(_t(IMAGE), _t(IMAGE), _p(pids))) == pytest.approx(2 * one / 3, rel=1e-10)


@pytest.mark.parametrize("pids", [PIDS_SHARED, PIDS_DISTINCT])
def test_itc_matches_hand_computation(pids):
    got = itc(_t(TEXT), _t(IMAGE), _p(pids), 10.0)
    assert float(got) == pytest.approx(ref_itc(TEXT, IMAGE, 10.0), rel=1e-10)


@pytest.mark.parametrize("pids", [PIDS_SHARED, PIDS_DISTINCT])
def test_cmpm_matches_hand_computation(pids):
    want = ref_cmpm(TEXT, IMAGE, pids)
    for scale in (None, 50.0):
        assert float(cmpm(_t(TEXT), _t(IMAGE), _p(pids), scale)) == pytest.approx(want, rel=1e-10)


def test_cmpm_uses_the_feature_norm_as_its_temperature():
    # Scaling the features sharpens p (no temperature of its own): the value must change
    base = float(cmpm(_t(TEXT), _t(IMAGE), _p(PIDS_DISTINCT)))
    scaled = [[5 * a for a in row] for row in IMAGE]
    assert float(cmpm(_t(TEXT), _t(scaled), _p(PIDS_DISTINCT))) != pytest.approx(base, rel=1e-3)


def test_id_loss_matches_hand_computation():
    image_logits = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]]
    text_logits = [[0.0, 1.5, -0.5], [1.0, 1.0, -2.0]]
    pids = [0, 2]

    def ce(rows):
        return -sum(_log_softmax(r)[p] for r, p in zip(rows, pids, strict=True)) / len(rows)

    got = id_loss(_t(image_logits), _t(text_logits), _p(pids))
    assert float(got) == pytest.approx((ce(image_logits) + ce(text_logits)) / 2, rel=1e-10)


def test_mlm_loss_averages_over_masked_positions_only():
    # N = 1, T = 3, V = 3; position 1 is not masked
    scores = [[[1.0, 0.0, -1.0], [5.0, -5.0, 0.0], [0.2, 0.4, 0.1]]]
    labels = [[2, -100, 1]]
    want = -(_log_softmax(scores[0][0])[2] + _log_softmax(scores[0][2])[1]) / 2
    assert float(mlm_loss(_t(scores), _p(labels))) == pytest.approx(want, rel=1e-10)
    # another ignore index: 0 as IRRA
    assert float(mlm_loss(_t(scores), _p([[2, 0, 1]]), ignore_index=0)) == pytest.approx(want, rel=1e-10)


def test_mlm_loss_with_nothing_masked_is_zero_with_a_gradient():
    scores = torch.randn(2, 4, 5, requires_grad=True)
    loss = mlm_loss(scores, torch.full((2, 4), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))


# --- properties --------------------------------------------------------------------------------------
def test_same_person_rows_are_positives_except_for_itc():
    # Rows 0 and 1 show one person (pids "shared"); their images are then swapped, so caption 0 matches
    # image 1 and caption 1 matches image 0
    text = _t([[4.0, 0.0], [0.0, 4.0], [-3.0, -3.0]])
    swapped = text[[1, 0, 2]]
    shared, distinct = _p([5, 5, 9]), _p([5, 6, 9])
    for name in ("identity-infonce", "sdm", "cmpm"):
        fn = GLOBAL_LOSSES[name]
        # Images of one person are interchangeable positives: the swap changes nothing ...
        assert float(fn(text, swapped, shared, 10.0)) == pytest.approx(float(fn(text, text, shared, 10.0)))
        # ... while as two people it is a confusion, and costs more
        assert float(fn(text, swapped, shared, 10.0)) < float(fn(text, swapped, distinct, 10.0)) - 0.3, name
    # ITC never looks at pids: every off-diagonal row is a negative, so the swap costs whatever the pids
    assert float(itc(text, swapped, shared, 10.0)) == float(itc(text, swapped, distinct, 10.0))
    assert float(itc(text, swapped, shared, 10.0)) > float(itc(text, text, shared, 10.0)) + 1.0


def test_kl_losses_are_non_negative_and_zero_at_the_optimum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, v = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
        pids = torch.randint(0, 3, (6,), generator=g)
        assert float(sdm(t, v, pids)) >= -1e-6
        assert float(cmpm(t, v, pids)) >= -1e-6
    # Orthogonal matching pairs, distinct people: p is (nearly) one-hot on the match, KL ≈ 0
    eye = torch.eye(3, dtype=torch.float64)
    assert float(sdm(eye, eye, _p([0, 1, 2]))) < 1e-6
    assert float(cmpm(50 * eye, 50 * eye, _p([0, 1, 2]))) < 1e-6


@pytest.mark.parametrize("name", sorted(GLOBAL_LOSSES))
def test_gradients_flow_and_logit_scale_use_matches_the_registry(name):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 8, generator=g, requires_grad=True)
    v = torch.randn(6, 8, generator=g, requires_grad=True)
    scale = torch.tensor(14.0, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = GLOBAL_LOSSES[name](t, v, pids, scale)
    assert loss.dim() == 0
    loss.backward()
    for grad in (t.grad, v.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    uses = scale.grad is not None and float(scale.grad) != 0.0
    assert uses == (name in USES_LOGIT_SCALE)


def test_identity_infonce_equals_the_trainers_former_loss():
    # trainer.identity_aware_loss as it was (it took normalised inputs), written out here rather than
    # imported so the check survives its removal; ours normalises, so unnormalised inputs give the same
    def former(text_emb, image_emb, pids, logit_scale):
        sim = logit_scale * text_emb @ image_emb.T
        labels = (pids[:, None] == pids[None, :]).float()
        t2i = -(labels / labels.sum(1, keepdim=True) * F.log_softmax(sim, 1)).sum(1).mean()
        i2t = -(labels / labels.sum(1, keepdim=True) * F.log_softmax(sim.T, 1)).sum(1).mean()
        return (t2i + i2t) / 2

    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        t, v = 3 * torch.randn(8, 16, generator=g), 3 * torch.randn(8, 16, generator=g)
        pids = torch.randint(0, 4, (8,), generator=g)
        got = identity_infonce(t, v, pids, 20.0)
        t_hat, v_hat = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
        torch.testing.assert_close(got, former(t_hat, v_hat, pids, 20.0))


def test_registry_names():
    assert set(GLOBAL_LOSSES) == {"identity-infonce", "sdm", "itc", "cmpm"}
    assert set(USES_LOGIT_SCALE) <= set(GLOBAL_LOSSES)
