"""
Reading checkpoint files as data. (An FP32 detector is loaded into its quantized model by hqod's
checkpointer, :class:`hqod.engine.Checkpointer`.)

Checkpoints may come from anywhere (a model zoo, a colleague), and unpickling arbitrary objects
runs code. :func:`load_torch_file` reads them with ``torch.load(weights_only=True)``: tensors,
containers, plain values and the few types our own files hold (:func:`checkpoint_globals`);
anything else is refused unless the environment variable
``HQOD_TRUST_CHECKPOINTS=1`` says the source is trusted.
"""
import logging
import os
import pickle
import re
import warnings
from typing import Any, List

import numpy as np
import torch

__all__ = [
    "load_torch_file",
    "checkpoint_globals",
    "UntrustedCheckpointError",
    "TRUST_ENV",
]

logger = logging.getLogger(__name__)

TRUST_ENV = "HQOD_TRUST_CHECKPOINTS"


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
