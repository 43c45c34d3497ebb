"""Exact resume: a QAT run killed with SIGKILL and restarted with --resume ends bit for bit where an
uninterrupted run ends; checkpoints are written atomically; the training data stream resumes at
the batch of the iteration (hqod.data.loader)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hqod.data.loader import ResumableTrainLoader
from hqod.engine import Checkpointer, ExtraTrainingState, build_model, load_config, track_loss_normalizers

from helpers import ROOT, tiny_overrides

TINY = tiny_overrides()


def _cmd(*args):
    return [sys.executable, os.path.join(ROOT, "tools/train_net.py"), *args]


def _env(datasets):
    return dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")


def _losses(output_dir):
    """The last record of each iteration in metrics.json (a resumed run appends)."""
    out = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            r = json.loads(line)
            if "total_loss" in r:
                out[r["iteration"]] = r["total_loss"]
    return out


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """An FP32 RetinaNet-R18 (FPN width 32) checkpoint to start QAT from (random weights: exact
    resume does not depend on them)."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs/retina_r18_fp32.py"), ["model.backbone.out_channels=32"])
    path = str(tmp_path_factory.mktemp("fp32") / "model_final.pth")
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def test_sigkill_then_resume_reaches_the_uninterrupted_weights_exactly(tiny_digits, fp32_checkpoint, tmp_path):
    """AQD W4 + HQOD QAT, 6 iterations, checkpoints every 2, deterministic mode. Run B is killed
    (SIGKILL) after its checkpoint of iteration 1 is written and resumed with --resume: its final
    weights, quantizer steps, BN statistics, optimizer state, loss normalizer and losses are
    bit-identical to run A's (tolerance: none)."""
    datasets = os.path.dirname(tiny_digits)
    common = ["--config-file", "configs/retina_r18_aqd_w4_hqod.py", *TINY,
              f"train.init_checkpoint={fp32_checkpoint}", "quant.calib_images=4", "train.max_iter=6",
              "train.checkpointer.period=2", "train.eval_period=0", "train.log_period=1",
              "train.metrics_window=1", "train.deterministic=True"]  # fmt: skip
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = subprocess.run(_cmd(*common, f"train.output_dir={a}"), capture_output=True, text=True,
                       env=_env(datasets), cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(_cmd(*common, f"train.output_dir={b}"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=_env(datasets), cwd=ROOT)  # fmt: skip
    tag = os.path.join(b, "last_checkpoint")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.isfile(tag) and open(tag).read().strip() == "model_0000001.pth":
            break
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(b, "model_final.pth")), "killed too late to test resuming"

    r = subprocess.run(_cmd("--resume", *common, f"train.output_dir={b}"), capture_output=True,
                       text=True, env=_env(datasets), cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting training from iteration 2" in open(os.path.join(b, "log.txt")).read()

    ca = torch.load(os.path.join(a, "model_final.pth"), weights_only=False)
    cb = torch.load(os.path.join(b, "model_final.pth"), weights_only=False)
    assert ca["model"].keys() == cb["model"].keys()
    differ = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    assert not differ, differ[:10]
    steps = [k for k in ca["model"] if k.endswith((".interval", ".scale", ".log2_threshold"))]
    assert len(steps) > 50  # the quantizer steps are among the compared tensors
    assert ca["trainer"]["iteration"] == cb["trainer"]["iteration"] == 5
    sa, sb = ca["trainer"]["optimizer"]["state"], cb["trainer"]["optimizer"]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert ca["training_state"]["loss_normalizers"] == cb["training_state"]["loss_normalizers"]
    assert list(ca["training_state"]["loss_normalizers"]) == ["loss_normalizers.loss_normalizer"]
    assert ca["data_loader"]["seed"] == cb["data_loader"]["seed"]
    la, lb = _losses(a), _losses(b)
    # the record of iteration 1 may die with the process (the writer hook runs after the
    # checkpointer); every iteration of the resumed process is there
    assert sorted(la) == list(range(6)) and set(range(2, 6)) <= set(lb)
    assert all(lb[i] == la[i] for i in lb)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while a checkpoint is written leaves the previous checkpoint as last_checkpoint
    (and loadable), and no partial file under a checkpoint name."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ckpt = Checkpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000003")
    monkeypatch.setattr(torch, "save", real_save)

    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    Checkpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(fresh.state_dict()[k], good[k]) for k in good)

    ckpt.save("model_0000003")  # and the next save works
    assert open(tmp_path / "last_checkpoint").read() == "model_0000003.pth"


def test_loss_normalizers_are_detectron2s_ema_in_buffers_and_restored():
    """A tracked detector's loss-normalizer EMA equals detectron2's own, bit for bit; it lives
    in a buffer of its LossNormalizers (in no model file) and is checkpointed as training state."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    class Detector(RetinaNet):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.conv = torch.nn.Conv2d(1, 1, 1)

    ours, reference = Detector(), Detector()
    assert track_loss_normalizers(ours) == 1 and track_loss_normalizers(ours) == 0
    for positives in (30, 50, 7):
        assert ours._ema_update("loss_normalizer", positives, 100) == reference._ema_update("loss_normalizer", positives, 100)
    assert ours.loss_normalizer == reference.loss_normalizer == pytest.approx(80.53, abs=1e-12)  # 93, 88.7, 80.53
    assert set(ours.state_dict()) == {"conv.weight", "conv.bias"}  # model files stay detectron2's
    state = ExtraTrainingState(ours).state_dict()
    assert state["loss_normalizers"] == {"loss_normalizers.loss_normalizer": ours.loss_normalizer}
    resumed = Detector()
    track_loss_normalizers(resumed)
    ExtraTrainingState(resumed).load_state_dict(state)
    assert resumed._ema_update("loss_normalizer", 9, 100) == reference._ema_update("loss_normalizer", 9, 100)


def _loader(dicts, batch, seed=7):
    def mapper(d):
        return (d["id"], float(np.random.rand()))  # image id and one random "augmentation"

    return ResumableTrainLoader(dicts, mapper=mapper, total_batch_size=batch, seed=seed)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_data_stream_resumes_at_the_batch_of_the_iteration():
    """Batches from iteration t on equal the batches t, t+1, ... of a stream read from the start
    (same images, same random augmentations), with aspect-ratio grouping leaving partial
    buckets behind, across epochs; and 2 processes with batch 2 together read the images and
    augmentations of 1 process with batch 4 when all images share an aspect-ratio group."""
    dicts = [{"id": i, "width": 100 + (i % 3) * 20, "height": 110} for i in range(11)]
    full = _take(_loader(dicts, 4), 12)  # 48 images: more than 4 epochs of 11
    for t in (1, 5, 9):
        resumed = _loader(dicts, 4)
        resumed.set_start_iter(t)
        assert _take(resumed, 3) == full[t : t + 3]
    assert all(len({dicts[i]["width"] > 110 for i, _ in b}) == 1 for b in full)  # grouped

    square = [{"id": i, "width": 128, "height": 128} for i in range(10)]
    one = _take(_loader(square, 4), 6)
    ranks = []
    for rank in range(2):
        loader = _loader(square, 4)
        loader.world_size, loader.rank, loader.batch_size = 2, rank, 2
        ranks.append(_take(loader, 6))
    for t in range(6):
        assert sorted(ranks[0][t] + ranks[1][t]) == sorted(one[t])
