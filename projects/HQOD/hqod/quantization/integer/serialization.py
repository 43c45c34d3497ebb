"""
Save / load of an integer model from :func:`~.export.to_integer`.
"""
import torch
from torch import nn

from . import network, ops
from .network import IntegerHead

__all__ = ["INTEGER_FORMAT", "INTEGER_FORMAT_VERSION", "save_integer_model", "load_integer_model"]

INTEGER_FORMAT = "hqod-integer-detector"
INTEGER_FORMAT_VERSION = 1


def legacy_globals():
    """The engine's classes under the names that files saved before it was split into modules
    give them (``hqod.quantization.integer.<class>``; ``IntReLU`` was ``_IntReLU``): the same
    classes, so those files still load."""
    classes = {name: getattr(m, name) for m in (ops, network) for name in m.__all__}
    classes = {name: c for name, c in classes.items() if isinstance(c, type) and issubclass(c, nn.Module)}
    classes["_IntReLU"] = network.IntReLU
    return [(c, f"hqod.quantization.integer.{name}") for name, c in classes.items()]


def save_integer_model(int_model: nn.Module, path: str, **metadata) -> None:
    """Save a model from :func:`to_integer` (the whole module: integer weights, biases, BN shifts,
    multipliers and shifts, plus the meta-architecture's post-processing settings) with
    ``metadata``; :func:`load_integer_model` reads it back."""
    if not any(isinstance(m, IntegerHead) for m in int_model.modules()):
        raise ValueError("save_integer_model: not a model from to_integer().")
    torch.save(
        {"format": INTEGER_FORMAT, "version": INTEGER_FORMAT_VERSION, "model": int_model, "metadata": metadata},
        path,
    )


def load_integer_model(path: str, map_location="cpu") -> nn.Module:
    """Load a model saved by :func:`save_integer_model` (pickled module: needs hqod and
    detectron2 importable); returns it in eval mode with ``.metadata``.

    The file is read as data (``torch.load(weights_only=True)``) allowing only nn.Module classes
    of torch.nn, detectron2 and hqod and the plain objects detectors hold
    (:func:`~hqod.quantization.checkpoint.integer_model_globals`): a file holding anything else
    is refused with a ValueError naming it, unless the environment variable
    ``HQOD_TRUST_CHECKPOINTS=1`` (full unpickling, with a warning)."""
    from ..checkpoint import integer_model_globals, load_torch_file

    obj = load_torch_file(path, integer_model_globals() + legacy_globals(), map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != INTEGER_FORMAT:
        raise ValueError(f"{path} is not an integer model saved by save_integer_model().")
    if obj.get("version") != INTEGER_FORMAT_VERSION:
        raise ValueError(f"{path}: integer model format version {obj.get('version')}, expected {INTEGER_FORMAT_VERSION}.")
    model = obj["model"]
    model.metadata = obj.get("metadata", {})
    return model.eval()
