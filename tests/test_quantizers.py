"""
Quantizers against written-out reference implementations (HQOD Eq. 2-3 for LSQ, Jain et al.
Eq. 5-8 for TQT, AQD Eq. 2-3 for LQ): forward, input gradient and step-parameter gradient for
bits 2, 3, 4, 8, signed and unsigned, in float64 (tol 1e-6) and through the fused float32 path.
"""
import math

import pytest
import torch

from hqod.quantization import ALLOWED_BITS, QUANTIZERS, Quantizer, fake_quantize_ste
from hqod.quantization import functional

BITS = (2, 3, 4, 8)
SIGNS = (True, False)
TOL = 1e-6


# ------------------------------------------------------------------------------------------
# Reference implementations: plain elementwise formulas, float64, no autograd.
# ------------------------------------------------------------------------------------------
def int_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_lsq(x, s, g, bits, signed):
    """HQOD Eq. 2 forward; Eq. 3 input gradient (unrounded test); LSQ step gradient with
    g = 1/sqrt(N * Qp)."""
    n, p = int_range(bits, signed)
    v = x / s
    r = torch.round(v)
    y = torch.clamp(r, n, p) * s
    inside = (v >= n) & (v <= p)
    dx = torch.where(inside, g, torch.zeros_like(g))
    dy_ds = torch.where(v < n, torch.full_like(v, n), torch.where(v > p, torch.full_like(v, p), r - v))
    ds = (g * dy_ds).sum() / math.sqrt(x.numel() * p)
    return y, dx, ds


def ref_tqt(x, log2t, g, bits, signed):
    """TQT: s = 2^ceil(log2 t) / 2^(b-1) (signed) or / 2^b (unsigned); conditions on the
    ROUNDED value; d/d(log2 t) = s ln2 * {round(x/s) - x/s | n | p}."""
    n, p = int_range(bits, signed)
    s = 2.0 ** math.ceil(log2t) / 2.0 ** (bits - 1 if signed else bits)
    v = x / s
    r = torch.round(v)
    y = torch.clamp(r, n, p) * s
    inside = (r >= n) & (r <= p)
    dx = torch.where(inside, g, torch.zeros_like(g))
    dy = torch.where(r < n, torch.full_like(v, n), torch.where(r > p, torch.full_like(v, p), r - v))
    dlog2t = (g * dy).sum() * s * math.log(2.0)
    return y, dx, dlog2t, s


def ref_lq(x, nu, g, bits, signed):
    """AQD Eq. 2 (unsigned) / Eq. 3 (signed) with straight-through rounding; gradients of
    these formulas written out."""
    L = 2**bits - 1
    if not signed:
        c = torch.clamp(x / nu, 0, 1)
        eta = torch.round(c * L)
        y = eta * nu / L
        inside = (x >= 0) & (x <= nu)
        # d/dnu of (nu/L) * round_ste(clip(x/nu, 0, 1) * L)
        dy_dnu = torch.where(inside, eta / L - x / nu, torch.where(x > nu, torch.ones_like(x), torch.zeros_like(x)))
    else:
        c = torch.clamp(x / nu, -1, 1)
        eta = torch.round((c + 1) / 2 * L)
        y = (eta / L * 2 - 1) * nu
        inside = (x >= -nu) & (x <= nu)
        dy_dnu = torch.where(inside, 2 * eta / L - 1 - x / nu, torch.sign(x))
    dx = torch.where(inside, g, torch.zeros_like(g))
    return y, dx, (g * dy_dnu).sum()


@pytest.fixture(params=["eager", "inductor", "native"])
def backend(request):
    """Run a float32 test with PyTorch's ATen ops, the inductor-compiled kernels (used for
    tensors of 8k elements or more) and the native C kernels."""
    previous = functional.get_backend()
    functional.set_backend(request.param)
    yield request.param
    functional.set_backend(previous)


# ------------------------------------------------------------------------------------------
def make_input(step, bits, signed, n=4000, seed=0):
    """Random values over 1.5x the grid, plus exact grid ends, points just outside the ends
    (within half a step: where rounded and unrounded tests differ) and zeros."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = int_range(bits, signed)
    span = (hi - lo + 1) * step
    x = (torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 - 0.25) * span + lo * step
    extra = torch.tensor(
        [lo, hi, lo - 0.3, hi + 0.3, lo - 0.7, hi + 0.7, 0.0, 0.0, lo + 0.49, hi - 0.2],
        dtype=torch.float64,
    ) * step
    return torch.cat([x, extra])


def run(q, x, g):
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(g)
    param = next(q.parameters())
    return y.detach(), x.grad, param.grad.clone().reshape(())


def new(name, bits, signed, dtype=torch.float64):
    q = QUANTIZERS.get(name)(bits=bits, signed=signed).to(dtype)
    q.initialized.fill_(1)
    return q


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", SIGNS)
def test_lsq_matches_reference(bits, signed):
    s = 0.0731
    q = new("lsq", bits, signed)
    with torch.no_grad():
        q.scale.fill_(s)
    x = make_input(s, bits, signed, seed=bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, dx, ds = run(q, x, g)
    ry, rdx, rds = ref_lsq(x, torch.tensor(s, dtype=torch.float64), g, bits, signed)
    torch.testing.assert_close(y, ry, atol=TOL, rtol=0)
    torch.testing.assert_close(dx, rdx, atol=TOL, rtol=0)
    torch.testing.assert_close(ds, rds, atol=TOL, rtol=0)
    # the unrounded test: x/s within half a step above the top level gets no input gradient
    top = (x / s > int_range(bits, signed)[1]) & (torch.round(x / s) <= int_range(bits, signed)[1])
    assert top.any() and (dx[top] == 0).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", SIGNS)
def test_tqt_matches_reference(bits, signed):
    log2t = 0.37  # threshold 1.29 -> ceil -> 1
    q = new("tqt", bits, signed)
    with torch.no_grad():
        q.log2_threshold.fill_(log2t)
    _, _, _, s = ref_tqt(torch.zeros(1, dtype=torch.float64), log2t, torch.zeros(1, dtype=torch.float64), bits, signed)
    x = make_input(s, bits, signed, seed=bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, dx, dl = run(q, x, g)
    ry, rdx, rdl, rs = ref_tqt(x, log2t, g, bits, signed)
    assert q.step.item() == rs
    torch.testing.assert_close(y, ry, atol=TOL, rtol=0)
    torch.testing.assert_close(dx, rdx, atol=TOL, rtol=0)
    torch.testing.assert_close(dl, rdl, atol=TOL, rtol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", SIGNS)
def test_lq_matches_reference(bits, signed):
    nu = 0.913
    q = new("lq", bits, signed)
    with torch.no_grad():
        q.interval.fill_(nu)
    L = 2**bits - 1
    step = (2 * nu if signed else nu) / L
    assert q.step.item() == pytest.approx(step, abs=1e-12)
    gen = torch.Generator().manual_seed(bits)
    lo = -1.4 * nu if signed else -0.3 * nu
    x = torch.rand(4000, generator=gen, dtype=torch.float64) * (1.4 * nu - lo) + lo
    x = torch.cat([x, torch.zeros(3, dtype=torch.float64)])  # ReLU zeros: inside (inclusive)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, dx, dnu = run(q, x, g)
    ry, rdx, rdnu = ref_lq(x, torch.tensor(nu, dtype=torch.float64), g, bits, signed)
    torch.testing.assert_close(y, ry, atol=TOL, rtol=0)
    torch.testing.assert_close(dx, rdx, atol=TOL, rtol=0)
    torch.testing.assert_close(dnu, rdnu, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["lsq", "tqt", "lq"])
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_float32_fused_path_matches_float64(name, bits, backend):
    """The float32 paths (inductor kernels; PyTorch's fused kernels + dot-product step
    gradient) agree with the exact float64 path: forward up to float rounding, gradients to
    relative 1e-4."""
    q64 = new(name, bits, True)
    with torch.no_grad():
        next(q64.parameters()).fill_(0.61 if name != "lq" else 1.3)
    q32 = new(name, bits, True, torch.float32)
    q32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in q64.state_dict().items()})
    step = q64.step.item()
    x = make_input(step, bits, True, n=40000, seed=5)  # > 32k elements: the fused kernels
    # keep away from rounding ties and from the range ends, where float32 and float64 may
    # decide differently
    lo, hi = int_range(bits, True)
    v = x / step + (2**bits - 1) / 2 * (name == "lq")
    frac = v - torch.floor(v)
    ends = torch.minimum((v - lo).abs(), (v - hi).abs()) if name != "lq" else torch.minimum(v.abs(), (v - 2**bits + 1).abs())
    x = x[((frac - 0.5).abs() > 1e-3) & (ends > 1e-3) & ((frac - 0.0).abs() > 1e-3) & ((frac - 1).abs() > 1e-3)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y64, dx64, dp64 = run(q64, x, g)
    y32, dx32, dp32 = run(q32, x.float(), g.float())
    torch.testing.assert_close(y32.double(), y64, atol=1e-5 * step * 2**bits, rtol=0)
    torch.testing.assert_close(dx32.double(), dx64, atol=1e-6, rtol=0)
    torch.testing.assert_close(dp32.double(), dp64, rtol=1e-4, atol=1e-6)


def test_lsq_torch_peer_same_forward_rounded_mask(backend):
    """PyTorch's fused op (the peer): same forward and same gradients except where x/s lies
    within half a step outside the range (it tests the rounded value)."""
    ours, peer = new("lsq", 4, True, torch.float32), new("lsq_torch", 4, True, torch.float32)
    with torch.no_grad():
        ours.scale.fill_(0.25)
        peer.scale.fill_(0.25)
    x = make_input(0.25, 4, True, n=40000, seed=7).float()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    y1, dx1, _ = run(ours, x, g)
    y2, dx2, _ = run(peer, x, g)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    v = x / 0.25
    band = ((v < -8) & (v >= -8.5)) | ((v > 7) & (v < 7.5))
    assert band.any()
    torch.testing.assert_close(dx1[~band], dx2[~band], atol=0, rtol=0)
    assert (dx1[band] == 0).all() and (dx2[band] == g[band]).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", SIGNS)
def test_tqt_step_is_power_of_two(bits, signed):
    q = new("tqt", bits, signed)
    gen = torch.Generator().manual_seed(bits)
    for log2t in (torch.rand(20, generator=gen, dtype=torch.float64) * 16 - 8).tolist() + [0.0, -3.0, 2.0]:
        with torch.no_grad():
            q.log2_threshold.fill_(log2t)
        e = torch.log2(q.step).item()
        assert e == round(e), (log2t, q.step)
        assert e == math.ceil(log2t) - (bits - 1 if signed else bits)
    # also after initialization from data and after a gradient step
    q = QUANTIZERS.get("tqt")(bits=bits, signed=signed)
    x = torch.randn(1000, generator=gen) * 3.3
    q(x).sum().backward()
    with torch.no_grad():
        q.log2_threshold -= 0.37 * q.log2_threshold.grad.sign()
    e = torch.log2(q.step).item()
    assert e == round(e)


@pytest.mark.parametrize("nu", [0.5, 1.2, 3.0])
def test_lq_2bit_weight_levels(nu):
    q = new("lq", 2, True)
    with torch.no_grad():
        q.interval.fill_(nu)
    x = torch.linspace(-3 * nu, 3 * nu, 10001, dtype=torch.float64)
    levels = torch.unique(q(x).detach())
    torch.testing.assert_close(levels, torch.tensor([-nu, -nu / 3, nu / 3, nu], dtype=torch.float64), atol=1e-12, rtol=0)
    # unsigned 2-bit activations: [0, nu] on 3 steps
    qa = new("lq", 2, False)
    with torch.no_grad():
        qa.interval.fill_(nu)
    levels = torch.unique(qa(x).detach())
    torch.testing.assert_close(levels, torch.tensor([0, nu / 3, 2 * nu / 3, nu], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["lsq", "tqt", "lq", "lsq_torch"])
@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, "4", 4.5, 4.0, True, False, None])
def test_bad_bits_refused(name, bits):
    with pytest.raises(ValueError, match=r"^bits=.*: bit widths are ints in 2\.\.8 \(.+\)\.$"):
        QUANTIZERS.get(name)(bits=bits, signed=True)


def test_allowed_bits_accepted():
    for name, cls in QUANTIZERS:
        for b in ALLOWED_BITS:
            assert cls(bits=b, signed=False).bits == b
    with pytest.raises(ValueError, match="signed"):
        QUANTIZERS.get("lsq")(bits=4, signed="yes")


@pytest.mark.parametrize("name", ["lsq", "tqt", "lq", "lsq_torch"])
def test_modes_and_initialization(name):
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(500, generator=gen), torch.randn(500, generator=gen) * 2
    # first batch initializes, then quantizes
    q = QUANTIZERS.get(name)(bits=4, signed=True)
    assert not q.is_initialized
    y = q(x1)
    assert q.is_initialized and not torch.equal(y, x1)
    step = q.step.clone()
    q(x2)
    assert torch.equal(q.step, step)  # no re-initialization on later batches
    # observer on + fake-quant off: identity, parameter = average of the per-batch estimates
    q = QUANTIZERS.get(name)(bits=4, signed=True)
    q.enable_observer().disable_fake_quant()
    assert q(x1) is x1 and q(x2) is x2
    param = next(q.parameters()).detach().reshape(())
    q1 = QUANTIZERS.get(name)(bits=4, signed=True)
    q1.observe(x1)
    q2 = QUANTIZERS.get(name)(bits=4, signed=True)
    q2.observe(x2)
    avg = (next(q1.parameters()) + next(q2.parameters())).detach().reshape(()) / 2
    torch.testing.assert_close(param, avg)
    q.disable_observer().enable_fake_quant()
    assert not torch.equal(q(x1), x1)


def test_lsq_initial_step_and_grad_scale():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for signed, qp in ((True, 7), (False, 15)):
        q = QUANTIZERS.get("lsq")(bits=4, signed=signed)
        q.observe(x)
        assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    # the step gradient is scaled by 1/sqrt(N * Qp): doubling N with the same data halves
    # the summed gradient's scale by sqrt(2)
    q = new("lsq", 4, True)
    with torch.no_grad():
        q.scale.fill_(0.3)
    _, _, d1 = run(q, x.double(), torch.ones(1000, dtype=torch.float64))
    q.scale.grad = None
    _, _, d2 = run(q, torch.cat([x, x]).double(), torch.ones(2000, dtype=torch.float64))
    assert d2.item() == pytest.approx(d1.item() * 2 / math.sqrt(2), rel=1e-9)


def calibrated(name, bits, signed, x, step_init, batches=1):
    """A quantizer calibrated as ``calibrate`` does: its own rule, then (mse) the step search,
    on ``x`` split into ``batches`` batches along the first dimension."""
    q = QUANTIZERS.get(name)(bits=bits, signed=signed)
    q.disable_fake_quant().enable_observer()
    for part in x.chunk(batches):
        q(part)
    q.disable_observer()
    if step_init == "mse":
        q.start_step_search()
        for part in x.chunk(batches):
            q(part)
        q.finish_step_search()
    return q.enable_fake_quant()


def test_mse_step_init_hand_computed():
    """step_init="mse" picks, among 2^(k/8) times the quantizer's own initial step (k = -24..16),
    the step of least squared error. Cases whose answer is known by hand."""
    # LSQ unsigned 2-bit on {0, 1, 2, 3}: own rule 2 * 1.5 / sqrt(3) = 1.7321; the exact step 1
    # is not a candidate; k = -6 gives 1.0299 (error 0.0126 per group of four), k = -7 0.9443
    # (0.0437: 3 is clipped to 2.83), so 1.7321 * 2^(-6/8)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(100)
    q = calibrated("lsq", 2, False, x, "mse")
    assert q.step.item() == pytest.approx(2 * 1.5 / math.sqrt(3) * 2 ** (-6 / 8), rel=1e-6)
    # LQ signed 2-bit (levels +-nu/3, +-nu) on {-3, -1, 1, 3}: own rule nu = 6 (LSQ step 4 over
    # the 2/3 step per nu); k = -8 halves it to nu = 3, which represents every value exactly
    x = torch.tensor([-3.0, -1.0, 1.0, 3.0]).repeat(100)
    q = calibrated("lq", 2, True, x, "mse")
    assert q.interval.item() == pytest.approx(3.0, rel=1e-6)
    assert torch.equal(q(x), x)
    assert calibrated("lq", 2, True, x, "paper").interval.item() == pytest.approx(6.0, rel=1e-6)


def test_step_search_counts_a_weight_once():
    """Calibration runs every batch through the same weights: a Parameter's errors are added
    once (same choice, a fraction of the work); activations add per call."""
    w = torch.nn.Parameter(torch.randn(16, 72, generator=torch.Generator().manual_seed(0)))
    q = calibrated("lsq", 2, True, w.detach(), "paper")
    q.disable_fake_quant().start_step_search()
    q(w)
    once = q._search_errors.clone()
    q(w)
    assert torch.equal(q._search_errors, once)
    q(w.detach() * 1)  # not a Parameter: counted again
    torch.testing.assert_close(q._search_errors, 2 * once)
    q.finish_step_search()


@pytest.mark.parametrize("name", ["lsq", "tqt", "lq", "lsq_torch"])
def test_mse_step_init_never_worse_than_own_rule(name):
    """On Gaussian data the MSE step's error is at most the own rule's (whose step is a
    candidate: factor 2^0); one batch of 64 rows or 8 batches of 8 choose the same step."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        errors = {}
        for init in ("paper", "mse"):
            q = calibrated(name, bits, True, x, init)
            with torch.no_grad():
                errors[init] = (q(x) - x).pow(2).mean().item()
        # measured (mean squared error, own rule -> mse): 2-bit LSQ 0.221 -> 0.149, LQ 0.214 ->
        # 0.120, TQT 0.333 -> 0.150; 4-bit TQT 0.0208 both (a power-of-two step either way)
        assert errors["mse"] <= errors["paper"] * 1.01, (bits, errors)
        if bits == 2:
            assert errors["mse"] < 0.75 * errors["paper"], errors
        split = calibrated(name, bits, True, x, "mse", batches=8)
        assert split.step_value() == pytest.approx(q.step_value(), rel=1e-6)  # the same factor


@pytest.mark.parametrize("name", ["lsq", "tqt", "lq", "lsq_torch"])
def test_quantizer_state_dict_round_trip(name):
    q = QUANTIZERS.get(name)(bits=3, signed=False)
    q(torch.rand(100) * 4)
    sd = q.state_dict()
    assert "initialized" in sd and sd["initialized"].item() == 1
    q2 = QUANTIZERS.get(name)(bits=3, signed=False)
    q2.load_state_dict(sd)
    assert q2.is_initialized and torch.equal(q2.step, q.step)
    x = torch.rand(100) * 4
    assert torch.equal(q2(x), q(x))


def test_output_not_saved_allows_inplace_consumers(backend):
    """Quantizers of layer outputs recompute their output in backward, so a following
    in-place op (e.g. detectron2's F.relu_) is allowed."""
    x = torch.randn(40000, requires_grad=True)
    s = torch.tensor(0.2, requires_grad=True)
    y = fake_quantize_ste(x, s, -8, 7, save_output=False)
    torch.relu_(y).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    s2 = torch.tensor(0.2, requires_grad=True)
    torch.relu(fake_quantize_ste(x2, s2, -8, 7)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(s.grad, s2.grad)


def test_registry_names():
    assert {"lsq", "tqt", "lq", "lsq_torch"} <= {name for name, _ in QUANTIZERS}
    for _, cls in QUANTIZERS:
        assert issubclass(cls, Quantizer)


def test_selected_backend_is_used(backend, monkeypatch):
    """The fixture's backend really runs (the tests above would otherwise silently test the
    eager path three times)."""
    used = []
    real_run, real_load = functional._run, functional._native.load

    def run(fn, *args):
        used.append(("inductor", fn.__name__))
        return real_run(fn, *args)

    class Lib:
        def __getattr__(self, name):
            used.append(("native", name))
            return getattr(real_load(), name)

    monkeypatch.setattr(functional, "_run", run)
    monkeypatch.setattr(functional._native, "load", lambda: Lib() if real_load() is not None else None)
    q = new("lsq", 4, True, torch.float32)
    x = torch.randn(40000, requires_grad=True)
    q(x).sum().backward()
    expected = {
        "eager": [],
        "inductor": [("inductor", "_grid"), ("inductor", "_grid_backward")],
        "native": [("native", "hqod_fq_forward_f32"), ("native", "hqod_fq_backward_f32")],
    }[backend]
    assert used == expected
    assert not functional._inductor_failed  # no fallback happened


@pytest.mark.parametrize("kind, k, p", [("linear", 1.0, 0.37), ("linear", 2 / 15, -1.3), ("linear", 1.0, 0.0), ("pow2", 3, 0.37), ("pow2", 7, -2.0)])
def test_step_and_slope_device_path(kind, k, p):
    """The device (non-CPU) formulas for the step and ds/dp equal the CPU float ones and the
    autograd derivative of step_from_param."""
    param = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    s_cpu, slope_cpu = functional._step_and_slope(param, kind, k)
    s_dev, slope_dev = functional._step_and_slope_tensor(param, kind, k)
    assert s_dev.item() == pytest.approx(s_cpu, rel=1e-12) and slope_dev.item() == pytest.approx(slope_cpu, rel=1e-12)
    functional.step_from_param(param, kind, k).backward()
    if s_cpu > functional.STEP_EPS:
        assert param.grad.item() == pytest.approx(slope_cpu, rel=1e-12)


def test_auto_backend_falls_back_when_kernels_cannot_be_built(monkeypatch, caplog):
    """Under "auto", without a C compiler and with a failing torch.compile, quantizers still
    work (eagerly) and say so once."""
    monkeypatch.setattr(functional, "_backend", "auto")
    monkeypatch.setattr(functional, "_inductor_failed", False)
    monkeypatch.setattr(functional._native, "load", lambda: None)

    def broken(fn):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(functional, "_inductor", broken)
    x = torch.randn(40000)
    ref = new("lsq", 4, True, torch.float32)
    with torch.no_grad():
        ref.scale.fill_(0.3)
    expected = torch.clamp(torch.round(x / 0.3), -8, 7) * 0.3
    for _ in range(2):
        xr = x.clone().requires_grad_()
        y = ref(xr)
        y.sum().backward()
        torch.testing.assert_close(y.detach(), expected, atol=1e-6, rtol=0)
    assert functional._inductor_failed
    assert sum("unavailable" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "backend, device, dtype, numel, contiguous, expected",
    [
        ("auto", "cpu", torch.float32, 40000, True, "native"),
        ("auto", "cpu", torch.float32, 40000, False, "fused"),  # the C kernels walk memory linearly
        ("auto", "cpu", torch.float32, 1000, False, "aten"),  # too small for a compiled call
        ("auto", "cpu", torch.float64, 40000, True, "exact"),
        ("auto", "meta", torch.float32, 40000, True, "fused"),  # a GPU tensor: Triton, never the C kernels
        ("auto", "meta", torch.float32, 1000, True, "aten"),
        ("auto", "meta", torch.float16, 40000, True, "fused"),
        ("native", "meta", torch.float32, 40000, True, "aten"),  # native is for CPU tensors only
        ("eager", "cpu", torch.float32, 40000, True, "aten"),
        ("inductor", "cpu", torch.float32, 1000, True, "fused"),
    ],
)
def test_kernel_chosen_by_device(backend, device, dtype, numel, contiguous, expected, monkeypatch):
    """Which implementation runs for a tensor of each device, dtype, size and layout ("meta"
    tensors stand for GPU tensors: neither is a CPU tensor)."""
    if expected == "native" and functional._native.load() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    monkeypatch.setattr(functional, "_backend", backend)
    monkeypatch.setattr(functional, "_inductor_failed", False)
    x = torch.empty(numel * 2 if not contiguous else numel, dtype=dtype, device=device)
    if not contiguous:
        x = x[::2]
    assert functional.kernel_for(x) == expected
