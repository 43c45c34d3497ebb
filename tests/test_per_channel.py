"""
Per-channel weight quantizers (``granularity="channel"``, ``quant.weight_granularity``): each
output channel is quantized as a per-tensor quantizer with that channel's parameter would
quantize it alone — forward, input gradient and per-channel parameter gradient against the
written-out references of test_quantizers.py (float64, tol 1e-6) — and a hand-computed case;
initialization and the MSE step search per channel; quantize_model, training and checkpoints.
"""
import copy

import pytest
import torch
from torch import nn

from detectron2.modeling.backbone.resnet import BasicBlock

from hqod.quantization import QUANTIZERS, calibrate, fake_quantize_param, quantize_model, quantizers_of

from test_quantizers import TOL, make_input, ref_lq, ref_lsq, ref_tqt

STEPS = (0.0731, 0.21, 0.0093)  # one per channel


def per_channel_input(bits, signed, params_to_steps):
    """(3, 1010) rows, row c made for the step of channel c (grid ends, just outside, zeros)."""
    return torch.stack([make_input(s, bits, signed, n=1000, seed=c) for c, s in enumerate(params_to_steps)])


def run_channels(q, x, g):
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(g)
    return y.detach(), x.grad, next(q.parameters()).grad.clone()


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("signed", (True, False))
@pytest.mark.parametrize("method", ("lsq", "tqt", "lq"))
def test_each_channel_is_the_per_tensor_reference(method, bits, signed):
    q = QUANTIZERS.get(method)(bits=bits, signed=signed, granularity="channel", channels=3).double()
    q.initialized.fill_(1)
    param = next(q.parameters())
    if method == "lsq":
        values, steps = STEPS, STEPS
    elif method == "tqt":  # log2 thresholds; step = 2^ceil(log2 t) / 2^(b-1 or b)
        values = (0.37, -1.6, 2.2)
        steps = [2.0 ** torch.tensor(v).ceil().item() / 2.0 ** (bits - 1 if signed else bits) for v in values]
    else:  # intervals nu; step nu * (2 if signed else 1) / L
        values = (0.9, 2.5, 0.04)
        steps = [v * (2.0 if signed else 1.0) / (2**bits - 1) for v in values]
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=torch.float64))
    if method == "lq":  # as test_lq_matches_reference: no points at the grid ends, whose test
        # in units of nu (the reference) and of the step (the kernels) can round apart
        gen = torch.Generator().manual_seed(bits)
        rows = []
        for nu in values:
            lo = -1.4 * nu if signed else -0.3 * nu
            rows.append(torch.cat([torch.rand(1000, generator=gen, dtype=torch.float64) * (1.4 * nu - lo) + lo,
                                   torch.zeros(3, dtype=torch.float64)]))
        x = torch.stack(rows)
    else:
        x = per_channel_input(bits, signed, steps)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, dx, dparam = run_channels(q, x, g)
    for c, value in enumerate(values):
        if method == "lsq":
            ry, rdx, rdp = ref_lsq(x[c], torch.tensor(value, dtype=torch.float64), g[c], bits, signed)
        elif method == "tqt":
            ry, rdx, rdp, _ = ref_tqt(x[c], value, g[c], bits, signed)
        else:
            ry, rdx, rdp = ref_lq(x[c], torch.tensor(value, dtype=torch.float64), g[c], bits, signed)
        torch.testing.assert_close(y[c], ry, atol=TOL, rtol=0)
        torch.testing.assert_close(dx[c], rdx, atol=TOL, rtol=0)
        torch.testing.assert_close(dparam[c], rdp, atol=TOL, rtol=0)


def test_hand_computed_case():
    """2-bit signed LSQ grid {-2, -1, 0, 1} x step, steps (0.25, 1.0), no gradient scale:
    channel 0: 0.2/0.25 = 0.8 -> 1 -> 0.25; -0.3/0.25 = -1.2 -> -1 -> -0.25, both inside;
    channel 1: 0.6 -> 1 -> 1.0 inside; 5.0 -> clipped to 1 -> 1.0 outside (no input gradient).
    Step gradients (upstream 1): sum of (x_hat - x * inside) / s per channel:
    (0.05 + 0.05) / 0.25 = 0.4 and (0.4 + 1.0) / 1.0 = 1.4."""
    x = torch.tensor([[0.2, -0.3], [0.6, 5.0]], dtype=torch.float64, requires_grad=True)
    steps = torch.tensor([0.25, 1.0], dtype=torch.float64, requires_grad=True)
    y = fake_quantize_param(x, steps, -2, 1)  # one step per channel of dim 0
    y.backward(torch.ones_like(y))
    assert y.tolist() == [[0.25, -0.25], [1.0, 1.0]]
    assert x.grad.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    torch.testing.assert_close(steps.grad, torch.tensor([0.4, 1.4], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ("lsq", "tqt", "lq", "lsq_torch"))
def test_initialization_and_mse_search_per_channel(method):
    """Each channel gets what a per-tensor quantizer fed with that channel alone gets: its own
    rule's initial value, then the MSE search's choice."""
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[1] *= 10.0  # channels of very different ranges
    w[3] *= 0.01
    per_channel = QUANTIZERS.get(method)(bits=3, signed=True, granularity="channel", channels=4, step_init="mse")
    singles = [QUANTIZERS.get(method)(bits=3, signed=True, step_init="mse") for _ in range(4)]
    per_channel.observe(w)
    for c, q in enumerate(singles):
        q.observe(w[c : c + 1])
    initial = next(per_channel.parameters()).detach().clone()
    torch.testing.assert_close(initial, torch.cat([next(q.parameters()).detach().reshape(1) for q in singles]))
    assert initial.unique().numel() == 4
    for q, x in [(per_channel, w)] + [(q, w[c : c + 1]) for c, q in enumerate(singles)]:
        q.start_step_search()
        q(x)
        q.finish_step_search()
    searched = next(per_channel.parameters()).detach()
    torch.testing.assert_close(searched, torch.cat([next(q.parameters()).detach().reshape(1) for q in singles]))
    assert not torch.equal(searched, initial)  # the search moved some channel
    assert "per channel (4)" in repr(per_channel)


def test_granularity_arguments_are_checked():
    with pytest.raises(ValueError, match=r"granularity must be one of \['tensor', 'channel'\]; got 'row'"):
        QUANTIZERS.get("lsq")(bits=4, signed=True, granularity="row")
    with pytest.raises(ValueError, match=r"per-channel quantizer takes channels=<number of output channels>"):
        QUANTIZERS.get("lsq")(bits=4, signed=True, granularity="channel")
    q = QUANTIZERS.get("lsq")(bits=4, signed=True, granularity="channel", channels=3)
    with pytest.raises(ValueError, match=r"per-channel quantizer of 3 channels got a tensor of shape \(4, 2\)"):
        q(torch.ones(4, 2))
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.5, -0.25, 1e-12]))
    # per channel, the grid's step is a (C,) float64 tensor: |s|, at least eps
    assert q.integer_grid().step.tolist() == [0.5, 0.25, 1e-8]


def test_quantize_model_per_channel_weights():
    block = nn.Sequential(BasicBlock(8, 16, stride=2, norm="BN"), nn.Flatten(), nn.LazyLinear(5))
    x = torch.relu(torch.randn(2, 8, 8, 8))
    block(x)  # materialize the linear layer
    ref = copy.deepcopy(block)
    quantize_model(block, {"method": "lsq", "weight_granularity": "channel", "first_last_bits": None})
    quantize_model(ref, {"method": "lsq"})
    quant = quantizers_of(block)
    weights = {n: q for n, q in quant.items() if n.endswith("weight_quant")}
    assert {n: q.scale.shape for n, q in weights.items()} == {
        "0.conv1.weight_quant": (16,), "0.conv2.weight_quant": (16,), "0.shortcut.weight_quant": (16,),
        "2.weight_quant": (5,),
    }
    assert all(q.scale.dim() == 0 for n, q in quant.items() if n not in weights)  # activations per tensor
    calibrate(block, [x], num_images=2)
    block.train()
    block(x).sum().backward()
    assert all(q.scale.grad is not None and q.scale.grad.shape == q.scale.shape for q in weights.values())
    # a checkpoint of the per-channel model loads into a fresh one; not into a per-tensor one
    fresh = nn.Sequential(BasicBlock(8, 16, stride=2, norm="BN"), nn.Flatten(), nn.Linear(256, 5))
    quantize_model(fresh, {"method": "lsq", "weight_granularity": "channel", "first_last_bits": None})
    fresh.load_state_dict(block.state_dict())
    torch.testing.assert_close(fresh[0].conv1.weight_quant.scale, block[0].conv1.weight_quant.scale)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ref.load_state_dict(block.state_dict())


@pytest.mark.parametrize(
    "quant, match",
    [
        ({"weight_granularity": "layer"}, r"quant.weight_granularity must be one of \['tensor', 'channel'\]; got 'layer'"),
    ],
)
def test_config_errors(quant, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(BasicBlock(8, 8, norm="BN"), quant)


def test_detector_trains_with_per_channel_weights():
    """RetinaNet-R18 LSQ W4 with quant.weight_granularity='channel': every conv's weight
    quantizer has one step per output channel, calibration and a training step run."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    from test_unchanged_losses import ROOT, make_batch

    cfg = LazyConfig.load(f"{ROOT}/configs/retina_r18_lsq_w4.py")
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    cfg.quant.weight_granularity = "channel"
    torch.manual_seed(0)
    model = quantize_model(instantiate(cfg.model), cfg.quant)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 38 and all(m.weight_quant.scale.shape == (m.out_channels,) for m in convs)
    calibrate(model, [make_batch(100)], num_images=2)
    model.train()
    with EventStorage():
        losses = model(make_batch(0))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(m.weight_quant.scale.grad.shape == (m.out_channels,) for m in convs)
    zero = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not m.weight_quant.scale.grad.abs().sum() > 0]
    assert zero in ([], ["backbone.top_block.p7"])  # p7 reads relu(p6) at 1 x 1 px: can be all zero
