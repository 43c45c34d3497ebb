import os

import pytest
import torch

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from hqod.data import DigitsSpec, generate_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEC = DigitsSpec(num_train=48, num_val=16, min_size=128, max_size=160, seed=3)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (several times faster on a busy 2-core
    box); the thread count is restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A tiny embedded dataset (48 train / 16 val scenes of 128-160 px), registered as
    ``digits_tiny_train`` / ``digits_tiny_val``. Returns its folder."""
    root = str(tmp_path_factory.mktemp("datasets") / "digits")
    generate_digits(root, TINY_SPEC)
    for split in ("train", "val"):
        name = f"digits_tiny_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(
                name,
                {"embedded": True},
                os.path.join(root, "annotations", f"instances_{split}.json"),
                os.path.join(root, split),
            )
    return root
