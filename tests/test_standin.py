import pytest

from detectron2 import _C

from hqod.compat import HAS_D2_CPP_OPS

pytestmark = pytest.mark.skipif(HAS_D2_CPP_OPS, reason="official detectron2 with its real _C")


def test_cpp_only_op_raises_clear_error_naming_itself():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    import torch

    with pytest.raises(RuntimeError, match=r"detectron2\._C\.box_iou_rotated is a C\+\+/CUDA operator"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match=r"deform_conv_forward .*install official detectron2"):
        _C.deform_conv_forward()


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
