"""
The integer-only engine (AQD, Chen et al., CVPR 2021, Sec. 3.2): :func:`to_integer` turns a
trained, fully quantized AQD detector (``quant.scope="aqd"``; RetinaNet, FCOS or ATSS on a
detectron2 ResNet + FPN with BN, SSD-lite on MobileNetV2, including the HQOD variants) into a
model that computes what an integer accelerator would:

* integer activations ``q`` on each quantizer's grid (``x_hat = q * alpha``, AQD Eq. 1; the
  zero-free signed grid of Eq. 3 as the odd integers ``2 * eta - (2^b - 1)``);
* convolutions of integer activations and integer weights into int32 accumulators (Eq. 4),
  plus the conv bias as an integer in units of the accumulator step;
* the BN as an integer add of its rounded shift ``round(s)`` to the accumulator (Eq. 5-6, per
  channel and, in the heads, per FPN level); its per-channel scale ``alpha_z`` is carried to
  the requantization that follows;
* requantization onto the next quantizer's grid by an integer multiply and shift
  (``eta = round((q * M + offset * 2^k) / 2^k)``, ``M / 2^k ~ alpha_in / step_out``, int32
  ``M``, 64-bit product as gemmlowp / TFLite, round half to even as the fake quantizers),
  then clipping;
* residual and FPN adds as ``eta_1 * 2^d + eta_2 * c`` (Eq. 7-8, int32 by construction);
* ReLU, ReLU6 (its clip at 6 applied where the next conv requantizes), max-pooling and
  nearest upsampling on the integers.

Floats appear only where data enters and leaves the network: the normalized image is quantized
by the stem conv's input quantizer (as the fake-quant model does, in float64), and the
predictors' integer outputs (classification logits, box deltas, centerness) are multiplied by
their scales ``alpha`` when they leave the head. Everything after that is detectron2's normal
post-processing: the converted model is an instance of the same meta-architecture whose
``backbone`` and ``head`` are :class:`IntegerFPN` (over an :class:`IntegerResNet`) /
:class:`IntegerHead`, or for SSD-lite :class:`IntegerSSDLiteNeck` (over an
:class:`IntegerMobileNetV2`) / :class:`IntegerPerLevelHead`.

Exactness. Integers are held in int64 tensors. Convolutions run as float convolutions of
integer-valued tensors (PyTorch has no integer convolution on CPU): float32 where every partial
sum is provably below 2^24 (the static bound ``sum |W| * max|q_in|`` per output channel),
float64 otherwise (below 2^53); both are exact, as every product and partial sum is an integer
representable in the format. On a GPU (whose libraries may use TF32, FFT or Winograd
algorithms) they run in float64 and are rounded: exact as long as the library's error stays
below 1/2, which ``tools/gpu_check.py`` checks against the CPU. The same static bounds (plus the
BN shift) prove that every accumulator fits int32; :func:`integer_summary` reports the largest
one. Requantization products are checked below 2^63 when the multipliers are chosen.

The fake-quant model of scope "aqd" computes the same arithmetic in float (its BN shifts, biases
and add alignments are the same integers, :mod:`.integer_layers`), so the two agree up to float
rounding in the fake-quant model and the 2^-30 relative error of the requantization
multipliers; :mod:`..integer_check` measures it.

Save and load with :func:`save_integer_model` / :func:`load_integer_model`: the file holds the
config and the fake-quant state dict, from which loading rebuilds the same integer model.

Modules: :mod:`.ops` (the integer operations: requantization, convolution, adds, the entry
quantizer), :mod:`.network` (the integer backbone and head built from them), :mod:`.export`
(the checks and :func:`to_integer`, which reads a fake-quant detector), :mod:`.serialization`
(save / load).
"""
from .export import integer_summary, to_integer
from .network import IntegerFPN, IntegerHead, IntegerMobileNetV2, IntegerPerLevelHead, IntegerResNet, IntegerSSDLiteNeck
from .ops import IntAdd, IntConv, IntConvUnit, IntegerConversionError, IntRequant
from .serialization import INTEGER_FORMAT, INTEGER_FORMAT_VERSION, load_integer_model, save_integer_model

__all__ = [
    "IntegerConversionError",
    "to_integer",
    "save_integer_model",
    "load_integer_model",
    "integer_summary",
    "IntegerFPN",
    "IntegerResNet",
    "IntegerHead",
    "IntegerMobileNetV2",
    "IntegerSSDLiteNeck",
    "IntegerPerLevelHead",
    "IntRequant",
    "IntConv",
    "IntConvUnit",
    "IntAdd",
    "INTEGER_FORMAT",
    "INTEGER_FORMAT_VERSION",
]
