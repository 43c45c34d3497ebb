"""HQOD losses (hqod/losses.py): values, gradients and what is detached (HQOD Eq. 5-9)."""
import math

import pytest
import torch

from hqod.losses import (
    aligned_box_iou,
    gt_class_scores,
    hardet_losses,
    hiou_loss,
    hqod_losses,
    task_correlation,
    tcorr_loss,
)

E1 = math.exp(-1.0)


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- values (computed by hand)
@pytest.mark.parametrize(
    "p, u, expected",
    [
        # c = 0.5**0.5 * 0.5**0.5 = 0.5; alpha = 1; exp(-0.5) - exp(-1) = 0.60653066 - 0.36787944
        (0.5, 0.5, 0.2386512185),
        # c = 0.9**0.3 * 0.3**0.9 = 0.96889 * 0.33838 = 0.32786; alpha = 1.6
        # 1.6 * (exp(-0.32786) - exp(-1)) = 1.6 * (0.72046 - 0.36788)
        (0.9, 0.3, 0.5641408004),
        # c = 0.2**0.7 * 0.7**0.2 = 0.32413 * 0.93114 = 0.30181; alpha = 1.5
        (0.2, 0.7, 0.5573932867),
        # c = 1**0 * 0**1 = 0; alpha = 2: the maximum 2 * (1 - exp(-1))
        (1.0, 0.0, 1.2642411177),
        (0.0, 1.0, 1.2642411177),
        # c = 1 (both scores perfect): no loss
        (1.0, 1.0, 0.0),
        # c = 0**0 * 0**0 = 1 (the limit): both scores low, "less need to discuss harmony"
        (0.0, 0.0, 0.0),
    ],
)
def test_tcorr_values(p, u, expected):
    loss = tcorr_loss(_f64(p), _f64(u))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_tcorr_batched_shape_and_symmetry():
    p = torch.rand(3, 5, dtype=torch.float64)
    u = torch.rand(3, 5, dtype=torch.float64)
    loss = tcorr_loss(p, u)
    assert loss.shape == (3, 5)
    # c(p, u) = p**u * u**p is symmetric in (p, u), and so is alpha.
    torch.testing.assert_close(loss, tcorr_loss(u, p))
    with pytest.raises(ValueError):
        tcorr_loss(p, u[0])


@pytest.mark.parametrize(
    "u, expected",
    [
        (0.0, 1.0),  # 1**0.8 * 1
        (0.25, 0.8965804686),  # 1.25**0.8 * 0.75 = 1.19544 * 0.75
        (0.5, 0.6915809336),  # 1.5**0.8 * 0.5 = 1.38316 * 0.5
        (0.9, 0.1671101699),  # 1.9**0.8 * 0.1 = 1.67110 * 0.1
        (1.0, 0.0),
    ],
)
def test_hiou_values(u, expected):
    assert hiou_loss(_f64(u)).item() == pytest.approx(expected, abs=1e-9)
    # sigma of Eq. 9 multiplies the loss
    assert hiou_loss(_f64(u), sigma=1.5).item() == pytest.approx(1.5 * expected, abs=1e-9)
    # gamma = 0: plain 1 - u
    assert hiou_loss(_f64(u), gamma=0.0).item() == pytest.approx(1.0 - u, abs=1e-12)


# ---------------------------------------------------------------- gradients
def _interior_points():
    p = _f64(0.1, 0.3, 0.5, 0.7, 0.95, 0.6)
    u = _f64(0.8, 0.2, 0.5, 0.65, 0.05, 0.99)
    return p.requires_grad_(), u.requires_grad_()


def test_task_correlation_gradcheck():
    p, u = _interior_points()
    assert torch.autograd.gradcheck(task_correlation, (p, u))
    # At the boundary (p or u exactly 0 or 1) with a larger eps, so that the finite differences
    # (step 1e-6) stay within the smooth region of log(x + eps).
    p = _f64(0.0, 1.0, 0.0, 1.0, 0.0, 0.4).requires_grad_()
    u = _f64(0.0, 1.0, 1.0, 0.0, 0.6, 0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: task_correlation(a, b, eps=1e-3), (p, u))


def test_tcorr_gradcheck_with_constant_alpha():
    """
    alpha = 1 + |p - u| is detached: dividing the loss by the (numerically identical) detached
    alpha must give a function whose autograd gradient matches finite differences. Were alpha
    not detached, autograd would include d(alpha)/dp * (exp(-c) - 1/e) and the check would fail.
    """

    def f(p, u, eps=1e-6):
        alpha = (1 + (p - u).abs()).detach()
        return tcorr_loss(p, u, eps) / alpha

    p, u = _interior_points()
    assert torch.autograd.gradcheck(f, (p, u))
    p = _f64(0.0, 1.0, 0.0, 1.0, 0.0).requires_grad_()
    u = _f64(1.0, 0.0, 0.0, 1.0, 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, eps=1e-3), (p, u))


def test_tcorr_gradient_matches_formula_with_detached_alpha():
    p, u = _interior_points()
    tcorr_loss(p, u).sum().backward()
    with torch.no_grad():
        eps = 1e-6
        c = (p + eps) ** u * (u + eps) ** p
        alpha = 1 + (p - u).abs()
        # dL/dp = alpha * (-exp(-c)) * dc/dp, dc/dp = c * (u / (p + eps) + log(u + eps))
        dp = alpha * -torch.exp(-c) * c * (u / (p + eps) + torch.log(u + eps))
        # dL/du = alpha * (-exp(-c)) * dc/du, dc/du = c * (log(p + eps) + p / (u + eps))
        du = alpha * -torch.exp(-c) * c * (torch.log(p + eps) + p / (u + eps))
        # what a non-detached alpha would add: sign(p - u) * (exp(-c) - 1/e)
        extra = torch.sign(p - u) * (torch.exp(-c) - E1)
    torch.testing.assert_close(p.grad, dp)
    torch.testing.assert_close(u.grad, du)
    assert (extra[p != u].abs() > 1e-3).all()  # the check above does discriminate


def test_hiou_gradcheck_and_weight_not_detached():
    u = _f64(0.0, 0.1, 0.5, 0.77, 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: hiou_loss(x, gamma=0.8, sigma=1.5), (u,))
    hiou_loss(u).sum().backward()
    with torch.no_grad():
        # d/du (1+u)^g (1-u) = g (1+u)^(g-1) (1-u) - (1+u)^g   (weight not detached)
        expected = 0.8 * (1 + u) ** -0.2 * (1 - u) - (1 + u) ** 0.8
    torch.testing.assert_close(u.grad, expected)
    # hand values: -0.2 at u = 0, -2**0.8 = -1.7411 at u = 1 (larger pull at high IoU)
    assert u.grad[0].item() == pytest.approx(-0.2)
    assert u.grad[-1].item() == pytest.approx(-(2**0.8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_the_boundary(dtype):
    p = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.3, 1e-30], dtype=dtype, requires_grad=True)
    u = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.4, 0.0, 0.5], dtype=dtype, requires_grad=True)
    loss = tcorr_loss(p, u) + hiou_loss(u, sigma=1.5)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(u.grad).all()
    # a sigmoid that underflows to 0 must not produce NaN (inf * 0) in the logit gradient
    logits = torch.tensor([-200.0, 200.0], dtype=dtype, requires_grad=True)
    q = logits.sigmoid()
    tcorr_loss(q, torch.tensor([0.5, 0.5], dtype=dtype)).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- helpers
def test_hqod_losses_sum_and_normalize():
    p = _f64(0.5, 0.9)
    u = _f64(0.5, 0.3)
    out = hqod_losses(p, u, 4.0, sigma=1.5, gamma=0.8)
    assert set(out) == {"loss_tcorr", "loss_hiou"}
    assert out["loss_tcorr"].item() == pytest.approx((0.2386512185 + 0.5641408004) / 4, abs=1e-5)
    # 1.5 * (1.5**0.8 * 0.5 + 1.3**0.8 * 0.7) / 4
    expected_hiou = 1.5 * (1.5**0.8 * 0.5 + 1.3**0.8 * 0.7) / 4
    assert out["loss_hiou"].item() == pytest.approx(expected_hiou)
    assert set(hqod_losses(p, u, 1.0, hiou=False)) == {"loss_tcorr"}
    assert set(hqod_losses(p, u, 1.0, tcorr=False)) == {"loss_hiou"}
    assert hqod_losses(p, u, 1.0, tcorr=False, hiou=False) == {}
    # no positives: zeros that are still part of the graph
    logits = torch.zeros(0, 3, requires_grad=True)
    empty = hqod_losses(logits.sum(1).sigmoid(), logits.sum(1), 1.0)
    assert all(v.item() == 0 and v.requires_grad for v in empty.values())


def test_aligned_box_iou_and_gt_class_scores():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [5.0, 5.0, 6.0, 6.0]])
    # identical; 50 / 150; disjoint
    torch.testing.assert_close(aligned_box_iou(a, b), torch.tensor([1.0, 1 / 3, 0.0]))
    a.requires_grad_()
    aligned_box_iou(a, b)[1].backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.0, 0.0]], requires_grad=True)
    p = gt_class_scores(logits, torch.tensor([1, 2]))
    torch.testing.assert_close(p, torch.tensor([2.0, 0.0]).sigmoid())
    p.sum().backward()
    assert logits.grad[0, 0] == 0 and logits.grad[0, 1] > 0  # only the GT-class logit


# ---------------------------------------------------------------- HarDet* (HQOD Table III)
def _hardet_by_hand(l_cls, l_reg, p, u, scores, sigma=1.5, gamma=0.8):
    """The four steps of the notes, one positive, plain floats."""
    l_reg1 = l_reg + sigma * (1 - u) * (1 + u) ** gamma
    l_reg2 = (1 + math.exp(-l_cls)) * l_reg1
    l_cls3 = (1 + math.exp(-l_reg2)) * l_cls
    delta = abs(p - u) if abs(p - u) >= 0.2 else 0.0
    beta = math.exp(sum(-q * math.log(q) for q in scores if q > 0))
    return l_cls3, l_reg2 + delta / (1 + beta)


HARDET_CASES = [
    # (l_cls, l_reg, p, u, scores of the positive): |p - u| = 0.5, 0.1 (below 0.2: no step 4), 0.6
    (0.5, 0.3, 0.9, 0.4, [0.9, 0.05, 0.2]),
    (1.2, 0.8, 0.5, 0.6, [0.1, 0.5, 0.0]),
    (0.05, 2.0, 0.1, 0.7, [0.1, 0.3, 0.02]),
]


def test_hardet_values_follow_the_four_steps():
    # first case by hand: L_reg1 = 0.3 + 1.5 * 0.6 * 1.4**0.8 = 0.3 + 0.9 * 1.308888 = 1.477999;
    # L_reg2 = (1 + e^-0.5) * 1.477999 = 1.606531 * 1.477999 = 2.374451;
    # L_cls' = (1 + e^-2.374451) * 0.5 = 1.093066 * 0.5 = 0.546533;
    # beta = exp(-(0.9 ln 0.9 + 0.05 ln 0.05 + 0.2 ln 0.2)) = exp(0.094825 + 0.149787 + 0.321888)
    #      = exp(0.566499) = 1.762087; L_reg' = 2.374451 + 0.5 / 2.762087 = 2.555473
    assert _hardet_by_hand(*HARDET_CASES[0]) == pytest.approx((0.546533, 2.555473), abs=2e-6)
    l_cls, l_reg, p, u = (_f64(*[c[i] for c in HARDET_CASES]) for i in range(4))
    scores = torch.tensor([c[4] for c in HARDET_CASES], dtype=torch.float64)
    out = hardet_losses(l_cls, l_reg, p, u, scores, normalizer=2.0)
    expected = [_hardet_by_hand(*c) for c in HARDET_CASES]
    # the returned terms are the differences to the detector's own sums, divided by P = 2
    assert float(out["loss_hardet_cls"]) == pytest.approx(sum(e[0] - c[0] for e, c in zip(expected, HARDET_CASES)) / 2, rel=1e-12)
    assert float(out["loss_hardet_reg"]) == pytest.approx(sum(e[1] - c[1] for e, c in zip(expected, HARDET_CASES)) / 2, rel=1e-12)


def test_hardet_gradients_match_the_formulas():
    """Nothing is detached: the gradients with respect to all five inputs are the finite
    differences of the plain-float formula above (central, h = 1e-6)."""
    for case in HARDET_CASES:
        inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in case[:4]]
        scores = torch.tensor([case[4]], dtype=torch.float64, requires_grad=True)
        out = hardet_losses(*(t.view(1) for t in inputs), scores, normalizer=1.0)
        (out["loss_hardet_cls"] + out["loss_hardet_reg"]).backward()

        def total(values, q):
            l_cls, l_reg = _hardet_by_hand(*values, q)
            return l_cls - values[0] + l_reg - values[1]

        h = 1e-6
        for i, t in enumerate(inputs):
            up, down = list(case[:4]), list(case[:4])
            up[i] += h
            down[i] -= h
            assert float(t.grad) == pytest.approx((total(up, case[4]) - total(down, case[4])) / (2 * h), abs=1e-6), (case, i)
        for j, q in enumerate(case[4]):
            if q == 0:
                continue  # -q ln q has no finite derivative at 0
            up, down = list(case[4]), list(case[4])
            up[j] += h
            down[j] -= h
            numeric = (total(case[:4], up) - total(case[:4], down)) / (2 * h)
            assert float(scores.grad[0, j]) == pytest.approx(numeric, abs=1e-6), (case, j)
