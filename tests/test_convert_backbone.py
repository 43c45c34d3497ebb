"""torchvision ImageNet ResNet -> detectron2 backbone (tools/convert_torchvision_backbone.py,
hqod.pretrain.convert_torchvision_backbone), without downloading anything: torchvision ResNets with
random weights (BN statistics randomized too, so that no layer is an identity) are saved, converted,
loaded into the COCO configs' backbone, and must compute what torchvision computes."""
import logging
import os

import pytest
import torch
import torchvision
from detectron2.config import LazyConfig, instantiate

from hqod.engine import Checkpointer
from hqod.engine.defaults import UserError
from hqod.engine.train_loop import check_init_checkpoint
from hqod.pretrain import convert_command, imagenet_backbone_path

from helpers import ROOT, load_tool

# float32, the same convolutions in the same order: the outputs agree to rounding. Stated bound:
# |d2 - torchvision| <= 1e-5 + 1e-5 * |torchvision| elementwise.
TOL = dict(rtol=1e-5, atol=1e-5)


def _tool():
    return load_tool("convert_torchvision_backbone")


def _random_bn(net):
    """``net`` in eval mode with random BN parameters and statistics (no BN is an identity)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    return net.eval()


def _torchvision_resnet(depth, seed=0):
    torch.manual_seed(seed)
    return _random_bn(getattr(torchvision.models, f"resnet{depth}")(weights=None))


def _coco_model(depth):
    cfg = LazyConfig.load(os.path.join(ROOT, f"configs/retina_r{18 if depth == 18 else 50}_fp32.py"))
    cfg.dataloader.dataset = "coco"
    cfg.model.backbone.out_channels = 16  # small; the backbone is what is tested
    cfg.model.backbone.bottom_up.stages.depth = depth
    return cfg, instantiate(cfg.model).eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_backbone_loads_every_entry_and_computes_as_torchvision(depth, tmp_path, caplog):
    net = _torchvision_resnet(depth)
    source, output = str(tmp_path / f"resnet{depth}-random.pth"), str(tmp_path / f"imagenet_r{depth}.pth")
    torch.save(net.state_dict(), source)
    assert _tool().main(["--depth", str(depth), "--input", source, "--output", output]) == 0

    saved = torch.load(output, weights_only=False)
    assert saved["matching_heuristics"] and saved["conversion"]["depth"] == depth
    cfg, model = _coco_model(depth)
    assert cfg.train.init_checkpoint == imagenet_backbone_path(depth) == f"output/pretrained/imagenet_r{depth}.pth"
    with caplog.at_level(logging.WARNING):
        Checkpointer(model).load(output)
    state = model.state_dict()
    backbone_keys = {k for k in state if k.startswith("backbone.bottom_up.")}
    assert backbone_keys == {f"backbone.bottom_up.{k}" for k in saved["model"]}  # every entry, both ways
    for key, value in saved["model"].items():
        torch.testing.assert_close(state[f"backbone.bottom_up.{key}"], value, rtol=0, atol=0)
    assert "not used by the model" not in caplog.text and "shape" not in caplog.text.lower()
    # every torchvision tensor but the classifier reached the detector
    assert sum(1 for k in net.state_dict() if not k.startswith("fc.")) == len(saved["model"])

    bottom_up = model.backbone.bottom_up
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = bottom_up.res2(bottom_up.stem(x))
        theirs = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        torch.testing.assert_close(ours, theirs, **TOL)  # stem + res2 = conv1..layer1
        features = bottom_up(x)
        for stage, layer in (("res3", net.layer2), ("res4", net.layer3), ("res5", net.layer4)):
            theirs = layer(theirs)
            torch.testing.assert_close(features[stage], theirs, **TOL)


def test_old_torchvision_files_without_batch_counters_convert(tmp_path):
    state = {k: v for k, v in _torchvision_resnet(18).state_dict().items() if "num_batches_tracked" not in k}
    source, output = str(tmp_path / "old.pth"), str(tmp_path / "out.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, source)  # wrapped, DDP names
    assert _tool().main(["--depth", "18", "--input", source, "--output", output]) == 0
    _, model = _coco_model(18)
    Checkpointer(model).load(output)
    torch.testing.assert_close(model.backbone.bottom_up.res5[1].conv2.norm.running_var, state["layer4.1.bn2.running_var"])


def test_tool_refuses_another_depth_a_missing_input_and_keeps_an_existing_output(tmp_path, capsys):
    tool = _tool()
    source, output = str(tmp_path / "r18.pth"), str(tmp_path / "out.pth")
    torch.save(_torchvision_resnet(18).state_dict(), source)
    assert tool.main(["--depth", "34", "--input", source, "--output", output]) == 2
    err = capsys.readouterr().err
    assert "does not match detectron2's ResNet-34 (a ResNet-18" in err and not os.path.exists(output)
    assert tool.main(["--depth", "18", "--input", str(tmp_path / "nope.pth"), "--output", output]) == 2
    assert "resnet18-f37072fd.pth" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(1)}, str(tmp_path / "other.pth"))
    assert tool.main(["--depth", "18", "--input", str(tmp_path / "other.pth"), "--output", output]) == 2
    assert "not a torchvision ResNet state dict" in capsys.readouterr().err
    assert tool.main(["--depth", "18", "--input", source, "--output", output]) == 0
    before = os.path.getmtime(output)
    assert tool.main(["--depth", "18", "--input", source, "--output", output]) == 0
    assert "exists; keeping it" in capsys.readouterr().out and os.path.getmtime(output) == before


@pytest.mark.parametrize("preset", ["coco", "voc"])
def test_a_missing_imagenet_backbone_names_the_conversion_command(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output/pretrained here
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/atss_r50_fp32.py"))
    cfg.dataloader.dataset = preset
    assert cfg.train.init_checkpoint == "output/pretrained/imagenet_r50.pth"
    with pytest.raises(UserError) as e:
        check_init_checkpoint(cfg)
    assert str(e.value) == (
        "ImageNet backbone output/pretrained/imagenet_r50.pth (train.init_checkpoint) does not exist: "
        "convert torchvision's ImageNet ResNet-50 weights with `python tools/convert_torchvision_backbone.py "
        '--depth 50 --input resnet50-0676ba61.pth`, or set train.init_checkpoint="" to train from scratch.'
    )
    assert convert_command(50) in str(e.value)


def test_converted_mobilenet_v2_loads_into_ssdlite_and_computes_as_torchvision(tmp_path, caplog):
    torch.manual_seed(0)
    net = _random_bn(torchvision.models.mobilenet_v2(weights=None))
    source, output = str(tmp_path / "mobilenet_v2-random.pth"), str(tmp_path / "imagenet_mv2.pth")
    torch.save(net.state_dict(), source)
    assert _tool().main(["--backbone", "mv2", "--input", source, "--output", output]) == 0
    saved = torch.load(output, weights_only=False)
    assert saved["conversion"]["backbone"] == "mv2"
    # every torchvision tensor but the classifier
    assert sum(1 for k in net.state_dict() if not k.startswith("classifier.")) == len(saved["model"])

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/ssdlite_mv2_fp32.py"))
    cfg.dataloader.dataset = "coco"
    assert cfg.train.init_checkpoint == imagenet_backbone_path("mv2") == "output/pretrained/imagenet_mv2.pth"
    model = instantiate(cfg.model).eval()
    with caplog.at_level(logging.WARNING):
        Checkpointer(model).load(output)
    assert "not used by the model" not in caplog.text and "shape" not in caplog.text.lower()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        torch.testing.assert_close(ours["layer5"], net.features[:14](x), **TOL)  # stem .. block 13
        torch.testing.assert_close(ours["conv_last"], net.features(x), **TOL)
    assert _tool().main(["--depth", "18", "--input", source, "--output", str(tmp_path / "r18.pth")]) == 2
    with pytest.raises(ValueError, match="not a torchvision MobileNetV2 state dict"):
        from hqod.pretrain import convert_torchvision_backbone

        convert_torchvision_backbone(_torchvision_resnet(18).state_dict(), "mv2")
