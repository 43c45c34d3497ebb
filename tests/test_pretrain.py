"""Backbone pretraining on the embedded data (hqod.pretrain, tools/pretrain_backbone.py): the crops
never use val's digit samples, are reproducible, and the checkpoint loads into every digits
detector config exactly as an ImageNet backbone would; bad checkpoints give one clear error."""
import logging
import os

import numpy as np
import pytest
import torch

from detectron2.config import LazyConfig, instantiate

from hqod.data.digit_crops import BACKGROUND, crop_digit_pools, make_crops
from hqod.data.digits import _digit_pools
from hqod.engine import Checkpointer, UserError
from hqod.engine.train_loop import check_init_checkpoint
from hqod.modeling import resnet_depth
from hqod.pretrain import BackboneClassifier, pretrain_backbone, pretrained_backbone_path, save_backbone_checkpoint

from helpers import ROOT, load_tool

DIGITS_CONFIGS = [f"configs/{det}_{bb}_fp32.py" for det in ("retina", "fcos", "atss") for bb in ("r18", "r50")]


def test_crops_use_train_digit_samples_only():
    _, _, split = _digit_pools()
    images, labels, pools = crop_digit_pools()
    fit, holdout = set(pools["fit"].tolist()), set(pools["holdout"].tolist())
    assert fit.isdisjoint(split["val"]) and holdout.isdisjoint(split["val"])
    assert fit.isdisjoint(holdout)
    assert fit | holdout == set(split["train"].tolist())
    assert len(holdout) == round(0.1 * len(split["train"]))
    for part, pool in (("fit", fit), ("holdout", holdout)):
        _, crop_labels, digit_ids = make_crops(range(200), seed=3, split=part, size=32)
        drawn = digit_ids[digit_ids >= 0]
        assert len(drawn) > 100 and set(drawn.tolist()) <= pool
        # a crop's label is its digit's class; crops without a centred digit are background
        np.testing.assert_array_equal(crop_labels[digit_ids >= 0], labels[drawn])
        assert (crop_labels[digit_ids < 0] == BACKGROUND).all()


def test_crops_are_a_function_of_seed_and_index():
    a, la, _ = make_crops([5, 6, 7], seed=1, size=48)
    b, lb, _ = make_crops([7, 6, 5], seed=1, size=48)
    c, _, _ = make_crops([5, 6, 7], seed=2, size=48)
    assert a.shape == (3, 48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b[::-1])
    np.testing.assert_array_equal(la, lb[::-1])
    assert not np.array_equal(a, c)
    _, labels, _ = make_crops(range(1000), seed=0, size=32)
    share = (labels == BACKGROUND).mean()
    assert 0.15 < share < 0.25, share  # background_prob = 0.2
    assert set(np.unique(labels[labels != BACKGROUND]).tolist()) == set(range(10))


def test_resnet_depth_from_keys():
    for depth in (18, 34, 50):
        keys = BackboneClassifier(depth).backbone.state_dict().keys()
        assert resnet_depth(keys) == depth
        assert resnet_depth(f"backbone.bottom_up.{k}" for k in keys) == depth
    assert resnet_depth(["head.cls_score.weight"]) is None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny R18, R50, MobileNetV2 and CSPDarknet pretraining runs (2 steps of 8 crops of 32 px),
    saved as checkpoints."""
    out = {}
    for depth in (18, 50, "mv2", "csp_tiny"):
        model, info = pretrain_backbone(backbone=depth, num_crops=16, epochs=1, batch_size=8, crop_size=32, holdout_crops=8, num_workers=1)
        path = str(tmp_path_factory.mktemp("pretrained") / os.path.basename(pretrained_backbone_path(depth)))
        save_backbone_checkpoint(model, info, path)
        out[depth] = path
    return out


def test_pretraining_reports_and_saves_a_detectron2_backbone(pretrained):
    data = torch.load(pretrained[18], weights_only=False)
    assert data["matching_heuristics"] is True
    assert data["pretrain"]["backbone"] == "r18" and 0.0 <= data["pretrain"]["top1_holdout"] <= 100.0
    assert "stem.conv1.weight" in data["model"] and "res5.1.conv2.norm.running_var" in data["model"]
    assert not any(k.startswith(("fc.", "backbone.")) for k in data["model"])  # bare ResNet names


@pytest.mark.parametrize("config", DIGITS_CONFIGS)
def test_pretrained_backbone_loads_into_every_digits_config(config, pretrained, caplog):
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    cfg.model.backbone.out_channels = 16
    depth = cfg.model.backbone.bottom_up.stages.depth
    assert cfg.train.init_checkpoint == pretrained_backbone_path(depth) == f"output/pretrained/digits_r{depth}.pth"
    model = instantiate(cfg.model)
    saved = torch.load(pretrained[depth], weights_only=False)["model"]
    with caplog.at_level(logging.WARNING):
        Checkpointer(model).load(pretrained[depth])
    state = model.state_dict()
    for key, value in saved.items():  # every backbone entry landed where it belongs
        torch.testing.assert_close(state[f"backbone.bottom_up.{key}"], value, rtol=0, atol=0)
    backbone_keys = {k for k in state if k.startswith("backbone.bottom_up.")}
    assert backbone_keys == {f"backbone.bottom_up.{k}" for k in saved}
    assert "not used by the model" not in caplog.text and "shape" not in caplog.text.lower()


@pytest.mark.parametrize("config,backbone,keys", [
    ("ssdlite_mv2_fp32", "mv2", ["stem.weight", "layer7.0.conv.2.norm.running_var", "conv_last.weight"]),
    ("yolox_tiny_fp32", "csp_tiny", ["stem.conv.weight", "stage4.1.conv1.weight", "stage4.2.blocks.0.conv2.norm.running_var"]),
])
def test_pretrained_lightweight_backbones_load_into_their_detectors(config, backbone, keys, pretrained, caplog):
    cfg = LazyConfig.load(os.path.join(ROOT, f"configs/{config}.py"))
    assert cfg.train.init_checkpoint == pretrained_backbone_path(backbone) == f"output/pretrained/digits_{backbone}.pth"
    model = instantiate(cfg.model)
    saved = torch.load(pretrained[backbone], weights_only=False)["model"]
    assert all(k in saved for k in keys)
    with caplog.at_level(logging.WARNING):
        Checkpointer(model).load(pretrained[backbone])
    state = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(state[f"backbone.bottom_up.{key}"], value, rtol=0, atol=0)
    assert {k for k in state if k.startswith("backbone.bottom_up.")} == {f"backbone.bottom_up.{k}" for k in saved}
    assert "not used by the model" not in caplog.text and "shape" not in caplog.text.lower()


def test_checkpoint_of_another_depth_is_one_clear_error(pretrained):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/retina_r50_fp32.py"))
    cfg.model.backbone.out_channels = 16
    with pytest.raises(UserError, match=r"ResNet-18 backbone but the model's backbone is ResNet-50.*"
                       r"pretrain_backbone.py --depth 50; COCO/VOC: .*convert_torchvision_backbone.py --depth 50 "
                       r"--input resnet50-0676ba61.pth\), or set the depth to 18\."):
        Checkpointer(instantiate(cfg.model)).load(pretrained[18])


def test_missing_pretrained_backbone_names_the_command():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/atss_r50_fp32.py"))
    cfg.train.init_checkpoint = "output/pretrained/digits_r50.pth"
    if os.path.isfile(cfg.train.init_checkpoint):
        cfg.train.init_checkpoint = "/nonexistent/output/pretrained/digits_r50.pth"
        with pytest.raises(UserError, match="Checkpoint .* does not exist"):
            check_init_checkpoint(cfg)
        return
    with pytest.raises(UserError, match=r"python tools/pretrain_backbone.py --depth 50"):
        check_init_checkpoint(cfg)


def test_tool_keeps_an_existing_checkpoint_and_refuses_bad_arguments(pretrained, capsys):
    tool = load_tool("pretrain_backbone")
    before = os.path.getmtime(pretrained[18])
    assert tool.main(["--depth", "18", "--output", pretrained[18]]) == 0
    assert "exists; keeping it" in capsys.readouterr().out and os.path.getmtime(pretrained[18]) == before
    assert tool.main(["--output", pretrained[18] + ".new", "--crops", "8", "--batch-size", "16"]) == 2
    assert "--crops >= --batch-size" in capsys.readouterr().err


def test_tool_trains_each_backbone_with_its_schedule(tmp_path, monkeypatch):
    """MobileNetV2 gets 3 passes over 51,200 crops, the others 2 over 25,600, unless told."""
    tool = load_tool("pretrain_backbone")
    seen = []

    def record(**kwargs):
        seen.append((kwargs["backbone"], kwargs["num_crops"], kwargs["epochs"]))
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(tool, "pretrain_backbone", record)
    for argv in (["--backbone", "mv2"], ["--depth", "18"], ["--backbone", "mv2", "--crops", "256", "--epochs", "1"]):
        with pytest.raises(KeyboardInterrupt):
            tool.main(argv + ["--output", str(tmp_path / "x.pth")])
    assert seen == [("mv2", 51200, 3), ("r18", 25600, 2), ("mv2", 256, 1)]


def test_yolox_trains_from_scratch_on_real_data():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/yolox_tiny_fp32.py"))
    for preset in ("coco", "voc"):
        cfg.dataloader.dataset = preset
        assert cfg.train.init_checkpoint == ""  # as YOLOX's authors: no ImageNet backbone


@pytest.mark.parametrize("config", DIGITS_CONFIGS)
def test_real_data_presets_do_not_use_the_digits_backbone(config):
    """COCO and VOC start from the converted ImageNet ResNet (tools/convert_torchvision_backbone.py)."""
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    depth = cfg.model.backbone.bottom_up.stages.depth
    for preset in ("coco", "voc"):
        cfg.dataloader.dataset = preset
        assert cfg.train.init_checkpoint == f"output/pretrained/imagenet_r{depth}.pth"
