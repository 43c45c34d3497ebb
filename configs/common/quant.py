"""
Quantization-aware training settings: the top-level ``quant`` node, read by
``hqod.quantization.quantize_model`` (and ``calib_images`` by tools/train_net.py), plus the
optimizer parameter groups that exempt quantizer steps from weight decay.

Defaults (``hqod.quantization.QuantConfig``'s, the one place they are set): HQOD's LSQ W4A4
"AQD*" baseline — convs quantized (weights signed, activations unsigned after ReLU), first conv
and head predictors at 8 bits, multi-level BN in the head, calibration on 256 images. Use in a
config::

    from .common.quant import quant, qat_optimizer_params
    optimizer.params = qat_optimizer_params
    quant.weight_bits = quant.act_bits = 2

Fields (validated by ``hqod.quantization.QuantConfig``, which documents them in full):
  method            "lsq" (HQOD Eq. 2-3) | "tqt" (power-of-two steps) | "lq" (AQD Eq. 2-3)
                    | "lsq_torch" (PyTorch's fused LSQ op, the speed/behaviour peer)
  weight_bits       2..8, weights of every quantized conv / linear layer
  act_bits          2..8, their input activations
  output_bits       2..8, under "aqd": the BN outputs and adds (default 8; AQD keeps them in
                    accumulator units, only the next conv's input is brought to act_bits)
  scope             "aqd_star": convs only (+ multi-level BN in the head);
                    "aqd": also BN outputs, ResNet residual adds and FPN top-down adds,
                    integer-aware (AQD Eq. 4-8) so that hqod.quantization.to_integer /
                    tools/export_integer.py turn it into an integer-only model
  first_last_bits   bits of the input layer (stem conv) and output layers (head predictors);
                    None keeps them FP32 (the AQD paper's AQD*)
  input_layers      None = the stem convs (detectron2's ResNet, MobileNetV2); or a list of module-name globs
  output_layers     None = the declared heads' predictors (cls_score, bbox_pred, ctrness); or globs
  overrides         {module-name glob: bits | {"weight_bits": b, "act_bits": b} | None (FP32)}
  keep_unknown_fp32 False: a layer type without a quantized version is an error naming it
  multi_level_bn    one BN per FPN level in the shared head, indexed by level (AQD)
  integer_bias      under "aqd_star": conv biases and BN shifts in accumulator units (AQD Eq.
                    4-6, BN outputs float), so that the ONNX export's int32 biases are exact
  step_init         "mse": each quantizer's initial step minimizes its squared quantization
                    error on the calibration data; "paper": the quantizer's own rule; "minmax":
                    the largest |x| seen is the largest level (post-training quantization)
  weight_granularity "tensor" (the papers') | "channel": one learned step per output channel
  calib_images      images of the calibration pass before QAT (0: init on the first batch)
"""
from dataclasses import asdict

from detectron2.config import LazyCall as L

from hqod.quantization import QuantConfig, get_qat_optimizer_params

# Every field, so that configs and command-line overrides can set each one by name.
quant = asdict(QuantConfig())

# Like configs/common/optim.py's params, plus zero weight decay on steps / thresholds /
# intervals. train_net sets params.model before instantiating the optimizer.
qat_optimizer_params = L(get_qat_optimizer_params)(weight_decay_norm=0.0, weight_decay_quant=0.0)
