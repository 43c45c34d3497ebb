"""
Save / load of an integer model: the file holds what the model is made from — the config (as
YAML) and the state dict of the trained fake-quant detector — and :func:`load_integer_model`
rebuilds the model with :func:`~.export.to_integer`, which is deterministic: the same integers.
The file is plain data (tensors, strings, numbers). Files of format version 1 (a pickled integer
module) still load, as data with an allow-list of classes.
"""
import os
import tempfile
from typing import Any, Dict

import torch
from torch import nn

from . import network, ops
from .export import to_integer

__all__ = ["INTEGER_FORMAT", "INTEGER_FORMAT_VERSION", "save_integer_model", "load_integer_model"]

INTEGER_FORMAT = "hqod-integer-detector"
INTEGER_FORMAT_VERSION = 2  # 1: the pickled integer module


def legacy_globals():
    """The engine's classes under the names that files saved before it was split into modules
    give them (``hqod.quantization.integer.<class>``; ``IntReLU`` was ``_IntReLU``): the same
    classes, so those files still load."""
    classes = {name: getattr(m, name) for m in (ops, network) for name in m.__all__}
    classes = {name: c for name, c in classes.items() if isinstance(c, type) and issubclass(c, nn.Module)}
    classes["_IntReLU"] = network.IntReLU
    return [(c, f"hqod.quantization.integer.{name}") for name, c in classes.items()]


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
    ``HQOD_TRUST_CHECKPOINTS=1`` (full unpickling, with a warning). Version-1 files (a pickled
    module) load with the module classes of torch.nn, detectron2 and hqod and the plain objects
    detectors hold allowed (:func:`~hqod.quantization.checkpoint.integer_model_globals`)."""
    from ..checkpoint import integer_model_globals, load_torch_file

    obj = load_torch_file(path, integer_model_globals() + legacy_globals(), map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != INTEGER_FORMAT:
        raise ValueError(f"{path} is not an integer model saved by save_integer_model().")
    version = obj.get("version")
    if version == 1:
        model = obj["model"]
    elif version == INTEGER_FORMAT_VERSION:
        model = _rebuild(obj, path)
    else:
        raise ValueError(f"{path}: integer model format version {version}, expected 1 or {INTEGER_FORMAT_VERSION}.")
    model.metadata = obj.get("metadata", {})
    return model.eval()
