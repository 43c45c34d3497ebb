"""
Save / load of an integer model: the file holds what the model is made from — the config (as
YAML) and the state dict of the trained fake-quant detector — and :func:`load_integer_model`
rebuilds the model with :func:`~.export.to_integer`, which is deterministic: the same integers.
The file is plain data (tensors, strings, numbers). Files of format version 1 (a pickled integer
module, written by earlier versions) are refused with the command that exports them again.
"""
import os
import tempfile
from typing import Any, Dict

import torch
from torch import nn

from .export import to_integer

__all__ = ["INTEGER_FORMAT", "INTEGER_FORMAT_VERSION", "save_integer_model", "load_integer_model"]

INTEGER_FORMAT = "hqod-integer-detector"
INTEGER_FORMAT_VERSION = 2  # 1: the pickled integer module (no longer read)


def _config_yaml(cfg) -> str:
    """The ``model`` and ``quant`` nodes of ``cfg`` (what builds the model), interpolations
    resolved (e.g. the number of classes from the dataset preset), as LazyConfig YAML."""
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    node = OmegaConf.create(
        {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "quant")},
        flags={"allow_objects": True},
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.yaml")
        LazyConfig.save(node, path)
        with open(path) as f:
            return f.read()


def _load_config_yaml(text: str):
    from detectron2.config import LazyConfig

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        return LazyConfig.load(path)


def save_integer_model(model: nn.Module, cfg, path: str, *, multiplier_bits: int = 31, **metadata) -> nn.Module:
    """
    Save the integer model of ``model``, a trained AQD detector built from the LazyConfig
    ``cfg`` (``instantiate(cfg.model)`` quantized by ``cfg.quant``): the file holds those two
    nodes as YAML, ``model``'s state dict, ``multiplier_bits`` and ``metadata`` (plain values);
    :func:`load_integer_model` rebuilds the integer model from them. Returns the integer model
    (``to_integer(model)``, which also checks that ``model`` converts).
    """
    if cfg.get("quant") is None:
        raise ValueError("save_integer_model: the config has no quant node (an FP32 config).")
    int_model = to_integer(model, multiplier_bits=multiplier_bits)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": INTEGER_FORMAT,
            "version": INTEGER_FORMAT_VERSION,
            "config": _config_yaml(cfg),
            "fake_quant_state_dict": state,
            "multiplier_bits": int(multiplier_bits),
            "metadata": metadata,
        },
        path,
    )
    return int_model


def _rebuild(obj: Dict[str, Any], path: str) -> nn.Module:
    from detectron2.config import instantiate

    from ..quantize import quantize_model

    cfg = _load_config_yaml(obj["config"])
    model = quantize_model(instantiate(cfg.model), cfg.quant)
    incompatible = model.load_state_dict(obj["fake_quant_state_dict"], strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            f"{path}: its state dict does not fit the model its config builds (missing "
            f"{incompatible.missing_keys[:3]}, unexpected {incompatible.unexpected_keys[:3]})."
        )
    return to_integer(model.eval(), multiplier_bits=obj["multiplier_bits"])


def load_integer_model(path: str, map_location="cpu") -> nn.Module:
    """Load a model saved by :func:`save_integer_model`; returns it in eval mode with
    ``.metadata``. The file is read as data (``torch.load(weights_only=True)``); a file holding
    other objects is refused with a ValueError naming them, unless the environment variable
    ``HQOD_TRUST_CHECKPOINTS=1`` (full unpickling, with a warning). A file of format 1 (a
    pickled integer module) is refused with the command that exports it again."""
    from ..checkpoint import load_torch_file

    try:  # a static read of the pickle's globals: nothing runs
        pickled = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # not a zip file: load_torch_file says what it is
        pickled = []
    if any(name.startswith("hqod.quantization.integer") for name in pickled):
        raise ValueError(
            f"{path} is an integer model of format 1 (a pickled module, written by an earlier "
            "version); integer models are now rebuilt from their config and trained weights. "
            "Export it again from its fake-quant checkpoint: python tools/export_integer.py "
            "--config-file <config> --checkpoint <model_final.pth>"
        )
    obj = load_torch_file(path, map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != INTEGER_FORMAT:
        raise ValueError(f"{path} is not an integer model saved by save_integer_model().")
    version = obj.get("version")
    if version != INTEGER_FORMAT_VERSION:
        raise ValueError(f"{path}: integer model format version {version}, expected {INTEGER_FORMAT_VERSION}.")
    model = _rebuild(obj, path)
    model.metadata = obj.get("metadata", {})
    return model.eval()
