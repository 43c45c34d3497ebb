"""
Loading an FP32 detector checkpoint into its quantized model.

``quantize_model`` keeps every FP32 parameter/buffer name, so the mapping FP32 -> QAT keys is the
identity except for multi-level BN (a shared BN or a CycleBatchNormList's shared affine is
copied to every level). Quantizer state (steps, thresholds, intervals, ``initialized`` flags) is
absent from an FP32 checkpoint by nature and comes from calibration.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from .multilevel import MultiLevelBatchNorm
from .quantizers import Quantizer

__all__ = ["load_fp32_checkpoint", "map_fp32_state_dict", "LoadResult"]

logger = logging.getLogger(__name__)


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
        # Our own FP32 training outputs (DetectionCheckpointer files: model + trainer state).
        loaded = torch.load(path, map_location="cpu", weights_only=False)
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
