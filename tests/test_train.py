"""A short FP32 training on the tiny embedded dataset: the loss falls, evaluation returns COCO's
metric dict, and a torchvision ResNet checkpoint loads into the backbone."""
import json
import os

import numpy as np
import torch

from hqod.engine import Checkpointer, build_model, do_test, do_train

from helpers import tiny_config

COCO_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def tiny_train_config(output_dir, max_iter, config="configs/retina_r18_fp32.py"):
    cfg = tiny_config(config)
    cfg.optimizer.lr = 0.01
    cfg.train.update(output_dir=output_dir, max_iter=max_iter, eval_period=max_iter, log_period=1)
    cfg.train.checkpointer.period = max_iter
    return cfg


def test_short_training_loss_falls_and_evaluation_returns_coco_metrics(tiny_digits, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_train_config(str(tmp_path), max_iter=40)
    results = do_train(cfg, build_model(cfg))

    assert COCO_KEYS <= set(results["bbox"])
    assert all(isinstance(v, float) for v in results["bbox"].values())
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) >= 35
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    assert any("bbox/AP" in r for r in records)  # evaluation also went to the event storage
    assert os.path.isfile(tmp_path / "model_final.pth")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))

    # The saved checkpoint evaluates to the same numbers.
    cfg_eval = tiny_train_config(str(tmp_path / "eval"), max_iter=1)
    model = build_model(cfg_eval)
    Checkpointer(model).load(str(tmp_path / "model_final.pth"))
    again = do_test(cfg_eval, model)
    assert again["bbox"]["AP50"] == results["bbox"]["AP50"]


def test_qat_with_hqod_from_an_fp32_checkpoint(tiny_digits, tmp_path):
    """The design-card path: FP32 detector -> AQD W4A4 + HQOD QAT (load, calibrate, train)."""
    torch.manual_seed(0)
    fp32 = tiny_train_config(str(tmp_path / "fp32"), max_iter=20)
    do_train(fp32, build_model(fp32))

    cfg = tiny_train_config(str(tmp_path / "qat"), 30, config="configs/retina_r18_aqd_w4_hqod.py")
    cfg.train.init_checkpoint = str(tmp_path / "fp32" / "model_final.pth")
    cfg.quant.calib_images = 8
    cfg.optimizer.lr = 0.01
    model = build_model(cfg)
    results = do_train(cfg, model)

    assert COCO_KEYS <= set(results["bbox"])
    # The FP32 weights were loaded (not left at their initialization) and calibration ran.
    fp32_state = torch.load(cfg.train.init_checkpoint, weights_only=False)["model"]
    stem = fp32_state["backbone.bottom_up.stem.conv1.weight"]
    assert not torch.equal(stem, build_model(cfg).backbone.bottom_up.stem.conv1.weight)
    from hqod.quantization import quantizers_of, uninitialized_quantizers

    assert quantizers_of(model) and not uninitialized_quantizers(model)
    with open(tmp_path / "qat" / "metrics.json") as f:
        records = [json.loads(line) for line in f if "total_loss" in line]
    assert all(r["loss_tcorr"] > 0 and r["loss_hiou"] > 0 for r in records)
    losses = [r["total_loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_torchvision_resnet_checkpoint_loads_into_backbone(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(tv.layer3[1].bn2.weight)
    path = str(tmp_path / "resnet18_tv.pth")
    torch.save(tv.state_dict(), path)

    cfg = tiny_train_config(str(tmp_path), max_iter=1)
    model = build_model(cfg)
    Checkpointer(model).load(path)
    bb = model.backbone.bottom_up
    assert torch.equal(bb.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(bb.stem.conv1.norm.running_var, tv.bn1.running_var)
    assert torch.equal(bb.res4[1].conv2.norm.weight, tv.layer3[1].bn2.weight)
    assert torch.equal(bb.res5[0].shortcut.weight, tv.layer4[0].downsample[0].weight)
    assert torch.equal(bb.res5[0].shortcut.norm.bias, tv.layer4[0].downsample[1].bias)
