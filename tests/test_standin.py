import pytest

from detectron2 import _C

from hqod.compat import HAS_D2_CPP_OPS

pytestmark = pytest.mark.skipif(HAS_D2_CPP_OPS, reason="official detectron2 with its real _C")


def test_cpp_only_op_raises_clear_error_naming_itself():
    """Through detectron2's own layers, whether they call ``detectron2._C.<op>`` (v0.6) or
    ``torch.ops.detectron2.<op>`` (main; v0.6 for nms_rotated)."""
    import torch

    from detectron2.layers import ROIAlignRotated, nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    calls = {
        "box_iou_rotated": lambda: pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5)),
        "nms_rotated": lambda: nms_rotated(torch.zeros(2, 5), torch.ones(2), 0.5),
        "roi_align_rotated_forward": lambda: ROIAlignRotated((2, 2), 1.0, 0)(
            torch.zeros(1, 1, 4, 4, requires_grad=True), torch.zeros(1, 6)
        ),
        "deform_conv_forward": lambda: _C.deform_conv_forward(),
    }
    for name, call in calls.items():
        with pytest.raises(_C.MissingCppOpError) as e:
            call()
        assert str(e.value).startswith(f"detectron2._C.{name} is a C++/CUDA operator, and this detectron2 was built ")
        assert "install official detectron2 from source" in str(e.value)


def test_modeling_and_env_info_import_in_a_fresh_process():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c",
         "import detectron2.modeling, detectron2.layers.deform_conv;"
         "from detectron2.utils.collect_env import collect_env_info; print(collect_env_info())"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Python-only stand-in" in out


def test_dunder_lookups_behave_like_a_module():
    assert not hasattr(_C, "__path__")
    assert _C.IS_STANDIN is True
