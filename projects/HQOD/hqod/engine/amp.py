"""
Mixed-precision training (``train.amp.enabled``) for FP32 detectors.

On CUDA it is detectron2's own :class:`~detectron2.engine.AMPTrainer` (float16 autocast with a
gradient scaler). On CPU it is :class:`CPUAutocastTrainer`: the forward pass (losses included, as
in AMPTrainer) under bfloat16 autocast, with the model in channels-last layout, where the CPU
computes bfloat16 natively (AVX512-BF16 or AMX; 1.7x faster than float32 for the digits
RetinaNet-R18). bfloat16 has float32's exponent range, so no gradient scaler is needed. Weights,
gradients and the optimizer stay float32, and evaluation runs in float32. A CPU without native
bfloat16 would emulate it (slower than float32): there the run trains in float32 and the log
says so.

Quantization-aware training with AMP on such a CPU is :class:`BFloat16CodesTrainer`: a
fake-quantized value ``x_hat = q * alpha`` is not exact in bfloat16 (8 significant bits), but
its integer code ``q`` is (every integer up to 256, so every grid of up to 8 bits), so the
quantized convolutions run on their codes in bfloat16 (exact products, float32 accumulation;
only their outputs rounded to bfloat16) and scale back to float32
(:func:`~hqod.quantization.set_bfloat16_codes`); the quantizers, BN, losses, weights and
optimizer stay float32. On CUDA, QAT with AMP is refused (not built: float16 autocast would
round the fake-quantized values themselves).
"""
import logging
import time

import torch

from detectron2.engine import AMPTrainer, SimpleTrainer

from hqod.quantization import set_bfloat16_codes

from .defaults import UserError

logger = logging.getLogger("hqod")


def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class CPUAutocastTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer with the forward pass under CPU bfloat16 autocast, the model
    in channels-last memory layout (oneDNN's bfloat16 convolutions run about 20 % faster in it;
    the values are the same tensors, only their strides change)."""

    def __init__(self, model, data_loader, optimizer):
        super().__init__(model, data_loader, optimizer)
        model.to(memory_format=torch.channels_last)  # parameters keep their identity

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        # the sum in float32: each loss is a float32 or bfloat16 scalar
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class BFloat16CodesTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer with the model's quantized convolutions computing, while
    training, on their integer codes in bfloat16 (:func:`~hqod.quantization.set_bfloat16_codes`);
    everything else float32."""

    def __init__(self, model, data_loader, optimizer):
        super().__init__(model, data_loader, optimizer)
        set_bfloat16_codes(model)


def trainer_class(cfg, device: torch.device):
    """The trainer class for ``cfg.train.amp`` on ``device``: SimpleTrainer, AMPTrainer (CUDA),
    CPUAutocastTrainer (CPU with native bfloat16) or for quantization-aware training
    BFloat16CodesTrainer (CPU with native bfloat16)."""
    if not cfg.train.get("amp", {}).get("enabled", False):
        return SimpleTrainer
    quantized = cfg.get("quant") is not None
    if device.type == "cuda":
        if quantized:
            raise UserError(
                "train.amp.enabled=True with a quant node on CUDA: quantization-aware training "
                "runs in float32 there (float16 autocast would round the fake-quantized values). "
                "Set train.amp.enabled=False."
            )
        return AMPTrainer
    if device.type == "cpu":
        if native_bfloat16_cpu():
            return BFloat16CodesTrainer if quantized else CPUAutocastTrainer
        logger.warning(
            "train.amp.enabled=True, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
            "training in float32 instead (emulated bfloat16 would be slower)."
        )
        return SimpleTrainer
    raise UserError(f"train.amp.enabled=True is supported on CPU and CUDA, not on {device.type}.")
