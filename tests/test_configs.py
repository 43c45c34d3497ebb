"""Every file in configs/ loads; every config with a model builds it (quantized when it has a
``quant`` node), its optimizer and LR schedule, and R18 models run a forward pass; data configs
resolve every interpolation; the QAT matrix is complete and each file means what its name says."""
import glob
import itertools
import os

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from hqod.engine import build_model
from hqod.modeling import HQODATSS, HQODFCOS, HQODSSD, HQODYOLOX, HQODRetinaNet
from hqod.quantization import quantizers_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
)
DETS = {"retina": HQODRetinaNet, "fcos": HQODFCOS, "atss": HQODATSS, "ssdlite": HQODSSD, "yolox": HQODYOLOX}
RESNET_DETS = ["retina", "fcos", "atss"]
MATRIX = [
    f"configs/{det}_{bb}_{qat}_w{bits}{hqod}.py"
    for det, bb, qat, bits, hqod in itertools.product(
        RESNET_DETS, ["r18", "r50"], ["lsq", "tqt", "aqdstar", "aqd"], [2, 3, 4], ["", "_hqod"]
    )
] + [f"configs/{det}_{bb}_fp32.py" for det in RESNET_DETS for bb in ["r18", "r50"]]
# HQOD's Table II lightweight detectors: FP32, LSQ W4 and W2, TQT W4, with and without HQOD;
# AQD W4 for SSD-lite (YOLOX's SiLU rules AQD's scope out)
MATRIX += [
    f"configs/{det}_{run}.py"
    for det in ["ssdlite_mv2", "yolox_tiny"]
    for run in ["fp32", "lsq_w4", "lsq_w4_hqod", "lsq_w2", "lsq_w2_hqod", "tqt_w4", "tqt_w4_hqod"]
] + ["configs/ssdlite_mv2_aqd_w4.py", "configs/ssdlite_mv2_aqd_w4_hqod.py"]


def test_the_matrix_is_complete():
    assert set(MATRIX) <= set(CONFIGS), sorted(set(MATRIX) - set(CONFIGS))


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_builds(path):
    cfg = LazyConfig.load(os.path.join(ROOT, path))
    if "dataloader" in cfg:
        for preset in ("digits", "coco", "voc"):
            cfg.dataloader.dataset = preset
            OmegaConf.to_container(cfg.dataloader, resolve=True)  # every interpolation resolves
        cfg.dataloader.dataset = "digits"
    if "model" not in cfg:
        return
    if "out_channels" in cfg.model.get("backbone", {}):
        cfg.model.backbone.out_channels = 32  # small and fast; the structure is what is tested
    if "train" in cfg:
        model = build_model(cfg)
        cfg.optimizer.params.model = model
        instantiate(cfg.optimizer)
        instantiate(cfg.lr_multiplier)
    else:
        model = instantiate(cfg.model)

    name = os.path.basename(path)[:-3]
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] in DETS:
        assert isinstance(model, DETS[parts[0]]) == name.endswith(("_hqod", "_hardet"))
        if name.endswith(("_hqod", "_hardet")):
            assert model.harmony == ("hardet" if name.endswith("_hardet") else "hqod")
        depth = {"r18": 18, "r50": 50, "mv2": None, "tiny": None}[parts[1]]
        if depth is not None:
            assert len(model.backbone.bottom_up.res4) == {18: 2, 50: 6}[depth]
        if parts[2] == "fp32":
            assert "quant" not in cfg and not quantizers_of(model)
        else:
            # w<bits> (QAT matrix) or w<weight bits>a<act bits> (PTQ configs)
            w_bits, _, a_bits = parts[3][1:].partition("a")
            assert (cfg.quant.weight_bits, cfg.quant.act_bits) == (int(w_bits), int(a_bits or w_bits))
            assert cfg.train.init_checkpoint == f"output/{parts[0]}_{parts[1]}_fp32/model_final.pth"
            assert cfg.train.output_dir == f"./output/{name}"
            assert quantizers_of(model)
        if depth == 50:
            return  # R50 forward adds minutes and nothing R18 does not test
    model.eval()
    with torch.no_grad(), EventStorage():
        out = model([{"image": torch.randint(0, 255, (3, 64, 64)).float()}])
    assert "instances" in out[0]


# The papers' fine-tuning recipes (configs/common/qat.py): (lr, LR steps of a 1000-step
# schedule, gradient clipping) by quantizer family and bits; the FP32 lr is 0.01.
RECIPES = {
    ("lsq", 4): (1e-3, [500, 875], True),
    ("lsq", 3): (1e-3, [500, 875], True),
    ("lsq", 2): (1e-2, [500, 777, 944], True),
    ("tqt", 2): (1e-2, [500, 777, 944], True),
    ("aqdstar", 4): (1e-3, [666, 888], False),
    ("aqd", 3): (1e-3, [666, 888], False),
    ("aqd", 2): (2e-3, [666, 888], False),
}


@pytest.mark.parametrize("det", ["retina", "fcos", "atss"])
@pytest.mark.parametrize("qat,bits", list(RECIPES))
def test_qat_configs_follow_the_papers_recipes(det, qat, bits):
    from hqod.solver import ClippedSGD

    lr, steps, clip = RECIPES[(qat, bits)]
    fp32 = LazyConfig.load(os.path.join(ROOT, f"configs/{det}_r18_fp32.py"))
    cfg = LazyConfig.load(os.path.join(ROOT, f"configs/{det}_r18_{qat}_w{bits}_hqod.py"))
    assert cfg.optimizer.lr == pytest.approx(lr) and fp32.optimizer.lr == pytest.approx(0.01)
    assert list(cfg.lr_multiplier.scheduler.milestones) == steps
    assert cfg.lr_multiplier.warmup_length == pytest.approx(0.05)
    assert cfg.train.max_iter == fp32.train.max_iter // 5 == 280
    assert fp32.train.amp.enabled == (det == "retina") and not cfg.train.amp.enabled  # QAT: float32
    assert (cfg.optimizer._target_ is ClippedSGD) == clip
    assert not clip or cfg.optimizer.max_norm == 35.0
    assert list(fp32.lr_multiplier.scheduler.milestones) == [750, 900]  # the FP32 one is untouched


def test_clipped_sgd_clips_the_global_gradient_norm():
    from hqod.solver import ClippedSGD

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = ClippedSGD([a, b], lr=1.0, max_norm=5.0)
    a.grad, b.grad = torch.tensor([6.0, 0.0]), torch.tensor([8.0])  # norm 10 -> scaled by 1/2
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-3.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.tensor([-4.0]), rtol=0, atol=1e-6)
    a.grad, b.grad = torch.tensor([0.3, 0.4]), None  # norm 0.5 < 5: unchanged
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-3.3, -0.4]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        ClippedSGD([a], lr=1.0, max_norm=0)
