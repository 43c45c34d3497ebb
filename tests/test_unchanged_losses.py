"""
Behaviour of the configs is pinned: the same seed gives the same losses, for RetinaNet / FCOS /
ATSS x LSQ / AQD (W4A4, HQOD on), over calibration and three SGD steps. The references were
computed with the code before the dense-head protocol and the one-hook HQOD mixin (commit
88f626d) by ``python tests/test_unchanged_losses.py``; a change to them must be a deliberate
change of behaviour, re-measured.
"""
import os
import sys

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.quantization import calibrate, functional, quantize_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    (arch, method): f"configs/{arch}_r18_{method}_w4_hqod.py"
    for arch in ("retina", "fcos", "atss")
    for method in ("lsq", "aqd")
}

# Losses after calibration and 0, 1, 2 SGD steps (lr 0.05), keys sorted: (iteration, key) -> value.
REFERENCE = {
    ('atss', 'aqd'): {
        '0/loss_box_reg': 0.8026772, '0/loss_centerness': 0.6932456, '0/loss_cls': 1.128604,
        '0/loss_hiou': 1.369023, '0/loss_tcorr': 1.386844, '1/loss_box_reg': 0.8023345,
        '1/loss_centerness': 0.6923247, '1/loss_cls': 1.12622, '1/loss_hiou': 1.368634,
        '1/loss_tcorr': 1.386338, '2/loss_box_reg': 0.8022586, '2/loss_centerness': 0.6914262,
        '2/loss_cls': 1.123686, '2/loss_hiou': 1.368579, '2/loss_tcorr': 1.385436,
    },
    ('atss', 'lsq'): {
        '0/loss_box_reg': 0.8026963, '0/loss_centerness': 0.6932694, '0/loss_cls': 1.128612,
        '0/loss_hiou': 1.369022, '0/loss_tcorr': 1.386828, '1/loss_box_reg': 0.8025072,
        '1/loss_centerness': 0.6922054, '1/loss_cls': 1.126074, '1/loss_hiou': 1.368802,
        '1/loss_tcorr': 1.386392, '2/loss_box_reg': 0.8022367, '2/loss_centerness': 0.691346,
        '2/loss_cls': 1.123742, '2/loss_hiou': 1.368513, '2/loss_tcorr': 1.385641,
    },
    ('fcos', 'aqd'): {
        '0/loss_fcos_cls': 0.1485033, '0/loss_fcos_ctr': 0.09121948, '0/loss_fcos_loc': 0.1315789,
        '0/loss_hiou': 0.1973684, '0/loss_tcorr': 0.006680117, '1/loss_fcos_cls': 0.1626063,
        '1/loss_fcos_ctr': 0.09987098, '1/loss_fcos_loc': 0.1440922, '1/loss_hiou': 0.2161383,
        '1/loss_tcorr': 0.007287759, '2/loss_fcos_cls': 0.1777539, '2/loss_fcos_ctr': 0.1092241,
        '2/loss_fcos_loc': 0.1575795, '2/loss_hiou': 0.2363694, '2/loss_tcorr': 0.007847833,
    },
    ('fcos', 'lsq'): {
        '0/loss_fcos_cls': 0.1484898, '0/loss_fcos_ctr': 0.09122169, '0/loss_fcos_loc': 0.1315789,
        '0/loss_hiou': 0.1973684, '0/loss_tcorr': 0.006688278, '1/loss_fcos_cls': 0.1626028,
        '1/loss_fcos_ctr': 0.09986763, '1/loss_fcos_loc': 0.1440922, '1/loss_hiou': 0.2161383,
        '1/loss_tcorr': 0.007181625, '2/loss_fcos_cls': 0.1777754, '2/loss_fcos_ctr': 0.1092135,
        '2/loss_fcos_loc': 0.1575793, '2/loss_hiou': 0.2363693, '2/loss_tcorr': 0.007519528,
    },
    ('retina', 'aqd'): {
        '0/loss_box_reg': 1.11758, '0/loss_cls': 1.72142, '0/loss_hiou': 1.425328,
        '0/loss_tcorr': 1.321899, '1/loss_box_reg': 1.035314, '1/loss_cls': 1.634561,
        '1/loss_hiou': 1.343408, '1/loss_tcorr': 1.262731, '2/loss_box_reg': 0.9684623,
        '2/loss_cls': 1.563603, '2/loss_hiou': 1.276987, '2/loss_tcorr': 1.213814,
    },
    ('retina', 'lsq'): {
        '0/loss_box_reg': 1.117707, '0/loss_cls': 1.721377, '0/loss_hiou': 1.42606,
        '0/loss_tcorr': 1.321582, '1/loss_box_reg': 1.039481, '1/loss_cls': 1.634622,
        '1/loss_hiou': 1.347368, '1/loss_tcorr': 1.259432, '2/loss_box_reg': 0.9434191,
        '2/loss_cls': 1.563647, '2/loss_hiou': 1.261912, '2/loss_tcorr': 1.222461,
    },
}


def make_batch(seed, n=2, size=96):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        boxes = torch.tensor([[8.0, 10.0, 50.0, 56.0], [30.0, 24.0, 88.0, 90.0]])
        inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]))
        batch.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return batch


def losses_over_steps(arch, method, steps=3):
    """{f"{iteration}/{loss name}": value} for calibration then ``steps`` SGD steps."""
    cfg = LazyConfig.load(os.path.join(ROOT, CONFIGS[arch, method]))
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    quantize_model(model, cfg.quant)
    calibrate(model, [make_batch(100), make_batch(101)], num_images=2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {}
    with EventStorage():
        for it in range(steps):
            losses = model(make_batch(it))
            out.update({f"{it}/{k}": v.item() for k, v in sorted(losses.items())})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    return out


@pytest.mark.parametrize("arch,method", sorted(CONFIGS))
def test_same_losses_as_before(arch, method):
    previous = functional.get_backend()
    functional.set_backend("auto")
    try:
        got = losses_over_steps(arch, method)
    finally:
        functional.set_backend(previous)
    expected = REFERENCE[arch, method]
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():  # float32 sums on another CPU may differ in the last bits
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


if __name__ == "__main__":  # print the references
    for arch, method in sorted(CONFIGS):
        print(f"    ({arch!r}, {method!r}): {losses_over_steps(arch, method)!r},", file=sys.stdout)
