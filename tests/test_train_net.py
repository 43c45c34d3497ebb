"""tools/train_net.py from the command line: a run, its outputs, evaluation of its checkpoint,
one clear error (exit code 2, no traceback) for each user mistake, and the traceback of a bug."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, tiny_overrides

TINY = tiny_overrides()


def train_net(*args, datasets=None, timeout=600):
    env = dict(os.environ)
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = str(datasets)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def datasets_dir(tiny_digits):
    return os.path.dirname(tiny_digits)  # holds digits/, as $DETECTRON2_DATASETS does


def test_train_then_eval_only_then_guarded_output_dir(datasets_dir, tmp_path):
    out = str(tmp_path / "run")
    cfg = ["--config-file", "configs/retina_r18_fp32.py"]
    common = TINY + [f"train.output_dir={out}", "train.max_iter=4", "train.eval_period=4"]
    r = train_net(*cfg, *common, "train.checkpointer.period=2", datasets=datasets_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("AP,AP50,AP75,APs,APm,APl", "eta:"):
        assert line in r.stdout + r.stderr
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json", "config.yaml"} <= set(
        os.listdir(out)
    )
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.json"))]
    assert max(r["iteration"] for r in records if "total_loss" in r) == 3  # 4 iterations
    assert any("bbox/AP50" in r for r in records)

    r = train_net(*cfg, "--eval-only", *TINY, f"train.init_checkpoint={out}/model_final.pth",
                  f"train.output_dir={tmp_path / 'eval'}", datasets=datasets_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AP,AP50,AP75,APs,APm,APl" in r.stdout + r.stderr

    # The same output directory again: refused without --resume, nothing overwritten.
    before = os.path.getmtime(os.path.join(out, "model_final.pth"))
    r = train_net(*cfg, *common, datasets=datasets_dir)
    assert r.returncode == 2 and "already holds a training run" in r.stderr and "--resume" in r.stderr
    assert os.path.getmtime(os.path.join(out, "model_final.pth")) == before


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config-file", "configs/nope.py"], "Config file configs/nope.py does not exist"),
        (["--config-file", "configs/retina_r18_fp32.py", "train.max_itr=3"],
         "Unknown config key 'train.max_itr' in override 'train.max_itr=3'. Did you mean: train.max_iter"),
        (["--config-file", "configs/retina_r18_fp32.py", "dataloader.dataset=cityscapes"],
         "Unknown dataset preset 'cityscapes'"),
        (["--config-file", "configs/retina_r18_fp32.py", "--eval-only",
          "train.init_checkpoint=/nonexistent/model.pth"], "Checkpoint /nonexistent/model.pth does not exist"),
    ],
)  # fmt: skip
def test_user_errors_are_one_clear_line(args, expected, tmp_path):
    r = train_net(*args, f"train.output_dir={tmp_path}", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_fp32_checkpoint_names_the_command_that_makes_it(datasets_dir, tmp_path):
    r = train_net("--config-file", "configs/retina_r18_aqd_w2_hqod.py", *TINY,
                  f"train.init_checkpoint={tmp_path}/retina_r18_fp32/model_final.pth",
                  f"train.output_dir={tmp_path / 'qat'}", datasets=datasets_dir, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not exist. Train it first: python tools/train_net.py --config-file " \
        "configs/retina_r18_fp32.py" in r.stderr


def test_missing_and_corrupt_datasets_say_how_to_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = train_net("--config-file", "configs/retina_r18_fp32.py", "dataloader.dataset=coco",
                  f"train.output_dir={tmp_path / 'o1'}", datasets=empty, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Dataset 'coco_2017_train'" in r.stderr and "datasets/README.md" in r.stderr

    bad = tmp_path / "bad" / "digits"
    (bad / "annotations").mkdir(parents=True)
    (bad / "train").mkdir()
    (bad / "annotations" / "instances_train.json").write_text('{"images": [')
    r = train_net("--config-file", "configs/retina_r18_fp32.py", f"train.output_dir={tmp_path / 'o2'}",
                  datasets=bad.parent, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a valid COCO JSON file" in r.stderr and "tools/generate_digits.py" in r.stderr


def train_net_with_bug(error, *args):
    """tools/train_net.py whose build_model raises ``error`` (Python source): a bug in our code,
    not a mistake of the user's."""
    code = (
        "import runpy, hqod.engine\n"
        f"def build_model(cfg):\n    raise {error}\n"
        "hqod.engine.build_model = build_model\n"
        "runpy.run_path('tools/train_net.py', run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize(
    "error, last_line",
    [
        ("KeyError('head.num_anchors')", "KeyError: 'head.num_anchors'"),
        ("FileNotFoundError(2, 'No such file or directory', '/tmp/hqod-cache.json')",
         "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/hqod-cache.json'"),
    ],
)  # fmt: skip
def test_internal_key_and_file_errors_keep_their_traceback(error, last_line, tmp_path):
    r = train_net_with_bug(error, "--config-file", "configs/retina_r18_fp32.py", f"train.output_dir={tmp_path}")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback (most recent call last)" in r.stderr and "in build_model" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == last_line
    assert "error: " not in r.stderr


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    args = ["--config-file", "configs/nope.py", f"train.output_dir={tmp_path}"]
    r = train_net("--debug", *args, timeout=120)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "hqod.engine.defaults.UserError: Config file configs/nope.py does not exist (see configs/ for the list)."
    )
    r = train_net(*args, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("error: ")] == [
        "error: Config file configs/nope.py does not exist (see configs/ for the list)."
    ]
