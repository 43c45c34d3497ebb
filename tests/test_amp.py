"""train.amp: which trainer runs, and what the CPU bfloat16 trainer computes."""
import pytest
import torch

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage

from hqod.engine import LossNormalizers, UserError, amp, build_model
from hqod.engine.amp import CPUAutocastTrainer, trainer_class

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


def test_amp_is_refused_for_quantization_aware_training():
    with pytest.raises(UserError, match=r"train.amp.enabled=False"):
        trainer_class(_cfg("configs/retina_r18_lsq_w4.py"), CPU)
    # the QAT configs switch it off themselves, although their FP32 config turns it on
    assert tiny_config("configs/retina_r18_fp32.py").train.amp.enabled is True
    assert tiny_config("configs/retina_r18_lsq_w4.py").train.amp.enabled is False


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
