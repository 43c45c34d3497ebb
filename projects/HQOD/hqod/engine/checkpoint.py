"""
hqod's checkpointer: detectron2's DetectionCheckpointer with atomic writes, one clear error for
unreadable or non-matching checkpoints, torchvision ResNet checkpoints, FP32 detectors loaded
into their quantized model (QAT's start), and the training state that is not in any state dict
(:class:`ExtraTrainingState`).
"""
import glob
import logging
import os
import random
import re

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from hqod.modeling.backbone import resnet_depth
from hqod.pretrain import convert_command, pretrain_command
from hqod.quantization import Quantizer
from hqod.quantization.checkpoint import UntrustedCheckpointError, checkpoint_globals, load_torch_file
from hqod.quantization.multilevel import shared_bn_keys

from .defaults import UserError
from .loss_normalizers import LossNormalizers

logger = logging.getLogger("hqod")


def _is_torchvision_resnet(state_dict):
    return isinstance(state_dict, dict) and "conv1.weight" in state_dict and any(
        k.startswith("layer1.") for k in state_dict
    )


def torchvision_resnet_to_d2(state_dict):
    """Rename a torchvision ResNet state dict to detectron2's ResNet names (as detectron2's
    tools/convert-torchvision-to-d2.py does); the classifier ``fc`` is dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc."):
            continue
        k = re.sub(r"^conv1\.", "stem.conv1.", k)
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
        k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
        k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[k] = v
    return out


def torchvision_mobilenet_v2_to_ours(state_dict):
    """Rename a torchvision MobileNetV2 state dict (``features.<i>...``) to
    :class:`hqod.modeling.MobileNetV2`'s names (``stem``, ``layer<s>.<b>.conv.<c>``,
    ``conv_last``; each conv's BN under ``.norm``); the classifier is dropped. torchvision's block
    holds its ConvBNReLU6 units (``conv.<c>.0`` conv, ``conv.<c>.1`` BN), then the projection conv
    and its BN as two entries; ours one detectron2 Conv2d per conv."""
    from hqod.modeling.mobilenet import MobileNetV2

    blocks = [(f"layer{s}.{b}", t) for s, (t, _, n, _) in enumerate(MobileNetV2.STAGES, start=1) for b in range(n)]
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^features\.(\d+)\.(.*)$", k)
        if m is None:
            continue  # the classifier
        index, rest = int(m.group(1)), m.group(2)
        if index == 0 or index == len(blocks) + 1:  # the stem, the last 1x1 conv: "<0|1>.<param>"
            unit = "stem" if index == 0 else "conv_last"
            sub, param = rest.split(".", 1)
            out[f"{unit}.{param}" if sub == "0" else f"{unit}.norm.{param}"] = v
            continue
        block, expand_ratio = blocks[index - 1]
        units = 1 if expand_ratio == 1 else 2  # ConvBNReLU6 units before the projection
        parts = rest.split(".")  # conv.<c>.<0|1>.<param> or conv.<c>.<param>
        c = int(parts[1])
        if c < units:
            out[f"{block}.conv.{c}.{parts[3]}" if parts[2] == "0" else f"{block}.conv.{c}.norm.{parts[3]}"] = v
        else:  # the projection conv (c == units) and its BN (c == units + 1)
            out[f"{block}.conv.{units}.{parts[2]}" if c == units else f"{block}.conv.{units}.norm.{parts[2]}"] = v
    return out


def read_checkpoint(path):
    """A checkpoint file, on CPU, read as data (:func:`hqod.quantization.checkpoint.load_torch_file`
    with the types our checkpoints hold). One :class:`UserError` naming the file when it holds
    other objects (unpickling them could run code; ``HQOD_TRUST_CHECKPOINTS=1`` loads it from a
    source you trust, with a warning) or is truncated or corrupt (instead of a zip/pickle
    traceback)."""
    try:
        return load_torch_file(path, checkpoint_globals())
    except UntrustedCheckpointError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # zipfile / pickle / EOF / "PytorchStreamReader failed ..."
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"Checkpoint {path} ({size:,} bytes) cannot be read: it is truncated or corrupt "
            f"({reason}). Use another checkpoint (e.g. an earlier model_*.pth of the run)."
        ) from e


def _atomic_write(path, write):
    """``write(file)`` into a temporary file of the same folder, flushed to disk, then renamed
    onto ``path``: readers see the old file or the complete new one, never a partial one."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _unwrap(model):
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class ExtraTrainingState:
    """
    Checkpointable (``state_dict`` / ``load_state_dict``) for what a resumed run needs and the
    model's state dict does not hold:

    * the loss-normalizer EMAs of the detector (the buffers of its :class:`LossNormalizers`,
      :mod:`hqod.engine.loss_normalizers`; a resumed run would otherwise restart them from
      their initial value);
    * the random generators of the main process (Python, NumPy, torch): restored in the main
      process only (other processes keep their own seeds). The training data does not depend
      on them (:mod:`hqod.data.loader` seeds augmentations by stream position).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def _loss_normalizers(self):
        return {n: m for n, m in _unwrap(self.model).named_modules() if isinstance(m, LossNormalizers)}

    def state_dict(self):
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        normalizers = {
            f"{name}.{key}" if name else key: value
            for name, m in self._loss_normalizers().items() for key, value in m.values().items()
        }  # fmt: skip
        return {"loss_normalizers": normalizers, "rng": rng}

    def load_state_dict(self, state):
        owners = self._loss_normalizers()
        for key, value in state.get("loss_normalizers", {}).items():
            name, _, attr = key.rpartition(".")
            if name in owners:
                owners[name].set(attr, value)
        rng = state.get("rng")
        if rng and comm.is_main_process():
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


class Checkpointer(DetectionCheckpointer):
    """
    detectron2's DetectionCheckpointer that

    * writes checkpoints atomically: the file goes to a temporary name in the same folder and
      is renamed when complete, and ``last_checkpoint`` is updated (also atomically) only after,
      so a run killed mid-write resumes from the previous, complete checkpoint;
    * says in one line when a checkpoint does not exist or cannot be read (truncated, corrupt);
    * with ``strict=True`` (evaluation, QAT's start), refuses a checkpoint that does not fit the
      model (shape mismatches, found before anything is loaded, or missing keys): it belongs to
      another architecture;
    * loads an FP32 checkpoint into the quantized model of the same config: the keys are the
      same (a shared or per-level BN of a head goes to every level of its multi-level BN, see
      :mod:`hqod.quantization.multilevel`), and the quantizer state it cannot hold is reported
      as awaiting calibration, not as missing;
    * loads torchvision ResNet checkpoints (``.pth`` from torchvision.models, as
      ``train.init_checkpoint``) into the backbone;
    * refuses a checkpoint whose ResNet has another depth than the model's, naming both.
    """

    def __init__(self, model, save_dir="", *, strict=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(
                f"Checkpoint {path} does not exist. Set train.init_checkpoint to an existing "
                'file (or to "" to train from scratch).'
            )
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith((".pth", ".pt")):
            loaded = read_checkpoint(filename)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
            if _is_torchvision_resnet(state):
                return {
                    "model": torchvision_resnet_to_d2(state),
                    "__author__": "torchvision",
                    "matching_heuristics": True,
                }
            if not isinstance(loaded, dict):
                raise UserError(f"Checkpoint {filename} holds a {type(loaded).__name__}, not a state dict.")
            if "model" not in loaded:
                loaded = {"model": loaded}
            return loaded
        return super()._load_file(filename)

    def _load_model(self, checkpoint):
        path = getattr(self, "_loading", "the checkpoint")
        state = checkpoint.get("model", {})
        theirs = resnet_depth(state.keys())
        model_state = self.model.state_dict()
        ours = resnet_depth(model_state.keys())
        if theirs and ours and theirs != ours:
            raise UserError(
                f"Checkpoint {path} holds a ResNet-{theirs} backbone but the model's backbone is "
                f"ResNet-{ours} (model.backbone.bottom_up.stages.depth={ours}): use a ResNet-{ours} "
                f"checkpoint (embedded dataset: {pretrain_command(ours)}; COCO/VOC: "
                f"{convert_command(ours)}), or set the depth to {theirs}."
            )
        if self.strict and not checkpoint.get("matching_heuristics"):  # before anything loads
            strip = len("module.") if state and all(k.startswith("module.") for k in state) else 0
            shapes = {k[strip:]: tuple(v.shape) for k, v in state.items()}
            self._refuse_shapes(path, [
                (k, shape, tuple(model_state[k].shape))
                for k, shape in shapes.items() if k in model_state and shape != tuple(model_state[k].shape)
            ])  # fmt: skip
        # (fvcore's Checkpointer keeps the model unwrapped from DDP)
        quantizers = tuple(f"{n}." for n, m in self.model.named_modules() if isinstance(m, Quantizer))
        fp32_into_quantized = bool(quantizers) and not any(k.startswith(quantizers) for k in model_state if k in state)
        expanded = shared_bn_keys(self.model, state) if fp32_into_quantized else []
        incompatible = super()._load_model(checkpoint)
        if incompatible is None:
            return None
        if fp32_into_quantized:
            awaiting = [k for k in incompatible.missing_keys if k.startswith(quantizers)]
            incompatible = incompatible._replace(missing_keys=[k for k in incompatible.missing_keys if k not in awaiting])
            self.logger.info(
                f"Loaded the FP32 checkpoint {path} into the quantized model: {len(awaiting)} quantizer "
                f"entries await calibration; {len(expanded)} shared BN entries copied to every FPN level."
            )
        if self.strict:
            self._refuse_shapes(path, getattr(incompatible, "incorrect_shapes", []))
            missing = list(incompatible.missing_keys)
            if missing:
                raise UserError(
                    f"Checkpoint {path} lacks {len(missing)} of the model's "
                    f"{len(model_state)} entries (e.g. {', '.join(sorted(missing)[:3])}); "
                    "it belongs to another architecture or is not a full checkpoint of this config."
                )
        return incompatible

    @staticmethod
    def _refuse_shapes(path, shapes):
        if shapes:
            k, ckpt_shape, model_shape = shapes[0]
            raise UserError(
                f"Checkpoint {path} does not fit this model: {len(shapes)} shape mismatches "
                f"(e.g. {k}: checkpoint {tuple(ckpt_shape)} vs model {tuple(model_shape)}); it "
                "belongs to another architecture (detector, depth, width or classes)."
            )

    def save(self, name, **kwargs):
        """fvcore's ``save`` with an atomic write of the file and then of ``last_checkpoint``."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        if "://" in self.save_dir:  # remote storage: no rename; fvcore's way
            with self.path_manager.open(save_file, "wb") as f:
                torch.save(data, f)
            return super().tag_last_checkpoint(basename)
        for stale in glob.glob(os.path.join(self.save_dir, f".{basename}.tmp.*")):
            os.remove(stale)  # left by a process killed mid-write
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        _atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )
