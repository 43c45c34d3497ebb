"""Stand-in for ``detectron2._C`` when detectron2 was built without its C++/CUDA extension.

``tools/install.sh`` copies this file to ``detectron2/_C.py`` when it builds detectron2 from the
PyPI sdist ``pb1-detectron2==0.6`` (which lacks the C++ sources). Importing detectron2 then works
in every process; each C++-only operator raises one clear error that names itself when called.
Nothing in HQOD-D2 needs those operators: deformable conv, rotated boxes and the fast COCO
evaluator (we use pycocotools instead, see ``hqod.evaluation``).

detectron2 v0.6 calls every operator as ``detectron2._C.<name>`` (this module's ``__getattr__``);
detectron2 main calls its rotated-box operators as ``torch.ops.detectron2.<name>``, which the
real extension registers with TORCH_LIBRARY: this module registers them too (same schemas), with
kernels that raise the same error.
"""
import torch

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


# detectron2/layers/csrc/vision.cpp's TORCH_LIBRARY(detectron2, m) operators and their C++ signatures
TORCH_OPS = {
    "nms_rotated": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": "(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
    "int pooled_width, int sampling_ratio) -> Tensor",
    "roi_align_rotated_backward": "(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
    "int pooled_width, int batch_size, int channels, int height, int width, int sampling_ratio) -> Tensor",
}


def _register_torch_ops():
    library = torch.library.Library("detectron2", "DEF")
    for name, schema in TORCH_OPS.items():
        library.define(name + schema)
        # every dispatch key (CPU, CUDA, autograd, meta) reaches the same raising kernel
        library.impl(name, _missing(name), "CompositeImplicitAutograd")
    return library


# The registrations last as long as the Library object does.
_TORCH_LIBRARY = _register_torch_ops()


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
