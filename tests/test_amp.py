"""train.amp: which trainer runs, and what the CPU bfloat16 trainers compute."""
import copy

import pytest
import torch

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.layers import Conv2d
from detectron2.utils.events import EventStorage

from hqod.engine import LossNormalizers, UserError, amp, build_model
from hqod.engine.amp import BFloat16CodesTrainer, CPUAutocastTrainer, trainer_class
from hqod.quantization import QConv2d, set_bfloat16_codes
from hqod.quantization.quantizers import QUANTIZERS

from helpers import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cfg(config="configs/retina_r18_fp32.py", enabled=True):
    cfg = tiny_config(config)
    cfg.train.amp.enabled = enabled
    return cfg


def test_trainer_class_follows_train_amp(monkeypatch):
    monkeypatch.setattr(amp, "native_bfloat16_cpu", lambda: True)
    assert trainer_class(_cfg(enabled=False), CPU) is SimpleTrainer
    assert trainer_class(_cfg(), CPU) is CPUAutocastTrainer
    assert trainer_class(_cfg(), CUDA) is AMPTrainer
    # a CPU without native bfloat16 trains in float32 (emulation would be slower)
    monkeypatch.setattr(amp, "native_bfloat16_cpu", lambda: False)
    assert trainer_class(_cfg(), CPU) is SimpleTrainer


def test_quantization_aware_training_with_amp(monkeypatch):
    monkeypatch.setattr(amp, "native_bfloat16_cpu", lambda: True)
    assert trainer_class(_cfg("configs/retina_r18_lsq_w4.py"), CPU) is BFloat16CodesTrainer
    with pytest.raises(UserError, match=r"on CUDA.*train.amp.enabled=False"):
        trainer_class(_cfg("configs/retina_r18_lsq_w4.py"), CUDA)
    monkeypatch.setattr(amp, "native_bfloat16_cpu", lambda: False)
    assert trainer_class(_cfg("configs/retina_r18_lsq_w4.py"), CPU) is SimpleTrainer
    # the QAT configs switch it off themselves, although their FP32 config turns it on
    assert tiny_config("configs/retina_r18_fp32.py").train.amp.enabled is True
    assert tiny_config("configs/retina_r18_lsq_w4.py").train.amp.enabled is False


def _quantized_conv(in_channels, out_channels, kernel_size, *, x_step, w_step, bits=4):
    """A QConv2d (LSQ, per tensor) with the given steps, ready to fake-quantize."""
    conv = QConv2d(
        Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        weight_quant=QUANTIZERS.get("lsq")(bits=bits, signed=True),
        input_quant=QUANTIZERS.get("lsq")(bits=bits, signed=False),
    )
    for quantizer, step in ((conv.input_quant, x_step), (conv.weight_quant, w_step)):
        quantizer.scale.data.fill_(step)
        quantizer.initialized.fill_(1)
    return conv


def test_conv_on_bfloat16_codes_hand_computed():
    # 1x1 conv, steps 0.5 (input) and 0.25 (weights): codes x = (5, 7) and (1, 15), w = (3, -2)
    conv = _quantized_conv(2, 1, 1, x_step=0.5, w_step=0.25)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.75, -0.5]).view(1, 2, 1, 1))
        conv.bias.fill_(0.0625)
    x = torch.tensor([[2.5, 0.5], [3.5, 7.5]]).view(1, 2, 1, 2)  # pixels (2.5, 3.5), (0.5, 7.5)
    BFloat16CodesTrainer(conv, [x], torch.optim.SGD(conv.parameters(), lr=0.0))  # sets it, train mode
    assert conv.bfloat16_codes and conv.training
    # 0.5 * 0.25 * (5 * 3 - 7 * 2) + 0.0625 and 0.125 * (1 * 3 - 15 * 2) + 0.0625
    expected = torch.tensor([0.1875, -3.3125]).view(1, 1, 1, 2)
    assert torch.equal(conv(x), expected)


def test_conv_on_bfloat16_codes_matches_float32_to_bfloat16_precision():
    torch.manual_seed(0)
    reference = _quantized_conv(16, 8, 3, x_step=0.2, w_step=0.02)
    with torch.no_grad():  # codes up to +-8: accumulators past 256, which bfloat16 rounds
        reference.weight.normal_(0.0, 0.1)
        reference.bias.zero_()  # the error is relative to the accumulator
    codes = set_bfloat16_codes(copy.deepcopy(reference))
    x = torch.randn(2, 16, 12, 12).relu()
    outputs, grads = [], []
    for conv in (reference, codes):
        conv.train()
        xi = x.clone().requires_grad_()
        y = conv(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        grads.append([xi.grad, conv.weight.grad, conv.input_quant.scale.grad, conv.weight_quant.scale.grad])
    # one bfloat16 rounding of each output (8 significant bits): relative error <= 2^-8
    assert torch.all((outputs[1] - outputs[0]).abs() <= outputs[0].abs() * 2**-8 + 1e-6)
    assert not torch.equal(outputs[1], outputs[0])
    # gradients through bfloat16 convolutions: 0.2-0.5 % relative measured here, 1 % allowed
    for g_ref, g in zip(*grads):
        assert (g - g_ref).abs().max() <= 0.01 * g_ref.abs().max()
    # evaluation stays float32: the same values as the reference
    reference.eval(), codes.eval()
    assert torch.equal(codes(x), reference(x))


def test_cpu_autocast_step_runs_convs_in_bfloat16_and_keeps_float32_state(tiny_digits):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    model.train()
    data = next(iter(instantiate(cfg.dataloader.train)))
    conv_dtypes = []
    hook = model.backbone.bottom_up.stem.conv1.register_forward_hook(
        lambda m, i, o: conv_dtypes.append(o.dtype)
    )
    with EventStorage(0) as storage:
        reference = {k: v.item() for k, v in model(data).items()}  # float32 forward
        model.loss_normalizers = LossNormalizers()  # the EMA that forward started: the step starts it again
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay put
        trainer = CPUAutocastTrainer(model, [data], optimizer)
        stem = model.backbone.bottom_up.stem.conv1.weight
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
        trainer.run_step()
        logged = {k: v.latest() for k, v in storage.histories().items() if k.startswith("loss")}
    hook.remove()
    assert conv_dtypes == [torch.float32, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # the same losses as float32 to bfloat16's precision (8 significant bits, 0.4 % per
    # rounding; 0.01-0.24 % measured here), but not the float32 values themselves
    assert set(logged) == set(reference)
    for k in reference:
        assert logged[k] == pytest.approx(reference[k], rel=0.01), k
    assert any(logged[k] != reference[k] for k in reference)
