"""Checkpoints from elsewhere are data, not code (issue 15): every loader reads with
``torch.load(weights_only=True)`` and the types our own files hold; a file carrying a pickled
callable is refused with one message and nothing in it runs; ``HQOD_TRUST_CHECKPOINTS=1`` loads
it anyway, with a warning; our own training, quantized and integer-model files still load."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import SimpleTrainer, hooks
from detectron2.solver import LRMultiplier
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import MultiStepParamScheduler

from hqod.data.loader import ResumableTrainLoader
from hqod.engine import Checkpointer, ExtraTrainingState, LossNormalizers, UserError, read_checkpoint
from hqod.quantization import (
    calibrate,
    load_integer_model,
    quantize_model,
    save_integer_model,
    to_integer,
)
from hqod.quantization.integer import INTEGER_FORMAT
from hqod.quantization.multilevel import shared_bn_keys
from hqod.quantization.checkpoint import (
    TRUST_ENV,
    UntrustedCheckpointError,
    checkpoint_globals,
    load_torch_file,
)

from helpers import ROOT

AQD_W2 = {"method": "lq", "scope": "aqd", "weight_bits": 2, "act_bits": 2}
CALLS = []  # what the pickled callable did


def record(marker):
    """The "malicious" callable: records that it ran (a list entry and a marker file)."""
    CALLS.append(marker)
    open(marker, "w").close()
    return marker


class Payload:
    """Unpickles as ``record(marker)``, as a hostile checkpoint would call anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return record, (self.marker,)


class OpenMarker(Payload):
    """Unpickles as ``open(marker, "w")``: importable in any process (the CLI test)."""

    def __reduce__(self):
        return open, (self.marker, "w")


RECORD = f"{record.__module__}.record"


@pytest.fixture(autouse=True)
def fresh_calls(monkeypatch):
    CALLS.clear()
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture
def weights_only_calls(monkeypatch):
    """The ``weights_only`` argument of every torch.load call."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# ------------------------------------------------------------------------------------------
# Our own files
# ------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.loss_normalizers = LossNormalizers()

    def forward(self, batch):
        x = torch.tensor([v for _, v in batch], dtype=torch.float32).view(1, 1, 1, -1)
        return {"loss": self.bn(self.conv(x)).pow(2).mean() + self.conv.weight.sum()}


def toy_trainer(seed, folder):
    model = Toy()
    dicts = [{"id": i, "width": 100, "height": 100} for i in range(5)]
    loader = ResumableTrainLoader(dicts, mapper=lambda d: (d["id"], float(np.random.rand())), total_batch_size=2, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = SimpleTrainer(model, loader, opt)
    sched = LRMultiplier(opt, MultiStepParamScheduler([1.0, 0.1], milestones=[2], num_updates=4), max_iter=4)
    trainer.register_hooks([hooks.LRScheduler(scheduler=sched)])
    checkpointer = Checkpointer(model, folder, trainer=trainer, training_state=ExtraTrainingState(model), data_loader=loader)
    return model, trainer, checkpointer


def test_training_checkpoint_loads_as_data_and_resumes(tmp_path, weights_only_calls):
    """A Checkpointer file with model, optimizer, scheduler, iteration, loss normalizer, the
    Python/NumPy/torch random states and the data stream: read with weights_only (NumPy's state
    needs the allow-list), and a resumed trainer gets every piece back."""
    torch.manual_seed(0)
    model, trainer, ckpt = toy_trainer(7, str(tmp_path))
    trainer.train(0, 3)
    model.loss_normalizers.set("loss_normalizer", 42.5)
    ckpt.save("model_0000002", iteration=trainer.iter)
    path = str(tmp_path / "model_0000002.pth")
    next_draws = (np.random.rand(3), random.random(), torch.rand(2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()]

    pickled = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert pickled and all(g.startswith("numpy.") for g in pickled), pickled  # the RNG state
    data = read_checkpoint(path)
    assert weights_only_calls == [True]
    assert data["iteration"] == data["trainer"]["iteration"] == 3
    assert data["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 3
    assert data["data_loader"]["seed"] == 7 and data["training_state"]["loss_normalizers"] == {"loss_normalizers.loss_normalizer": 42.5}
    assert data["training_state"]["rng"]["numpy"][1].dtype == np.uint32

    np.random.seed(123), random.seed(123), torch.manual_seed(123)
    model2, trainer2, ckpt2 = toy_trainer(99, str(tmp_path))
    ckpt2.resume_or_load("", resume=True)
    assert weights_only_calls == [True, True]
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
    assert trainer2.iter == 3 and trainer2._hooks[0].scheduler.last_epoch == 3
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(trainer2.optimizer.state.values(), momentum))
    assert model2.loss_normalizers.values() == {"loss_normalizer": 42.5} and trainer2.data_loader.seed == 7
    np_draw, py_draw, torch_draw = next_draws
    assert np.array_equal(np.random.rand(3), np_draw) and random.random() == py_draw
    assert torch.equal(torch.rand(2), torch_draw)


def synthetic_batch(seed, size=96):
    """Two random images (two: training-mode BN needs more than the one value of P7 per channel)."""
    g = torch.Generator().manual_seed(seed)
    inst = Instances((size, size), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]])), gt_classes=torch.tensor([1]))
    return [
        {"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst, "height": size, "width": size}
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """An FCOS-R18 (width 32, 3 classes) saved by the Checkpointer as FP32 (``fp32.pth``),
    AQD W2A2-quantized and calibrated, saved again (``qat.pth``); and its integer model."""
    torch.manual_seed(0)
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/fcos_r18_fp32.py"))
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    cfg.model.test_score_thresh = 0.0  # detections to compare
    model = instantiate(cfg.model)
    model.train()
    with torch.no_grad(), EventStorage():
        model(synthetic_batch(seed=1))
    folder = str(tmp_path_factory.mktemp("detectors"))
    Checkpointer(model, folder).save("fp32")
    cfg.quant = dict(AQD_W2)
    quantize_model(model, cfg.quant)
    calibrate(model, [synthetic_batch(seed=2)], num_images=2)
    model.eval()
    Checkpointer(model, folder).save("qat")
    return cfg, folder, model, to_integer(model)


def test_fp32_and_quantized_checkpoints_load_as_data(detectors, weights_only_calls):
    cfg, folder, model, _ = detectors
    fp32 = read_checkpoint(os.path.join(folder, "fp32.pth"))["model"]
    fresh = quantize_model(instantiate(cfg.model), dict(AQD_W2))
    Checkpointer(fresh, strict=True).load(os.path.join(folder, "fp32.pth"))
    loaded, shared = fresh.state_dict(), shared_bn_keys(fresh, fp32)
    assert shared and all(torch.equal(loaded[k], v) for k, v in fp32.items() if k not in shared)
    for key in shared:  # shared BN copied to every FPN level
        prefix, _, name = key.rpartition(".")
        assert all(torch.equal(loaded[f"{prefix}.{level}.{name}"], fp32[key]) for level in range(5))

    Checkpointer(fresh, strict=True).load(os.path.join(folder, "qat.pth"))
    theirs, ours = fresh.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert len([k for k in ours if k.endswith(".interval")]) > 30  # quantizer state came too
    assert weights_only_calls == [True] * 3


def test_integer_model_loads_as_data(detectors, tmp_path, weights_only_calls):
    """The file is the config and the fake-quant state dict (no pickled class); loading rebuilds
    the same integers."""
    cfg, _, model, int_model = detectors
    path = str(tmp_path / "model_integer.pth")
    save_integer_model(model, cfg, path, config_file="configs/fcos_r18_aqd_w2.py", overrides=["a=1"])
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []

    loaded = load_integer_model(path)
    assert weights_only_calls == [True]
    assert type(loaded) is type(int_model) and not loaded.training
    assert loaded.metadata == {"config_file": "configs/fcos_r18_aqd_w2.py", "overrides": ["a=1"]}
    assert list(loaded.head_in_features) == list(int_model.head_in_features) == ["p3", "p4", "p5", "p6", "p7"]
    batch = synthetic_batch(seed=3)
    with torch.no_grad():
        x = int_model.preprocess_image(batch).tensor
        a, b = int_model.backbone(x), loaded.backbone(x)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.int64 for k in a)
        ours, theirs = int_model(batch)[0]["instances"], loaded(batch)[0]["instances"]
    assert len(ours) > 0 and torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    assert torch.equal(ours.scores, theirs.scores)


def test_format_1_integer_model_is_refused_with_the_command(detectors, tmp_path):
    """A file of format 1 (the pickled integer module of earlier versions) is refused before
    anything is unpickled, with the command that exports it again."""
    *_, int_model = detectors
    path = str(tmp_path / "v1.pth")
    torch.save({"format": INTEGER_FORMAT, "version": 1, "model": int_model, "metadata": {}}, path)
    with pytest.raises(ValueError) as e:
        load_integer_model(path)
    assert str(e.value) == (
        f"{path} is an integer model of format 1 (a pickled module, written by an earlier version); "
        "integer models are now rebuilt from their config and trained weights. Export it again "
        "from its fake-quant checkpoint: python tools/export_integer.py --config-file <config> "
        "--checkpoint <model_final.pth>"
    )


def test_refusal_names_a_type_the_pickle_builds_without_a_global(tmp_path):
    """NumPy's dtype class is built, not named, by the pickle: the message names it all the same."""
    path = str(tmp_path / "array.pth")
    torch.save({"keys": np.arange(5, dtype=np.uint32)}, path)
    without_dtype_class = [g for g in checkpoint_globals() if g is not type(np.dtype(np.uint32))]
    with pytest.raises(UntrustedCheckpointError, match=f"holds {type(np.dtype(np.uint32)).__module__}.UInt32DType,"):
        load_torch_file(path, without_dtype_class)
    assert np.array_equal(load_torch_file(path, checkpoint_globals())["keys"], np.arange(5))


def test_legacy_format_file_is_refused_by_name(tmp_path):
    """torch.save's pre-zip format has no static read: the name comes from the unpickler."""
    path, marker = str(tmp_path / "legacy.pth"), str(tmp_path / "ran")
    torch.save({"note": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError, match=f"holds {RECORD},"):
        load_torch_file(path)
    assert CALLS == [] and not os.path.exists(marker)


# ------------------------------------------------------------------------------------------
# Hostile files
# ------------------------------------------------------------------------------------------
@pytest.fixture
def hostile(tmp_path, detectors):
    """``hostile(kind)``: a training checkpoint (a Toy's weights) or an integer-model file (a
    real one, via save_integer_model) that also carries a Payload; returns (path, marker)."""
    cfg, _, model, _ = detectors
    toy = Toy()

    def make(kind):
        marker = str(tmp_path / f"{kind}.ran")
        path = str(tmp_path / f"{kind}.pth")
        if kind == "training":
            torch.save({"model": toy.state_dict(), "trainer": {"iteration": 5}, "note": Payload(marker)}, path)
        else:
            save_integer_model(model, cfg, path, note=Payload(marker))
        return path, marker

    make.toy_state = toy.state_dict()
    return make


LOADERS = {
    "read_checkpoint": ("training", UserError, read_checkpoint),
    "Checkpointer.load": ("training", UserError, lambda path: Checkpointer(Toy()).load(path)),
    "load_integer_model": ("integer", ValueError, load_integer_model),
}


@pytest.mark.parametrize("trust", [None, "0"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_hostile_checkpoint_is_refused_and_nothing_runs(loader, trust, hostile, monkeypatch):
    kind, error, load = LOADERS[loader]
    path, marker = hostile(kind)
    if trust is not None:
        monkeypatch.setenv(TRUST_ENV, trust)
    with pytest.raises(error) as e:
        load(path)
    message = str(e.value)
    assert message == (
        f"Checkpoint {path} was not loaded: it holds {RECORD}, beyond the tensors and data types "
        "of hqod's checkpoints, and unpickling it could run code. If you trust the file's "
        f"source, load it with the environment variable {TRUST_ENV}=1."
    )
    # one message: torch's (which advises weights_only=False) is neither cause nor context shown
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    assert CALLS == [] and not os.path.exists(marker)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_trusted_hostile_checkpoint_loads_with_a_warning(loader, hostile, monkeypatch):
    kind, _, load = LOADERS[loader]
    path, marker = hostile(kind)
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(UserWarning) as warned:
        out = load(path)
    ours = [str(w.message) for w in warned if TRUST_ENV in str(w.message)]
    assert ours == [f"{TRUST_ENV}=1: loading {path} by full unpickling (it holds {RECORD}); any code it carries runs."]
    assert CALLS == [marker] and os.path.exists(marker)  # it did run: trusted means that
    if loader == "read_checkpoint":
        assert out["note"] == marker and out["trainer"] == {"iteration": 5}
        assert all(torch.equal(out["model"][k], v) for k, v in hostile.toy_state.items())
    elif loader == "Checkpointer.load":
        assert out["note"] == marker and out["trainer"] == {"iteration": 5}
    else:
        assert out.metadata == {"note": marker} and out.__class__.__name__ == "FCOS"


def test_trust_setting_leaves_our_own_files_on_the_safe_path(detectors, tmp_path, recwarn, monkeypatch):
    cfg, folder, model, _ = detectors
    path = str(tmp_path / "model_integer.pth")
    save_integer_model(model, cfg, path)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_checkpoint(os.path.join(folder, "qat.pth"))["model"]
    assert load_integer_model(path).metadata == {}
    assert not [w for w in recwarn if TRUST_ENV in str(w.message)]


def test_train_net_refuses_a_hostile_checkpoint_in_one_line(tmp_path):
    marker, path = str(tmp_path / "ran"), str(tmp_path / "model_final.pth")
    torch.save({"model": {}, "x": OpenMarker(marker)}, path)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", "configs/retina_r18_fp32.py",
         "--eval-only", f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "was not loaded" in x]
    assert len(lines) == 1 and path in lines[0] and "io.open" in lines[0] and f"{TRUST_ENV}=1" in lines[0]
    assert not os.path.exists(marker)
