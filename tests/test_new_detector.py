"""
Adding a detector is one meta-arch file and one config (README, "Adding a detector"): a dense
detector defined here — a head whose one tower (conv + BN + ReLU) feeds both predictors, and a
meta-arch over it — trains FP32, is quantized (AQD W4A4, HQOD on), calibrated, fine-tuned,
evaluated with COCOEvaluator, converted to the integer-only engine, saved and loaded through the
public entry points, with no edit anywhere else in the repository.
"""
import math

import torch
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from hqod.engine import build_model, do_train
from hqod.modeling import dense_head, hqod_variant
from hqod.modeling.meta_arch.hqod_mixin import HQODLossMixin
from hqod.quantization import (
    MultiLevelBatchNorm,
    MultiLevelHead,
    compare_integer_model,
    load_integer_model,
    save_integer_model,
    to_integer,
)

from helpers import tiny_config


# ---- the new detector: what a user writes (one file) ----------------------------------------
@dense_head(predictors={"cls_score": "tower", "bbox_pred": "tower"})
class SharedTowerHead(nn.Module):
    """One tower shared by classification and box regression (and, in float, by the levels)."""

    def __init__(self, *, in_channels: int, num_classes: int, num_anchors: int, prior_prob: float = 0.01):
        super().__init__()
        self.tower = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU()
        )
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for conv in (self.tower[0], self.cls_score, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features):
        towers = [self.tower(f) for f in features]
        return [self.cls_score(t) for t in towers], [self.bbox_pred(t) for t in towers]


@META_ARCH_REGISTRY.register()
class SharedTowerRetinaNet(RetinaNet):
    """RetinaNet's anchors, matching and losses over :class:`SharedTowerHead`."""


@META_ARCH_REGISTRY.register()
class HQODSharedTowerRetinaNet(HQODLossMixin, SharedTowerRetinaNet):
    """Its HQOD variant (TCorr + HIoU on RetinaNet's positives and normalizer)."""


# ---- its config: the RetinaNet matrix config with the new detector and head -------------------
def shared_tower_config(config, output_dir, **train):
    cfg = tiny_config(config)
    cfg.model._target_ = SharedTowerRetinaNet
    cfg.model.head = L(SharedTowerHead)(in_channels="${..backbone.out_channels}", num_classes="${..num_classes}", num_anchors=9)
    cfg.train.update({"eval_period": 0, **train, "output_dir": str(output_dir)})
    cfg.train.checkpointer.period = 1000
    return cfg


def test_new_detector_through_every_entry_point(tiny_digits, tmp_path):
    torch.manual_seed(0)
    fp32_cfg = shared_tower_config("configs/retina_r18_fp32.py", tmp_path / "fp32", max_iter=6)
    fp32 = build_model(fp32_cfg)
    do_train(fp32_cfg, fp32)
    fp32_checkpoint = tmp_path / "fp32" / "model_final.pth"
    assert fp32_checkpoint.is_file()

    qat_cfg = shared_tower_config("configs/retina_r18_aqd_w4_hqod.py", tmp_path / "qat", max_iter=3,
                                  init_checkpoint=str(fp32_checkpoint), eval_period=3)
    qat_cfg.model._target_ = hqod_variant(SharedTowerRetinaNet)  # what the config's with_hqod does
    qat_cfg.quant.calib_images = 8
    qat_cfg.model.test_score_thresh = 0.0
    model = build_model(qat_cfg)
    assert type(model) is HQODSharedTowerRetinaNet and model.hqod_enabled
    head = model.head
    assert isinstance(head, MultiLevelHead) and head.num_levels == 5 and head.float_type is SharedTowerHead
    assert isinstance(head.tower[1], MultiLevelBatchNorm) and head.tower[1].output_quant is not None
    assert head.cls_score.weight_quant.bits == head.bbox_pred.weight_quant.bits == 8  # the predictors
    assert head.tower[0].weight_quant.bits == 4 and not head.cls_score.input_quant.signed  # after the ReLU

    results = do_train(qat_cfg, model)  # loads the FP32 checkpoint, calibrates, trains, evaluates
    storage_losses = (tmp_path / "qat" / "metrics.json").read_text()
    assert '"loss_tcorr"' in storage_losses and '"loss_hiou"' in storage_losses
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"} and 0.0 <= results["bbox"]["AP"] <= 100.0
    # every level's BN has seen its own level's statistics
    means = torch.stack([bn.running_mean for bn in head.tower[1].levels])
    assert len({tuple(m.tolist()) for m in means}) == 5

    int_model = to_integer(model)
    report = compare_integer_model(model, int_model, instantiate(qat_cfg.dataloader.test), num_images=4,
                                   dataset_name="digits_tiny_val")
    assert report.float64.max_step_diff < 1e-6 and report.float64.beyond_one_step == 0
    assert report.match_rate_ref64 == 1.0 and report.detections_integer > 0
    assert set(report.output_steps) == {"cls_score", "bbox_pred"}
    assert abs(report.ap_integer - report.ap_reference64) <= 0.1

    # saved as its config + state dict, rebuilt by load_integer_model into the same integers
    path = str(tmp_path / "model_integer.pth")
    save_integer_model(model, qat_cfg, path)
    loaded = load_integer_model(path)
    batch = next(iter(instantiate(qat_cfg.dataloader.test)))
    with torch.no_grad():
        ours, theirs = int_model(batch)[0]["instances"], loaded(batch)[0]["instances"]
    assert len(ours) > 0 and torch.equal(ours.scores, theirs.scores)
