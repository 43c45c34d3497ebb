"""
Low-bit quantization-aware training for detectron2 one-stage detectors (HQOD, AQD).

Use, in this order (tools/train_net.py does)::

    model = instantiate(cfg.model)
    model = quantize_model(model, cfg.quant)          # in place; before DDP
    Checkpointer(model, strict=True).load(cfg.train.init_checkpoint)  # hqod.engine's: the FP32 detector
    calibrate(model, train_loader, cfg.quant.calib_images)
    cfg.optimizer.params = L(get_qat_optimizer_params)(weight_decay_norm=0.0)  # zero WD on steps
    ...  # DDP, train; checkpoints hold all quantizer state and resume exactly

Quantizers: ``QUANTIZERS`` (``lsq``, ``tqt``, ``lq``, peer ``lsq_torch``). Quantized layers:
``QUANT_MODULES``. Dense heads declared with :func:`hqod.modeling.dense_head` become
:class:`MultiLevelHead` (multi-level BN: :class:`MultiLevelBatchNorm`).

AQD's integer arithmetic (Eq. 4-8: ``shift_approx``, integer BN, aligned adds) lives in
:mod:`.integer_layers`; scope ``"aqd"`` trains with it. The integer-only engine::

    int_model = to_integer(model)                     # a trained AQD model -> integers only
    report = compare_integer_model(model, int_model, data_loader)   # agreement, AP, speed
    save_integer_model(model, cfg, "model_integer.pth"); load_integer_model("model_integer.pth")
"""
from .calibration import calibrate, set_fake_quant, set_observer, uninitialized_quantizers
from .config import SCOPES, QuantConfig
from .functional import fake_quantize_param, fake_quantize_ste, step_from_param
from .integer import (
    IntegerConversionError,
    integer_summary,
    load_integer_model,
    save_integer_model,
    to_integer,
)
from .integer_check import AgreementReport, compare_integer_model, fake_quant_reference
from .integer_layers import (
    AddAlignment,
    IntegerGrid,
    align_add,
    fixed_point_multiplier,
    integer_batch_norm,
    integer_bn_params,
    shift_approx,
)
from .modules import (
    QUANT_MODULES,
    QBasicBlock,
    QBatchNorm2d,
    QBottleneckBlock,
    QConv2d,
    QFPN,
    QInvertedResidual,
    QLinear,
    QMobileNetV2,
    QuantizedModule,
    cached_quantized_weights,
    QResNet,
    set_bfloat16_codes,
    set_integer_aware,
)
from .multilevel import (
    LevelSequential,
    MultiLevelBatchNorm,
    MultiLevelHead,
)
from .optim import get_qat_optimizer_params, quantizer_parameters
from .quantize import quantize_model, quantizers_of, register_relu_input_rule, relu_fed_layers
from .quantizers import (
    ALLOWED_BITS,
    GRANULARITIES,
    QUANTIZERS,
    LQQuantizer,
    LSQQuantizer,
    Quantizer,
    TorchLSQQuantizer,
    TQTQuantizer,
    check_bits,
)

__all__ = [
    # entry points
    "quantize_model",
    "calibrate",
    "get_qat_optimizer_params",
    "QuantConfig",
    "SCOPES",
    # modes and helpers
    "set_fake_quant",
    "set_observer",
    "uninitialized_quantizers",
    "quantizers_of",
    "quantizer_parameters",
    "relu_fed_layers",
    "register_relu_input_rule",
    "fake_quantize_ste",
    "fake_quantize_param",
    "step_from_param",
    "cached_quantized_weights",
    # quantizers
    "QUANTIZERS",
    "ALLOWED_BITS",
    "GRANULARITIES",
    "check_bits",
    "Quantizer",
    "LSQQuantizer",
    "TQTQuantizer",
    "LQQuantizer",
    "TorchLSQQuantizer",
    # quantized layers
    "QUANT_MODULES",
    "QuantizedModule",
    "QConv2d",
    "QLinear",
    "QBatchNorm2d",
    "QBasicBlock",
    "QBottleneckBlock",
    "QFPN",
    "MultiLevelBatchNorm",
    "LevelSequential",
    "MultiLevelHead",
    "QResNet",
    "QInvertedResidual",
    "QMobileNetV2",
    "set_bfloat16_codes",
    "set_integer_aware",
    # AQD integer arithmetic and the integer-only engine
    "shift_approx",
    "align_add",
    "AddAlignment",
    "IntegerGrid",
    "fixed_point_multiplier",
    "integer_bn_params",
    "integer_batch_norm",
    "to_integer",
    "IntegerConversionError",
    "integer_summary",
    "save_integer_model",
    "load_integer_model",
    "compare_integer_model",
    "fake_quant_reference",
    "AgreementReport",
]
