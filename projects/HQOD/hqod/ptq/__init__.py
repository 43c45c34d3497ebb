"""
Post-training quantization of a dense detector (``tools/ptq.py``): the FP32 detector, BN folded,
quantized by the quantization package (``quant`` node: bits, quantizer, granularity, layers kept
8-bit or FP32), then calibrated on training images by one of :data:`METHOD_DEFAULTS`
(``ptq`` node): ``minmax``, ``mse``, ``adaround``, ``brecq``, ``qdrop``, ``regptq``.

    model = prepare_model(fp32_model, cfg.quant, cfg.ptq)   # fold BN, quantize, LLAQ head
    run_ptq(cfg, fp32_checkpoint)                           # the whole calibration

The result is a quantized model of the same structure as ``hqod.engine.build_model(cfg)``
builds from the PTQ config, so ``tools/train_net.py --eval-only`` evaluates its checkpoint and
``tools/train_net.py`` fine-tunes it (PTQ -> QAT).
"""
from .config import HEAD_QUANTIZERS, METHOD_DEFAULTS, PTQConfig
from .fold import fold_batch_norms
from .global_loss import box_filter_mask, global_loss
from .llaq import LLAQQuantizer, default_llaq_layers, use_llaq
from .reconstruct import AdaRoundLLAQ, AdaRoundWeight, reconstruct, reconstruction_units
from .run import calibration_batches, prepare_model, run_ptq

__all__ = [
    "PTQConfig",
    "METHOD_DEFAULTS",
    "HEAD_QUANTIZERS",
    "fold_batch_norms",
    "global_loss",
    "box_filter_mask",
    "LLAQQuantizer",
    "use_llaq",
    "default_llaq_layers",
    "AdaRoundWeight",
    "AdaRoundLLAQ",
    "reconstruct",
    "reconstruction_units",
    "prepare_model",
    "calibration_batches",
    "run_ptq",
]
