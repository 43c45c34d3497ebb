"""
Behaviour of the configs is pinned: the same seed gives the same losses, for RetinaNet / FCOS /
ATSS x LSQ / AQD (W4A4, HQOD on), over calibration and two SGD steps, to within what another CPU's
float rounding moves them. The references were
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

from hqod.quantization import calibrate, functional, quantize_model, quantizers_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    (arch, method): f"configs/{arch}_r18_{method}_w4_hqod.py"
    for arch in ("retina", "fcos", "atss")
    for method in ("lsq", "aqd")
}

# Losses after calibration and after one SGD step (lr 0.01); norms of the first gradients.
REFERENCE = {
    ('atss', 'aqd'): {
        '0/loss_box_reg': 0.80267715, '0/loss_centerness': 0.69324559, '0/loss_cls': 1.1286044,
        '0/loss_hiou': 1.3690232, '0/loss_tcorr': 1.3868438, 'grad/weights': 10.38594,
        'grad/quantizers': 0.56158572, '1/loss_box_reg': 0.80238235, '1/loss_centerness': 0.6931479,
        '1/loss_cls': 1.1279992, '1/loss_hiou': 1.3686447, '1/loss_tcorr': 1.3868322,
    },
    ('atss', 'lsq'): {
        '0/loss_box_reg': 0.80269635, '0/loss_centerness': 0.69326937, '0/loss_cls': 1.1286122,
        '0/loss_hiou': 1.3690218, '0/loss_tcorr': 1.3868279, 'grad/weights': 10.87249,
        'grad/quantizers': 0.026704887, '1/loss_box_reg': 0.80252624,
        '1/loss_centerness': 0.69304854, '1/loss_cls': 1.1281223, '1/loss_hiou': 1.3688281,
        '1/loss_tcorr': 1.3868262,
    },
    ('fcos', 'aqd'): {
        '0/loss_fcos_cls': 0.14850333, '0/loss_fcos_ctr': 0.091219477,
        '0/loss_fcos_loc': 0.13157894, '0/loss_hiou': 0.19736841, '0/loss_tcorr': 0.006680117,
        'grad/weights': 0.82339728, 'grad/quantizers': 0.06057255, '1/loss_fcos_cls': 0.16261764,
        '1/loss_fcos_ctr': 0.099891111, '1/loss_fcos_loc': 0.1440922, '1/loss_hiou': 0.21613833,
        '1/loss_tcorr': 0.0073300814,
    },
    ('fcos', 'lsq'): {
        '0/loss_fcos_cls': 0.14848985, '0/loss_fcos_ctr': 0.09122169, '0/loss_fcos_loc': 0.13157894,
        '0/loss_hiou': 0.19736841, '0/loss_tcorr': 0.0066882777, 'grad/weights': 1.1244857,
        'grad/quantizers': 0.0029513785, '1/loss_fcos_cls': 0.16264328,
        '1/loss_fcos_ctr': 0.099888414, '1/loss_fcos_loc': 0.14409219, '1/loss_hiou': 0.21613833,
        '1/loss_tcorr': 0.007275857,
    },
    ('retina', 'aqd'): {
        '0/loss_box_reg': 1.1175802, '0/loss_cls': 1.7214199, '0/loss_hiou': 1.4253284,
        '0/loss_tcorr': 1.3218987, 'grad/weights': 39.559174, 'grad/quantizers': 2.065177,
        '1/loss_box_reg': 1.0565026, '1/loss_cls': 1.635288, '1/loss_hiou': 1.3515431,
        '1/loss_tcorr': 1.2575574,
    },
    ('retina', 'lsq'): {
        '0/loss_box_reg': 1.117707, '0/loss_cls': 1.7213774, '0/loss_hiou': 1.4260604,
        '0/loss_tcorr': 1.3215816, 'grad/weights': 45.143028, 'grad/quantizers': 0.032720707,
        '1/loss_box_reg': 1.0567235, '1/loss_cls': 1.6353358, '1/loss_hiou': 1.3521442,
        '1/loss_tcorr': 1.2572826,
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


def losses_over_steps(arch, method, steps=2):
    """After calibration: {f"{iteration}/{loss name}": loss} for ``steps`` SGD steps, and
    ``"grad/weights"``, ``"grad/quantizers"``: the norms of the first step's gradients."""
    cfg = LazyConfig.load(os.path.join(ROOT, CONFIGS[arch, method]))
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    quantize_model(model, cfg.quant)
    calibrate(model, [make_batch(100), make_batch(101)], num_images=2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer_params = {id(p) for q in quantizers_of(model).values() for p in q.parameters()}
    out = {}
    with EventStorage():
        for it in range(steps):
            losses = model(make_batch(it))
            out.update({f"{it}/{k}": v.item() for k, v in sorted(losses.items())})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            if it == 0:
                for group, is_quant in (("weights", False), ("quantizers", True)):
                    grads = [p.grad for p in model.parameters() if p.grad is not None and (id(p) in quantizer_params) == is_quant]
                    out[f"grad/{group}"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
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
    for key, value in expected.items():
        # Convolution sums in another order (another CPU, thread count, oneDNN algorithm) move
        # values across rounding boundaries of the 4-bit grids, and training amplifies that.
        # Measured on the machine of the references, in one process after other tests: 3e-8
        # (losses), 7e-7 (gradient norms), 1.3e-4 (losses after the step); on a CPU with
        # AVX-512 (2026-12-02): up to 6.4e-4 (losses), 2.2e-3 (losses after the step) and up
        # to 85 % for the first gradients' norms of AQD on this untrained model (a few weights
        # at rounding boundaries), which are therefore not compared: their effect is in the
        # losses after the step. A change of bits, grids, BN or losses moves these by far more.
        group = key.split("/")[0]
        if group == "grad":
            continue
        rel = {"0": 1e-3}.get(group, 1e-2)
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), key


if __name__ == "__main__":  # print the references
    for arch, method in sorted(CONFIGS):
        print(f"    ({arch!r}, {method!r}): {losses_over_steps(arch, method)!r},", file=sys.stdout)
