"""
Loading an FP32 detector checkpoint into its quantized model, and reading checkpoint files as
data.

``quantize_model`` keeps every FP32 parameter/buffer name, so the mapping FP32 -> QAT keys is the
identity except for multi-level BN (a shared BN or a CycleBatchNormList's shared affine is
copied to every level). Quantizer state (steps, thresholds, intervals, ``initialized`` flags) is
absent from an FP32 checkpoint by nature and comes from calibration.

Checkpoints may come from anywhere (a model zoo, a colleague), and unpickling arbitrary objects
runs code. :func:`load_torch_file` reads them with ``torch.load(weights_only=True)``: tensors,
containers, plain values and the few types our own files hold (:func:`checkpoint_globals`,
:func:`integer_model_globals`); anything else is refused unless the environment variable
``HQOD_TRUST_CHECKPOINTS=1`` says the source is trusted.
"""
import logging
import os
import pickle
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Union

import numpy as np
import torch
from omegaconf import ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformLinear
from detectron2.modeling.matcher import Matcher

from ..utils import all_subclasses
from .multilevel import MultiLevelBatchNorm
from .quantizers import Quantizer

__all__ = [
    "load_fp32_checkpoint",
    "map_fp32_state_dict",
    "LoadResult",
    "load_torch_file",
    "checkpoint_globals",
    "integer_model_globals",
    "UntrustedCheckpointError",
    "TRUST_ENV",
]

logger = logging.getLogger(__name__)

TRUST_ENV = "HQOD_TRUST_CHECKPOINTS"
# Where the nn.Module classes a pickled detector may hold come from (torch.nn's layers live in
# torch.nn.modules; the rest of torch.nn, e.g. DistributedDataParallel, is never saved).
_MODULE_NAMESPACES = ("torch.nn.modules.", "detectron2.", "hqod.")


class UntrustedCheckpointError(ValueError):
    """:func:`load_torch_file` refused a file: it holds objects beyond tensors and the types of
    our own checkpoints, and unpickling them could run code."""


def checkpoint_globals() -> List[Any]:
    """The types a training checkpoint of hqod's Checkpointer holds beside tensors, containers
    and plain values: NumPy's random state (``ExtraTrainingState``), a uint32 array."""
    keys = np.random.get_state()[1]
    rebuild = keys.__reduce__()[0]  # numpy._core.multiarray._reconstruct
    # NumPy < 2 wrote the same function under its old module name
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(keys.dtype)]


def integer_model_globals() -> List[Any]:
    """
    The types a model file of ``save_integer_model`` (a pickled detector) holds beside tensors:

    * every nn.Module subclass of torch.nn, detectron2 and hqod — computed from the classes
      defined, so a new layer needs no entry here;
    * the plain objects detectron2's detectors keep as attributes: output shapes, box transforms,
      the anchor matcher, and the omegaconf lists that LazyConfig's ``instantiate`` passes for
      list arguments (e.g. ``head_in_features``) with the type tags of their metadata.
    """
    import hqod.modeling  # noqa: F401  (defines hqod's detectors: they are subclasses from now on)

    modules = [c for c in all_subclasses(nn.Module) if c.__module__.startswith(_MODULE_NAMESPACES)]
    detectron2_helpers = [ShapeSpec, Box2BoxTransform, Box2BoxTransformLinear, Matcher]
    omegaconf_helpers = [ListConfig, ContainerMetadata, Metadata, AnyNode, defaultdict]
    type_tags = [(Any, "typing.Any"), list, dict, int]
    return modules + detectron2_helpers + omegaconf_helpers + type_tags


def _offending(path, error) -> str:
    """What made the weights-only unpickler refuse ``path``: all globals of its pickle outside
    the allow-list (a static read: nothing runs), else the global or type the error names."""
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):  # a legacy (not zip) torch.save file: no static read
        names = []
    if names:
        return ", ".join(names)
    found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>|unrecognized function (\S+)", str(error))
    return next(g for g in found.groups() if g) if found else "objects the weights-only unpickler does not accept"


def load_torch_file(path, safe_globals=(), *, map_location="cpu"):
    """
    ``torch.load`` of a file from anywhere, as data: ``weights_only=True`` (tensors, containers,
    plain values) plus the types in ``safe_globals`` (what our own files hold, e.g.
    :func:`checkpoint_globals`). A file holding anything else is refused before any of it is
    built, with an :class:`UntrustedCheckpointError` naming the file and the offending globals.

    With the environment variable ``HQOD_TRUST_CHECKPOINTS=1`` such a file is loaded anyway by
    full unpickling, with a warning: for files from a source you trust (it runs whatever code
    the file carries). Files the allow-list accepts load the safe way in either case.
    """
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            offending = _offending(path, e)
    if os.environ.get(TRUST_ENV) != "1":
        raise UntrustedCheckpointError(
            f"Checkpoint {path} was not loaded: it holds {offending}, beyond the tensors and data "
            "types of hqod's checkpoints, and unpickling it could run code. If you trust the "
            f"file's source, load it with the environment variable {TRUST_ENV}=1."
        )
    warnings.warn(
        f"{TRUST_ENV}=1: loading {path} by full unpickling (it holds {offending}); any code it "
        "carries runs.",
        stacklevel=2,
    )
    return torch.load(path, map_location=map_location, weights_only=False)


@dataclass
class LoadResult:
    """What :func:`load_fp32_checkpoint` did. ``missing_keys`` excludes quantizer state (listed
    in ``quantizer_keys``); ``expanded_keys`` are shared-BN keys copied to every level."""

    loaded_keys: List[str] = field(default_factory=list)
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    quantizer_keys: List[str] = field(default_factory=list)
    expanded_keys: List[str] = field(default_factory=list)


def _read_state_dict(path_or_state_dict) -> Dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FP32 checkpoint {path} does not exist.")
        if not path.endswith((".pth", ".pt")):
            raise ValueError(
                f"load_fp32_checkpoint reads torch checkpoints (.pth/.pt); got {path}. For other "
                "formats use detectron2's DetectionCheckpointer(model).load(path): multi-level BN "
                "expands shared BN keys on load as well."
            )
        # Our own FP32 training outputs (Checkpointer files: model + trainer state), as data.
        loaded = load_torch_file(path, checkpoint_globals())
    else:
        loaded = path_or_state_dict
    if not isinstance(loaded, Mapping):
        raise ValueError(f"Expected a state dict or a checkpoint dict; got {type(loaded).__name__}.")
    for key in ("model", "state_dict"):
        if key in loaded and isinstance(loaded[key], Mapping):
            loaded = loaded[key]
            break
    state = {}
    for k, v in loaded.items():
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except (TypeError, ValueError, RuntimeError):
                continue  # e.g. metadata strings
        state[k] = v
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def map_fp32_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]):
    """
    Return ``(mapped_state_dict, expanded_keys)``: the FP32 state dict with the keys of the
    quantized ``model`` — shared BN keys of multi-level BN positions copied to every level.
    """
    state = dict(state_dict)
    expanded = []
    for name, m in model.named_modules():
        if isinstance(m, MultiLevelBatchNorm):
            expanded += MultiLevelBatchNorm.expand_state_dict(state, f"{name}.", m.num_levels)
    return state, expanded


def _quantizer_prefixes(model: nn.Module) -> List[str]:
    return [f"{n}." for n, m in model.named_modules() if isinstance(m, Quantizer)]


def load_fp32_checkpoint(model: nn.Module, path_or_state_dict: Union[str, Mapping]) -> LoadResult:
    """
    Load an FP32 detector checkpoint (path to a .pth/.pt file, a checkpoint dict with "model",
    or a state dict) into the quantized ``model``; call it after ``quantize_model``.

    Missing and unexpected keys are logged (quantizer state excepted, it is expected to be
    missing). A shape mismatch means the checkpoint belongs to another architecture: a
    ValueError lists the mismatches and nothing is loaded; so does a checkpoint sharing no key
    with the model.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    state, expanded = map_fp32_state_dict(model, _read_state_dict(path_or_state_dict))
    model_state = model.state_dict()
    common = [k for k in state if k in model_state]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in common
        if state[k].shape != model_state[k].shape
    ]
    if mismatched:
        shown = "\n  ".join(mismatched[:20])
        more = f"\n  ... and {len(mismatched) - 20} more" if len(mismatched) > 20 else ""
        raise ValueError(
            f"The FP32 checkpoint does not fit this model ({len(mismatched)} shape mismatches); "
            f"is it a checkpoint of another architecture (depth, channels, classes)?\n  {shown}{more}"
        )
    if not common:
        raise ValueError(
            f"The FP32 checkpoint shares no key with this model (checkpoint keys like "
            f"{sorted(state)[:3]}, model keys like {sorted(model_state)[:3]})."
        )
    incompatible = model.load_state_dict(state, strict=False)
    qprefixes = tuple(_quantizer_prefixes(model))
    result = LoadResult(
        loaded_keys=common,
        missing_keys=[k for k in incompatible.missing_keys if not k.startswith(qprefixes)],
        unexpected_keys=list(incompatible.unexpected_keys),
        quantizer_keys=[k for k in incompatible.missing_keys if k.startswith(qprefixes)],
        expanded_keys=expanded,
    )
    logger.info(
        f"Loaded {len(common)} FP32 tensors; {len(result.quantizer_keys)} quantizer entries await "
        f"calibration; {len(expanded)} shared BN entries copied to every FPN level."
    )
    if result.missing_keys:
        logger.warning(
            f"FP32 checkpoint lacks {len(result.missing_keys)} model keys (left as initialized): "
            + ", ".join(result.missing_keys)
        )
    if result.unexpected_keys:
        logger.warning(
            f"FP32 checkpoint has {len(result.unexpected_keys)} keys the model does not use: "
            + ", ".join(result.unexpected_keys)
        )
    return result
