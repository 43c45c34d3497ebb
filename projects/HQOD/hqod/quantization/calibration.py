"""Quantizer modes and the calibration pass (observers on, fake-quant off) before QAT."""
import logging
import time
from typing import Iterable

import torch
from torch import nn

from detectron2.utils import comm

from .quantizers import Quantizer

__all__ = ["calibrate", "set_fake_quant", "set_observer", "uninitialized_quantizers"]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def set_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn fake quantization on or off in every quantizer (off = the FP32 model)."""
    for m in _unwrap(model).modules():
        if isinstance(m, Quantizer):
            m.enable_fake_quant(enabled)
    return model


def set_observer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the observers (data-driven (re)initialization) on or off in every quantizer."""
    for m in _unwrap(model).modules():
        if isinstance(m, Quantizer):
            m.enable_observer(enabled)
    return model


def uninitialized_quantizers(model: nn.Module):
    return [n for n, m in _unwrap(model).named_modules() if isinstance(m, Quantizer) and not m.is_initialized]


def _run(model: nn.Module, batches, per_process: int) -> int:
    seen = 0
    for batch in batches:
        model(batch)
        seen += len(batch)
        if seen >= per_process:
            break
    return seen


@torch.no_grad()
def calibrate(model: nn.Module, data_loader: Iterable, num_images: int) -> int:
    """
    Calibration pass: run ``num_images`` images (in total over all processes) through the model
    in eval mode with the observers on and fake quantization off, so that every quantizer
    initializes its step / threshold / interval from FP32 activations by its own rule (averaged
    over batches and processes). Quantizers with ``step_init = "mse"`` then search, on the next
    ``num_images`` images, the step of least squared quantization error among
    :data:`~.quantizers.MSE_FACTORS` times that one (errors summed over batches and processes,
    so N processes choose what one process with N times the batch does). Then fake
    quantization on, and the model back in its mode.

    ``data_loader`` yields what ``model`` takes (detectron2: lists of dicts with "image"); the
    batch size is ``len(batch)``; a finite one used up by the first pass is iterated again for
    the search. Returns the number of images seen by the first pass on this process.
    """
    if num_images <= 0:
        return 0
    per_process = -(-num_images // comm.get_world_size())
    was_training = model.training
    searching = [m for m in _unwrap(model).modules() if isinstance(m, Quantizer) and m.step_init == "mse"]
    batches = iter(data_loader)
    set_observer(model, True)
    set_fake_quant(model, False)
    model.eval()
    start = time.perf_counter()
    try:
        seen = _run(model, batches, per_process)
        set_observer(model, False)
        if searching:
            for q in searching:
                q.start_step_search()
            try:
                if _run(model, batches, per_process) == 0:  # a finite loader, used up: again
                    _run(model, iter(data_loader), per_process)
            finally:
                for q in searching:
                    q.finish_step_search()
    finally:
        set_observer(model, False)
        set_fake_quant(model, True)
        model.train(was_training)
    left = uninitialized_quantizers(model)
    logger.info(
        f"Calibrated quantizers on {seen} images"
        + (f", steps of least squared error searched on {seen} more" if searching else "")
        + f" in {time.perf_counter() - start:.1f}s"
        + (f"; {len(left)} not reached (they initialize on their first batch): {left}" if left else ".")
    )
    return seen
