"""Recipes by name: ``dataloader.dataset=coco`` / ``voc`` sets the papers' schedules (FP32 and each
QAT recipe), ``dataloader.train.total_batch_size`` rescales them by the linear scaling rule, the
embedded dataset keeps its own, and every command of README's "Reproducing the papers" resolves.
Configs are only loaded and resolved (no dataset, no model)."""
import os
import re
import shlex

import pytest
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate

from hqod.engine.defaults import load_config
from hqod.solver import ClippedSGD
from hqod.solver.schedules import RECIPES, schedule

from helpers import ROOT

# (iterations, lr, LR steps in iterations, warm-up iterations, gradient clipping max norm) at the
# presets' batch of 16, written out from the papers' recipes (README, "Reproducing the papers").
COCO = {
    "fp32": (90000, 0.01, [60000, 80000], 1000, None),  # detectron2's 1x
    "hqod_w4": (117266, 1e-3, [58633, 102608], 500, 35.0),  # 16 epochs, steps at 8 and 14
    "hqod_w2": (131924, 1e-2, [65962, 102608, 124595], 500, 35.0),  # 18 epochs: 9, 14, 17
    "aqd_w4": (90000, 1e-3, [60000, 80000], 1000, None),
    "aqd_w2": (90000, 2e-3, [60000, 80000], 1000, None),
}
VOC = {
    "fp32": (12413, 0.01, [9310], 500, None),  # 12 epochs of 16,551 images, step at 9
    "hqod_w4": (16551, 1e-3, [8276, 14482], 500, 35.0),
    "hqod_w2": (18620, 1e-2, [9310, 14482, 17585], 500, 35.0),
    "aqd_w4": (12413, 1e-3, [9310], 500, None),
    "aqd_w2": (12413, 2e-3, [9310], 500, None),
}
EXPECTED = {"coco": COCO, "voc": VOC}
# configs -> recipe: every detector, both backbones, every quantizer family, W4 / W3 / W2
CONFIGS = {
    "retina_r18_fp32": "fp32",
    "fcos_r18_fp32": "fp32",
    "atss_r50_fp32": "fp32",
    "retina_r18_lsq_w4": "hqod_w4",
    "retina_r18_lsq_w4_hqod": "hqod_w4",
    "atss_r50_tqt_w4_hqod": "hqod_w4",
    "fcos_r18_lsq_w3": "hqod_w4",  # HQOD reports no W3: W4's recipe
    "retina_r18_lsq_w2_hqod": "hqod_w2",
    "atss_r50_tqt_w2": "hqod_w2",
    "retina_r50_aqd_w4": "aqd_w4",
    "fcos_r18_aqdstar_w4_hqod": "aqd_w4",
    "retina_r18_aqd_w3": "aqd_w4",  # AQD W3: lr 1e-3 as W4
    "retina_r18_aqd_w2_hqod": "aqd_w2",
    "fcos_r50_aqdstar_w2": "aqd_w2",
}


def _load(name, *overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", f"{name}.py")), list(overrides))


def _schedule_of(cfg):
    """(iterations, lr, LR steps in iterations, warm-up iterations, clipping) as the trainer sees
    them: the resolved config and the instantiated LR multiplier."""
    lm = cfg.lr_multiplier
    n = cfg.train.max_iter
    assert lm.scheduler.num_updates == n  # milestones are iterations on COCO / VOC
    assert lm.warmup_method == "linear" and lm.warmup_factor == 0.001
    clip = cfg.optimizer.max_norm if cfg.optimizer._target_ is ClippedSGD else None
    return n, cfg.optimizer.lr, list(lm.scheduler.milestones), lm.warmup_length * n, clip


@pytest.mark.parametrize("preset", ["coco", "voc"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_preset_sets_the_papers_schedule(name, preset):
    cfg = _load(name, f"dataloader.dataset={preset}")
    iters, lr, steps, warmup, clip = EXPECTED[preset][CONFIGS[name]]
    got = _schedule_of(cfg)
    assert got[0] == iters and got[2] == steps and got[4] == clip
    assert got[1] == pytest.approx(lr, rel=1e-12) and got[3] == pytest.approx(warmup, abs=1e-6)
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.eval_period == cfg.train.checkpointer.period == 5000
    assert cfg.model.backbone.out_channels == 256
    if CONFIGS[name] == "fp32":  # the converted ImageNet backbone of the config's depth
        depth = cfg.model.backbone.bottom_up.stages.depth
        assert cfg.train.init_checkpoint == f"output/pretrained/imagenet_r{depth}.pth"
    else:
        assert cfg.train.init_checkpoint.endswith("_fp32/model_final.pth")


def test_the_lr_curve_steps_where_the_recipe_says():
    """The instantiated multiplier, as the LRScheduler hook calls it (iteration / max_iter):
    warm-up from x0.001 over 500 iterations, x0.1 at each step (HQOD W2 on COCO)."""
    cfg = _load("retina_r18_lsq_w2_hqod", "dataloader.dataset=coco")
    mult, n = instantiate(cfg.lr_multiplier), cfg.train.max_iter
    at = lambda it: mult(it / n)  # noqa: E731
    assert at(0) == pytest.approx(0.001) and at(250) == pytest.approx(0.5, abs=1e-3)
    assert at(500) == pytest.approx(1.0)
    for step, value in zip([65962, 102608, 124595], [0.1, 0.01, 0.001]):
        assert at(step - 1) == pytest.approx(value * 10) and at(step) == pytest.approx(value)


# The one override for fewer GPUs: the total batch; lr x k, iterations, steps, warm-up and
# periods / k (k = batch / 16).
FEWER = [
    ("retina_r18_fp32", "coco", 8, (180000, 0.005, [120000, 160000], 2000, None), 10000),
    ("retina_r18_fp32", "coco", 4, (360000, 0.0025, [240000, 320000], 4000, None), 20000),
    ("retina_r18_lsq_w2_hqod", "coco", 8, (263849, 0.005, [131924, 205216, 249190], 1000, 35.0), 10000),
    ("retina_r18_lsq_w4", "voc", 8, (33102, 5e-4, [16551, 28964], 1000, 35.0), 10000),
    ("retina_r18_aqd_w2", "coco", 32, (45000, 4e-3, [30000, 40000], 500, None), 2500),
]


@pytest.mark.parametrize("name,preset,batch,expected,period", FEWER)
def test_the_total_batch_rescales_the_schedule(name, preset, batch, expected, period):
    cfg = _load(name, f"dataloader.dataset={preset}", f"dataloader.train.total_batch_size={batch}")
    got = _schedule_of(cfg)
    assert got[0] == expected[0] and got[2] == expected[2] and got[4] == expected[4]
    assert got[1] == pytest.approx(expected[1], rel=1e-12) and got[3] == pytest.approx(expected[3], abs=1e-6)
    assert cfg.dataloader.train.total_batch_size == batch
    assert cfg.train.eval_period == cfg.train.checkpointer.period == period


def test_explicit_keys_win_over_the_derived_schedule():
    cfg = load_config(
        os.path.join(ROOT, "configs/retina_r18_fp32.py"),
        ["dataloader.dataset=coco", "train.max_iter=3000", "optimizer.lr=0.02"],
    )
    assert cfg.train.max_iter == 3000 and cfg.optimizer.lr == 0.02
    mult = instantiate(cfg.lr_multiplier)  # steps stay at 2/3 and 8/9 of training
    assert mult(1999 / 3000) == pytest.approx(1.0) and mult(2000 / 3000) == pytest.approx(0.1)


def test_a_bad_total_batch_or_recipe_is_one_clear_error():
    cfg = _load("retina_r18_fp32", "dataloader.dataset=coco", "dataloader.train.total_batch_size=0")
    with pytest.raises(Exception, match="total_batch_size must be a positive integer"):
        cfg.train.max_iter
    with pytest.raises(KeyError, match="Unknown training recipe 'hqod_w9'"):
        schedule("coco", "hqod_w9", 16)
    with pytest.raises(KeyError, match="Unknown dataset preset"):
        schedule("imagenet", "fp32", 16)


# The embedded dataset keeps its schedule exactly (also asserted by tests/test_configs.py):
# (iterations, lr, per-mille steps, warm-up fraction, clipping, eval period, checkpoint period)
DIGITS = {
    "retina_r18_fp32": (1400, 0.01, [750, 900], 0.05, None, 1400, 350),
    # the lightweight detectors' "fp32_long": the accuracy benchmark's 3,000 FP32 iterations
    "ssdlite_mv2_fp32": (3000, 0.01, [750, 900], 0.05, None, 3000, 750),
    "yolox_tiny_fp32": (3000, 0.01, [750, 900], 0.05, None, 3000, 750),
    "ssdlite_mv2_lsq_w4": (280, 1e-3, [500, 875], 0.05, 35.0, 280, 93),
    "retina_r18_aqd_w4_hqod": (280, 1e-3, [666, 888], 0.05, None, 280, 93),
    "retina_r18_aqd_w2": (280, 2e-3, [666, 888], 0.05, None, 280, 93),
    "retina_r18_lsq_w4": (280, 1e-3, [500, 875], 0.05, 35.0, 280, 93),
    "atss_r18_tqt_w2_hqod": (280, 1e-2, [500, 777, 944], 0.05, 35.0, 280, 93),
}


@pytest.mark.parametrize("name", list(DIGITS))
def test_the_digits_schedule_is_unchanged(name):
    cfg = _load(name)
    iters, lr, steps, warmup, clip, eval_period, ckpt = DIGITS[name]
    lm = cfg.lr_multiplier
    assert cfg.dataloader.dataset == "digits" and cfg.dataloader.train.total_batch_size == 4
    assert cfg.train.max_iter == iters and cfg.optimizer.lr == lr
    assert list(lm.scheduler.milestones) == steps and lm.scheduler.num_updates == 1000
    assert lm.warmup_length == warmup and cfg.optimizer.get("max_norm") == clip
    assert (cfg.train.eval_period, cfg.train.checkpointer.period) == (eval_period, ckpt)


def test_the_long_fp32_recipe_is_fp32_except_on_digits():
    for preset, batch in (("coco", 16), ("voc", 8)):
        assert schedule(preset, "fp32_long", batch) == schedule(preset, "fp32", batch)
    long, short = schedule("digits", "fp32_long", 8), schedule("digits", "fp32", 8)
    assert (long["max_iter"], short["max_iter"]) == (1500, 700)  # 3,000 and 1,400 at batch 4, x 4/8
    assert long["lr"] == short["lr"] == 0.02 and long["milestones"] == short["milestones"] == [750, 900]


def test_every_recipe_has_the_same_clipping_on_every_dataset():
    for recipe, r in RECIPES["coco"].items():
        assert RECIPES["voc"][recipe].clip == r.clip


# ---------------------------------------------------------------------------------------------
# README: "Reproducing the papers"
# ---------------------------------------------------------------------------------------------
def _readme_rows():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Reproducing the papers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"\d+\.\d", cells[1]):
            rows.append((cells[0], float(cells[1]), cells[2]))
    return rows


def test_readme_lists_every_row_of_the_papers_tables():
    rows = _readme_rows()
    # HQOD Tables I-IV (10 + 20 + 10 + 3), AQD Tables 2 and 4 (21 + 21), Reg-PTQ RetinaNet W4A4
    assert len(rows) == 10 + 20 + 10 + 3 + 21 + 21 + 1
    later = [r for r in rows if not r[2].startswith("`")]
    assert all(r[2].startswith("the Table") for r in later), later
    assert ("RetinaNet-R50, W4A4 (FP32 37.4)", 36.7) in [(r[0], r[1]) for r in rows]


def test_readme_commands_resolve_to_the_papers_schedules():
    """Each command: the config exists, the overrides apply (unknown keys are refused), the
    dataset and schedule resolve; a QAT (or PTQ) row starts from the output of an FP32 row of the
    same dataset, and two different commands never share an output folder."""
    commands = sorted({r[2].strip("`") for r in _readme_rows() if r[2].startswith("`configs/")})
    assert len(commands) > 50
    fp32_outputs, qat_inits, outputs = {}, [], {}
    for command in commands:
        config, *overrides = shlex.split(command)
        assert os.path.isfile(os.path.join(ROOT, config)), config
        cfg = load_config(os.path.join(ROOT, config), overrides)
        preset = cfg.dataloader.dataset
        assert preset in ("coco", "voc")
        OmegaConf.to_container(cfg.dataloader, resolve=True)
        out = os.path.normpath(cfg.train.output_dir)
        assert outputs.setdefault(out, command) == command, f"{command} and {outputs[out]} share {out}"
        if "ptq" not in cfg:  # a tools/ptq.py row (Reg-PTQ's) has no schedule: it calibrates
            recipe = "fp32" if "quant" not in cfg else {"lsq": "hqod", "tqt": "hqod", "lq": "aqd"}[cfg.quant.method] + (
                "_w2" if cfg.quant.weight_bits == 2 else "_w4"
            )
            iters, lr, steps, warmup, clip = EXPECTED[preset][recipe]
            got = _schedule_of(cfg)
            assert (got[0], got[2], got[4]) == (iters, steps, clip), command
            assert got[1] == pytest.approx(lr, rel=1e-12) and got[3] == pytest.approx(warmup, abs=1e-6)
        if "quant" not in cfg:
            fp32_outputs[os.path.join(out, "model_final.pth")] = (preset, cfg.model.backbone.get("norm"))
        else:
            qat_inits.append((os.path.normpath(cfg.train.init_checkpoint), preset, cfg.model.backbone.get("norm"), command))
    for init, preset, norm, command in qat_inits:
        assert fp32_outputs.get(init) == (preset, norm), f"{command}: no FP32 row writes {init}"
