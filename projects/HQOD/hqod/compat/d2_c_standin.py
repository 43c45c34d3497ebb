"""Stand-in for ``detectron2._C`` when detectron2 was built without its C++/CUDA extension.

``tools/install.sh`` copies this file to ``detectron2/_C.py`` when it builds detectron2 from the
PyPI sdist ``pb1-detectron2==0.6`` (which lacks the C++ sources). Importing detectron2 then works
in every process; each C++-only operator raises one clear error that names itself when called.
Nothing in HQOD-D2 needs those operators: deformable conv, rotated boxes and the fast COCO
evaluator (we use pycocotools instead, see ``hqod.evaluation``).
"""

IS_STANDIN = True


class MissingCppOpError(RuntimeError):
    pass


def _missing(name):
    def op(*args, **kwargs):
        raise MissingCppOpError(
            f"detectron2._C.{name} is a C++/CUDA operator, and this detectron2 was built without "
            "its C++ extension (tools/install.sh installs the Python-only pb1-detectron2==0.6). "
            "Use a model/evaluator that does not need it, or install official detectron2 from "
            "source (https://github.com/facebookresearch/detectron2) to get the real detectron2._C."
        )

    op.__name__ = name
    return op


# Build information that detectron2.utils.collect_env asks for: answered, not refused.
def get_compiler_version():
    return "none (Python-only stand-in for detectron2._C)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
