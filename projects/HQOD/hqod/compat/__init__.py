"""Differences between the detectron2 versions we support (PyPI pb1-detectron2 0.6, official v0.6
and newer from source), in one place."""
import detectron2
from detectron2 import _C as _d2_C

D2_VERSION = tuple(int(x) for x in detectron2.__version__.split(".")[:2])
# False when detectron2._C is our Python stand-in (hqod/compat/d2_c_standin.py).
HAS_D2_CPP_OPS = not getattr(_d2_C, "IS_STANDIN", False)

__all__ = ["D2_VERSION", "HAS_D2_CPP_OPS"]
