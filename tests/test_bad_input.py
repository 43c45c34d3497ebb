"""Bad input: each mistake gives one clear line (exit code 2, no traceback without --debug), a
diverging run stops naming the iteration and the loss values and keeps its last good checkpoint
(exit code 3), and images without instances train and evaluate."""
import json
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from hqod.engine import UserError, build_model, check_output_dir, do_test, do_train, load_config

from helpers import ROOT, tiny_overrides

TINY = tiny_overrides()
ALLOWED = "bit widths are ints in 2..8"


@pytest.fixture(autouse=True)
def one_thread():
    """In-process trainings on one thread: quick on a busy machine too, and the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(config="configs/retina_r18_lsq_w4.py", *overrides):
    return load_config(os.path.join(ROOT, config), ["model.backbone.out_channels=32", *overrides])


def _run_all(commands, datasets=None, parallel=3, timeout=600):
    """Run tools/train_net.py with each argument list, a few at a time; their CompletedProcess-like
    (returncode, stdout, stderr) in order."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = str(datasets)
    results = [None] * len(commands)
    pending = list(enumerate(commands))
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        procs = [
            (i, subprocess.Popen([sys.executable, "tools/train_net.py", *args], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
            for i, args in batch
        ]
        for i, p in procs:
            out, err = p.communicate(timeout=timeout)
            results[i] = (p.returncode, out, err)
    return results


def _one_line(result, code=2):
    rc, out, err = result
    assert rc == code, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------- bit widths, names


@pytest.mark.parametrize(
    "override,expected",
    [
        ('quant.weight_bits="4"', "quant.weight_bits='4': " + ALLOWED + " (a string; write quant.weight_bits=4 without quotes)"),
        ("quant.weight_bits=0", "quant.weight_bits=0: " + ALLOWED + " (it has no quantization levels)"),
        ("quant.act_bits=1", "quant.act_bits=1: " + ALLOWED + " (1 bit leaves no usable grid"),
        ("quant.weight_bits=9", "quant.weight_bits=9: " + ALLOWED + " (quantization here goes up to 8 bits"),
        ("quant.first_last_bits=1.5", "quant.first_last_bits=1.5: " + ALLOWED + " (a float)"),
        ("quant.method=lsqq", "quant.method must be one of ['lq', 'lsq', 'lsq_torch', 'tqt']; got 'lsqq'"),
        ("model._target_=hqod.modeling.RetinaNett", "Cannot build the model: 'hqod.modeling.RetinaNett' cannot be imported"),
    ],
)  # fmt: skip
def test_bad_bits_and_names_are_one_clear_message(override, expected):
    with pytest.raises(UserError) as e:
        build_model(_cfg("configs/retina_r18_lsq_w4.py", override))
    assert expected in str(e.value) and "\n" not in str(e.value)
    if override.startswith("model._target_"):
        known = str(e.value).split("Known detectors: ")[1]
        for path in ("detectron2.modeling.meta_arch.retinanet.RetinaNet", "hqod.modeling.meta_arch.fcos.FCOS",
                     "hqod.modeling.meta_arch.atss.ATSS", "hqod.modeling.meta_arch.retinanet.HQODRetinaNet",
                     "hqod.modeling.meta_arch.fcos.HQODFCOS", "hqod.modeling.meta_arch.atss.HQODATSS"):  # fmt: skip
            assert path in known


# ----------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A RetinaNet-R18 and an FCOS-R18 FP32 checkpoint (width 32), and a truncated copy."""
    folder = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, config in (("retina", "configs/retina_r18_fp32.py"), ("fcos", "configs/fcos_r18_fp32.py")):
        out[name] = str(folder / f"{name}.pth")
        torch.save({"model": build_model(_cfg(config)).state_dict()}, out[name])
    out["truncated"] = str(folder / "truncated.pth")
    data = open(out["retina"], "rb").read()
    with open(out["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    return out


def test_bad_checkpoints_and_configs_on_the_command_line(tiny_digits, checkpoints, tmp_path):
    """Through tools/train_net.py: one line, exit code 2, no traceback, for a bit width given as a
    string, an unknown detector, a truncated checkpoint (evaluation and QAT), an FP32 checkpoint
    of another detector (QAT and evaluation), and --resume of a run of another model."""
    run = tmp_path / "run"
    run.mkdir()
    LazyConfig.save(load_config(os.path.join(ROOT, "configs/retina_r18_fp32.py"), TINY), str(run / "config.yaml"))
    (run / "last_checkpoint").write_text("model_final.pth")
    qat = ["--config-file", "configs/retina_r18_lsq_w4.py", *TINY, "quant.calib_images=2"]
    fp32 = ["--config-file", "configs/retina_r18_fp32.py", *TINY]
    cases = [
        (qat + ['quant.weight_bits="4"', f"train.output_dir={tmp_path / 'a'}"],
         "error: quant.weight_bits='4': bit widths are ints in 2..8 (a string; write quant.weight_bits=4 without quotes)."),
        (fp32 + ["model._target_=detectron2.modeling.meta_arch.Retina", f"train.output_dir={tmp_path / 'b'}"],
         "error: Cannot build the model: 'detectron2.modeling.meta_arch.Retina' cannot be imported"),
        (["--eval-only"] + fp32 + [f"train.init_checkpoint={checkpoints['truncated']}", f"train.output_dir={tmp_path / 'c'}"],
         f"error: Checkpoint {checkpoints['truncated']} ("),
        (qat + [f"train.init_checkpoint={checkpoints['truncated']}", f"train.output_dir={tmp_path / 'd'}"],
         "cannot be read: it is truncated or corrupt"),
        (qat + [f"train.init_checkpoint={checkpoints['fcos']}", f"train.output_dir={tmp_path / 'e'}"],
         f"error: Checkpoint {checkpoints['fcos']} does not fit this model: 4 shape mismatches (e.g. head."),
        (["--eval-only"] + fp32 + [f"train.init_checkpoint={checkpoints['fcos']}", f"train.output_dir={tmp_path / 'f'}"],
         "does not fit this model: 4 shape mismatches (e.g. head."),
        (["--resume"] + fp32 + ["model.backbone.out_channels=64", f"train.output_dir={run}"],
         f"error: --resume: output directory {run} holds a run of another model, quantization or training data "
         "(model.backbone.out_channels: 32 -> 64)"),
    ]  # fmt: skip
    results = _run_all([c for c, _ in cases], datasets=os.path.dirname(tiny_digits))
    for (args, expected), result in zip(cases, results):
        line = _one_line(result)
        assert expected in line, (args, line)
    assert "truncated or corrupt" in _one_line(results[2])
    assert "(e.g." in _one_line(results[4]) and "another architecture" in _one_line(results[4])


# ----------------------------------------------------------------- NaN / inf


def test_diverging_loss_stops_names_iteration_and_losses_and_keeps_the_last_good_checkpoint(tiny_digits, tmp_path):
    """Two good iterations are saved; resumed with an absurd learning rate (the config's
    optimizer settings win on resume) the weights blow up at iteration 2 and iteration 3's loss
    is NaN: one line naming the iteration and the loss values, exit code 3, nothing saved after
    the last good checkpoint, which still loads."""
    datasets = os.path.dirname(tiny_digits)
    out = tmp_path / "run"
    base = ["--config-file", "configs/retina_r18_fp32.py", *TINY, "train.eval_period=0"]
    (r,) = _run_all([base + ["train.max_iter=2", "train.checkpointer.period=1", f"train.output_dir={out}"]], datasets)
    assert r[0] == 0, r[2][-3000:]
    good = os.path.join(out, "model_final.pth")
    before = open(good, "rb").read()

    (r,) = _run_all([["--resume"] + base + ["train.max_iter=6", "optimizer.lr=1e38",
                                            "train.checkpointer.period=100", f"train.output_dir={out}"]], datasets)  # fmt: skip
    line = _one_line(r, code=3)
    assert "error: Training stopped: the loss became infinite or NaN at iteration 3 (loss_cls: nan" in line, line
    assert "loss_box_reg: " in line
    assert f"the last good checkpoint is {good} (last_checkpoint)" in line and "--resume" in line
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_final.pth"
    assert open(good, "rb").read() == before
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000000.pth", "model_0000001.pth", "model_final.pth"]  # fmt: skip
    state = torch.load(good, weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_checkpointer_hook_never_saves_non_finite_weights(tmp_path):
    """Weights that became inf/NaN (with a still finite loss) are not saved: FloatingPointError at
    the save, no final checkpoint after the failure, last_checkpoint keeps the good state."""
    from types import SimpleNamespace

    from hqod.engine import Checkpointer, TrainingDiverged
    from hqod.engine.hooks import SafePeriodicCheckpointer, diverged

    model = torch.nn.Linear(2, 2)
    hook = SafePeriodicCheckpointer(Checkpointer(model, str(tmp_path)), period=1)
    hook.trainer = SimpleNamespace(iter=0, start_iter=0, max_iter=3)
    hook.before_train()
    hook.after_step()
    hook.trainer.iter = 1
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="iteration=1") as e:
        hook.after_step()
    hook.after_train()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    msg = str(diverged(e.value, str(tmp_path)))
    assert isinstance(diverged(e.value, str(tmp_path)), TrainingDiverged)
    assert msg.startswith("Training stopped: the weights became infinite or NaN at iteration 1 (1 tensors, e.g. weight)")
    assert f"the last good checkpoint is {tmp_path / 'model_0000000.pth'}" in msg


# ----------------------------------------------------------------- images without instances


def _register_with_empty_images(tiny_digits, keep_every):
    """digits_tiny_* with the annotations of all images but every ``keep_every``-th removed
    (``keep_every=0``: all removed). Returns the names (train, val)."""
    names = []
    for split in ("train", "val"):
        name = f"digits_tiny_{split}_keep{keep_every}"
        if name not in DatasetCatalog.list():
            src = os.path.join(tiny_digits, "annotations", f"instances_{split}.json")
            data = json.load(open(src))
            keep = {im["id"] for i, im in enumerate(data["images"]) if keep_every and i % keep_every == 0}
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
            dst = os.path.join(os.path.dirname(src), f"instances_{split}_keep{keep_every}.json")
            json.dump(data, open(dst, "w"))
            register_coco_instances(name, {}, dst, os.path.join(tiny_digits, split))
        names.append(name)
    return names


def _tiny(config, output_dir, train, val, max_iter=2):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, config)), TINY)
    cfg.dataloader.train.dataset.names = train
    cfg.dataloader.test.dataset.names = val
    cfg.train.update(output_dir=str(output_dir), max_iter=max_iter, eval_period=max_iter, log_period=1)
    if cfg.get("quant") is not None:
        cfg.quant.calib_images = 2
        cfg.train.init_checkpoint = ""
    return cfg


@pytest.mark.parametrize("config", ["configs/fcos_r18_fp32.py", "configs/retina_r18_aqd_w4_hqod.py"])
def test_images_without_instances_train_and_evaluate(tiny_digits, tmp_path, config):
    """3 of 4 images without instances, kept for training (filter_empty=False) and in the
    evaluation set: training losses stay finite (detectron2 v0.6's FCOS used to crash on such
    images) and COCO evaluation runs."""
    train, val = _register_with_empty_images(tiny_digits, keep_every=4)
    cfg = _tiny(config, tmp_path, train, val, max_iter=3)
    cfg.dataloader.train.dataset.filter_empty = False
    cfg.train.metrics_window = 1
    torch.manual_seed(0)
    model = build_model(cfg)
    results = do_train(cfg, model)
    records = [json.loads(x) for x in open(tmp_path / "metrics.json") if "total_loss" in x]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    assert set(results["bbox"]) >= {"AP", "AP50"}
    again = do_test(cfg, model)  # evaluation alone, on the set with images without instances
    assert set(again["bbox"]) >= {"AP", "AP50"}


def test_training_set_without_any_instance_is_one_clear_message(tiny_digits, tmp_path):
    train, val = _register_with_empty_images(tiny_digits, keep_every=0)
    cfg = _tiny("configs/retina_r18_fp32.py", tmp_path, train, val)
    with pytest.raises(UserError, match=f"Training dataset {train} has no image with instances"):
        do_train(cfg, build_model(cfg))


# ----------------------------------------------------------------- output directory


def test_output_dir_holding_another_run_is_refused_or_resumed(tmp_path):
    run = str(tmp_path)
    cfg = _cfg("configs/retina_r18_fp32.py")
    LazyConfig.save(cfg, os.path.join(run, "config.yaml"))
    check_output_dir(run, resume=False, eval_only=False, cfg=cfg)  # no checkpoint yet: a new run
    open(os.path.join(run, "last_checkpoint"), "w").write("model_0000009.pth")

    with pytest.raises(UserError, match="already holds a training run .it has checkpoints.. Add --resume"):
        check_output_dir(run, resume=False, eval_only=False, cfg=cfg)
    check_output_dir(run, resume=True, eval_only=False, cfg=cfg)
    check_output_dir(run, resume=False, eval_only=True, cfg=cfg)

    other = _cfg("configs/fcos_r18_fp32.py")
    with pytest.raises(UserError, match="already holds a training run of a different config .model._target_: "):
        check_output_dir(run, resume=False, eval_only=False, cfg=other)
    with pytest.raises(UserError, match="--resume: output directory .* holds a run of another model"):
        check_output_dir(run, resume=True, eval_only=False, cfg=other)
    quantized = _cfg("configs/retina_r18_lsq_w4.py")
    with pytest.raises(UserError, match="quant.act_bits: '<absent>' -> 4"):
        check_output_dir(run, resume=True, eval_only=False, cfg=quantized)
    # continuing the same run with a longer schedule or another learning rate is allowed
    longer = _cfg("configs/retina_r18_fp32.py", "train.max_iter=5000", "optimizer.lr=0.001")
    check_output_dir(run, resume=True, eval_only=False, cfg=longer)
