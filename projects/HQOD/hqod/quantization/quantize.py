"""
``quantize_model(model, cfg_quant)``: the single entry point that turns an FP32 detector into a
QAT model, in place, through ``QUANT_MODULES``.

Order of use (tools/train_net.py): build the FP32 model -> ``quantize_model`` -> load the FP32
checkpoint (``hqod.engine.Checkpointer``) -> ``calibrate`` -> optimizer with
``get_qat_optimizer_params`` (zero weight decay on steps) -> DDP -> train.
"""
import logging
from collections import Counter
from fnmatch import fnmatchcase
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from torch import nn

from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.dense_detector import DenseDetector

from hqod.modeling.dense_head import DenseHeadSpec, check_dense_head, dense_head_spec, head_norms
from hqod.modeling.cspdarknet import CSPDarknet
from hqod.modeling.mobilenet import MobileNetV2, SSDLiteNeck

from ..utils import replace_child
from .config import QuantConfig
from .modules import QuantizedModule, find_quant_module_class
from .multilevel import MultiLevelHead
from .quantizers import QUANTIZERS, Quantizer

__all__ = ["quantize_model", "register_relu_input_rule", "relu_fed_layers", "quantizers_of"]

logger = logging.getLogger(__name__)

# Layer types with parameters that are known and stay FP32: CycleBatchNormList is replaced by
# the head conversion (multi-level BN) or kept when quant.multi_level_bn is False.
KNOWN_FP32_TYPES = (CycleBatchNormList, FrozenBatchNorm2d)

# ---------------------------------------------------------------------------------------------
# Which layers take a ReLU output as input (their activation quantizer is unsigned).
# ---------------------------------------------------------------------------------------------
_RELU_INPUT_RULES: Dict[type, Callable[[nn.Module], Iterable[str]]] = {}


def register_relu_input_rule(*types):
    """
    Register ``fn(module) -> child names`` for modules of the given types (isinstance): the
    children listed take the output of a ReLU as input. Anything not covered by a rule is
    treated as signed, which never clips negative values (only wastes one level).
    """

    def deco(fn):
        for t in types:
            _RELU_INPUT_RULES[t] = fn
        return fn

    return deco


def _ends_with_relu(module: nn.Module) -> bool:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return True
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return _ends_with_relu(module[-1])
    act = getattr(module, "activation", None) if isinstance(module, Conv2d) else None
    return isinstance(act, (nn.ReLU, nn.ReLU6)) or getattr(act, "__name__", "") in ("relu", "relu_")


@register_relu_input_rule(nn.Sequential)
def _sequential_rule(seq):
    children = list(seq.named_children())
    return [name for (_, prev), (name, _) in zip(children, children[1:]) if _ends_with_relu(prev)]


@register_relu_input_rule(BasicBlock, BottleneckBlock)
def _resnet_block_rule(block):
    # In detectron2's ResNet every block input is a ReLU output (the stem and every block end
    # with ReLU; max-pooling keeps the sign), and the inner convs follow relu_.
    return [n for n in ("conv1", "conv2", "conv3", "shortcut") if getattr(block, n, None) is not None]


@register_relu_input_rule(FPN)
def _fpn_rule(fpn):
    if not isinstance(fpn.bottom_up, ResNet):
        return []
    laterals = {id(m) for m in fpn.lateral_convs}  # the ResNet stage outputs end with ReLU
    return [name for name, m in fpn.named_children() if id(m) in laterals]


@register_relu_input_rule(LastLevelP6P7)
def _p6p7_rule(block):
    # p7 = conv(relu(p6)); p6 reads an FPN output ("p5", signed) or a ResNet stage ("res5").
    return ["p7"] + ([] if block.in_feature.startswith("p") else ["p6"])


@register_relu_input_rule(MobileNetV2)
def _mobilenet_rule(net):
    # Inside a block the Sequential rule applies; a block's input is the linear projection of
    # the block before (signed), except for the first block, which reads the stem's ReLU6.
    return ["layer1.0.conv.0"]


@register_relu_input_rule(SSDLiteNeck)
def _ssdlite_neck_rule(neck):
    # Each extra level reads the one before it (ending with ReLU6), the first one the last
    # bottom-up feature (MobileNetV2's conv_last ends with ReLU6; its stages do not).
    reads_relu = [neck.in_features[-1] == "conv_last" and isinstance(neck.bottom_up, MobileNetV2)]
    reads_relu += [True] * (len(neck.extras) - 1)
    return [f"extras.{i}.0" for i, relu in enumerate(reads_relu) if relu]


def _head_spec(module: nn.Module) -> Optional[DenseHeadSpec]:
    """The declaration of a dense head, float or quantized (None for other modules)."""
    if isinstance(module, MultiLevelHead):
        return module.spec
    return dense_head_spec(type(module))


def _head_rule(head):
    spec = _head_spec(head)
    return [layer for layer in spec.predictor_layers(head) if _ends_with_relu(spec.tower_of(head, layer))]


def relu_fed_layers(model: nn.Module) -> Set[str]:
    """Names of the modules of ``model`` whose input is produced by a ReLU."""
    out = set()
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        fns = [fn for t, fn in _RELU_INPUT_RULES.items() if isinstance(module, t)]
        if _head_spec(module) is not None:
            fns.append(_head_rule)
        for fn in fns:
            out.update(prefix + child for child in fn(module))
    return out


# ---------------------------------------------------------------------------------------------
# Input (first) and output (last) layers.
# ---------------------------------------------------------------------------------------------
_WEIGHTED = (nn.Conv2d, nn.Linear)


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def find_first_last_layers(model: nn.Module, qcfg: QuantConfig) -> Tuple[List[str], List[str]]:
    """The input layers (the stem convs of detectron2's ResNet, MobileNetV2 and CSPDarknet, or
    ``quant.input_layers``) and output layers
    (declared dense heads' predictors, or ``quant.output_layers``) of ``model``."""
    weighted = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    if qcfg.input_layers is not None:
        first = [n for n in weighted if _match(n, qcfg.input_layers)]
    else:
        stems = [n for n, m in model.named_modules() if isinstance(m, BasicStem)]
        stems += [f"{n}.stem" if n else "stem" for n, m in model.named_modules() if isinstance(m, (MobileNetV2, CSPDarknet))]
        first = [n for n in weighted if any(n == s or n.startswith(s + ".") for s in stems)]
    if qcfg.output_layers is not None:
        last = [n for n in weighted if _match(n, qcfg.output_layers)]
    else:
        last = []
        for name, m in model.named_modules():
            spec = _head_spec(m)
            if spec is not None:
                last += [f"{name}.{p}" for p in spec.predictor_layers(m)]
    for what, names, given in (("input", first, qcfg.input_layers), ("output", last, qcfg.output_layers)):
        if not names:
            logger.warning(
                f"quantize_model: no {what} layer found ({'quant.' + what + '_layers=' + repr(given) if given else 'automatic search'}); "
                f"every layer uses weight_bits/act_bits."
            )
    return first, last


# ---------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------
class ConversionContext:
    """What a ``from_float`` needs to know: scope, bits per layer, input sign, quantizers, the
    number of levels of each dense head (by module name)."""

    def __init__(self, qcfg: QuantConfig, relu_fed: Set[str], first_last: Set[str], head_levels: Dict[str, int]):
        self.qcfg = qcfg
        self.head_levels = head_levels
        self.scope = qcfg.scope
        self.multi_level_bn = qcfg.multi_level_bn
        # integer-aware convs (AQD Eq. 4-6): scope aqd, or quant.integer_bias
        self.integer_convs = qcfg.scope == "aqd" or qcfg.integer_bias
        self._relu_fed = relu_fed
        self._first_last = first_last
        self.num_quantizers = Counter()
        self.fp32_layers: List[str] = []

    def quantizer(self, bits: int, *, signed: bool, output: bool = False, channels: Optional[int] = None) -> Quantizer:
        """A new quantizer of the configured method, per tensor or, given ``channels``, per
        channel of dim 0. ``output=True`` for quantizers of layer outputs, which a later op may
        modify in place (the output is then not saved)."""
        granularity = {} if channels is None else {"granularity": "channel", "channels": channels}
        q = QUANTIZERS.get(self.qcfg.method)(
            bits=bits, signed=signed, step_init=self.qcfg.step_init, save_output=not output, **granularity
        )
        kind = ("signed" if signed else "unsigned") + ("" if channels is None else ", per channel")
        self.num_quantizers[(bits, kind)] += 1
        return q

    def weight_quantizer(self, bits: int, *, channels: int) -> Quantizer:
        """The (signed) quantizer of a weight with ``channels`` output channels: per tensor or
        per output channel (``quant.weight_granularity``)."""
        per_channel = self.qcfg.weight_granularity == "channel"
        return self.quantizer(bits, signed=True, channels=channels if per_channel else None)

    def input_signed(self, name: str) -> bool:
        return name not in self._relu_fed

    def layer_bits(self, name: str) -> Optional[Tuple[int, int]]:
        """(weight_bits, act_bits) of a conv/linear layer, or None to keep it FP32."""
        q = self.qcfg
        bits = (q.weight_bits, q.act_bits)
        if name in self._first_last:
            bits = None if q.first_last_bits is None else (q.first_last_bits,) * 2
        for pattern, ov in q.overrides.items():
            if fnmatchcase(name, pattern):
                if ov is None or isinstance(ov, int):
                    bits = None if ov is None else (ov, ov)
                else:
                    base = bits or (q.weight_bits, q.act_bits)
                    bits = (ov.get("weight_bits", base[0]), ov.get("act_bits", base[1]))
        if bits is None:
            self.fp32_layers.append(name)
        return bits

    def aqd_output_bits(self, name: str) -> Optional[int]:
        """:meth:`output_bits` under scope ``aqd``; None (no output quantizer) otherwise."""
        return self.output_bits(name) if self.scope == "aqd" else None

    def output_bits(self, name: str) -> Optional[int]:
        """Bits of the output quantizer of a BN / add at ``name`` (scope aqd), or None."""
        bits = self.qcfg.output_bits
        for pattern, ov in self.qcfg.overrides.items():
            if fnmatchcase(name, pattern):
                if ov is None or isinstance(ov, int):
                    bits = ov
                elif "act_bits" in ov:
                    bits = ov["act_bits"]
        if bits is None:
            self.fp32_layers.append(name)
        return bits


def _is_layer(module: nn.Module) -> bool:
    """A module computing with parameters of its own (as opposed to a container)."""
    return next(module.parameters(recurse=False), None) is not None


def _quant_module_class(module: nn.Module):
    """The class that converts ``module``: the quantized dense head for a declared head shared over
    levels, else the ``QUANT_MODULES`` entry of its exact type (None if there is none)."""
    spec = dense_head_spec(type(module))
    if spec is not None and spec.shared:
        return MultiLevelHead
    return find_quant_module_class(type(module))


def dense_head_levels(model: nn.Module) -> Dict[str, int]:
    """Name -> number of levels of the head of every detectron2 ``DenseDetector`` in ``model``
    (``len(head_in_features)``). Checks every declared head against its declaration. A
    detector's head with BN layers and no declaration is an error: quantized as it is, its BN
    would see every level in turn and its predictors would take the low bit width."""
    levels = {}
    for name, m in model.named_modules():
        spec = dense_head_spec(type(m))
        if spec is not None:
            check_dense_head(m, spec)
        if not isinstance(m, DenseDetector):
            continue
        head_name = f"{name}.head" if name else "head"
        head = m.head
        if _head_spec(head) is None and head_norms(head):
            cls = type(head)
            raise ValueError(
                f"quantize_model: the head {head_name!r} ({cls.__module__}.{cls.__qualname__}) has "
                f"BN layers ({', '.join(head_norms(head)[:4])}) shared over the detector's "
                f"{len(m.head_in_features)} levels but declares no towers and predictors. Declare "
                f"them with @hqod.modeling.dense_head(predictors={{'<predictor conv>': '<tower "
                f"Sequential it reads>', ...}}) on {cls.__qualname__} (see README, 'Adding a detector')."
            )
        levels[head_name] = len(m.head_in_features)
    return levels


def _find_unknown(module: nn.Module, prefix: str = "") -> List[Tuple[str, str]]:
    unknown = []
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, (Quantizer, QuantizedModule)):
            continue
        if (
            _quant_module_class(child) is None
            and not isinstance(child, KNOWN_FP32_TYPES)
            and _is_layer(child)
        ):
            unknown.append((full, type(child).__qualname__))
            continue
        unknown += _find_unknown(child, full + ".")
    return unknown


def _convert(module: nn.Module, prefix: str, ctx: ConversionContext, converted: Counter):
    for name, child in list(module.named_children()):
        full = prefix + name
        if isinstance(child, Quantizer):
            continue
        if isinstance(child, QuantizedModule):  # built by its parent (e.g. multi-level BN)
            if child.convert_children:
                _convert(child, full + ".", ctx, converted)
            continue
        qcls = _quant_module_class(child)
        if qcls is not None:
            new = qcls.from_float(child, name=full, ctx=ctx)
            if new is not None:
                converted[qcls.__name__] += 1
                replace_child(module, name, new)
                if not qcls.convert_children:
                    continue
                child = new
        elif isinstance(child, KNOWN_FP32_TYPES) or _is_layer(child):
            continue
        _convert(child, full + ".", ctx, converted)


def quantize_model(model: nn.Module, cfg_quant) -> nn.Module:
    """
    Replace, in place, the layers of ``model`` by their quantized versions from
    ``QUANT_MODULES`` (each constructed by ``from_float`` from the float layer) and return
    ``model``; a bare layer given as ``model`` is not changed: its quantized version is returned.

    Args:
        model: an FP32 model (a detectron2 meta-architecture, a backbone, any nn.Module); not
            wrapped in DistributedDataParallel yet.
        cfg_quant: the top-level ``quant`` node of a LazyConfig (DictConfig or dict) or a
            :class:`QuantConfig`; see :mod:`hqod.quantization.config` for the fields.

    Conv / linear layers get weight and input quantizers (``weight_bits``/``act_bits``; input
    and output layers ``first_last_bits``; ``overrides`` last). Scope ``aqd`` also quantizes BN
    outputs and residual / FPN adds, and makes them integer-aware (AQD Eq. 4-8: integer conv
    biases, BN shifts rounded in accumulator units, adds aligned with c/2^d), so that the
    integer-only engine (``hqod.quantization.to_integer``) computes what QAT trained.
    Declared dense heads (:mod:`hqod.modeling.dense_head`) get multi-level BN indexed by level.
    A layer type with parameters that no registered class converts is an error naming the
    layers, unless ``keep_unknown_fp32``.
    """
    qcfg = QuantConfig.from_cfg(cfg_quant)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("quantize_model: quantize the model before wrapping it in DDP.")
    unknown = _find_unknown(model)
    if unknown:
        listing = ", ".join(f"{n} ({t})" for n, t in unknown)
        if not qcfg.keep_unknown_fp32:
            raise ValueError(
                f"quantize_model: no QUANT_MODULES entry converts these layers: {listing}. "
                "Register a quantized class for their type, or set quant.keep_unknown_fp32=True "
                "to keep them FP32."
            )
        logger.warning(f"quantize_model: keeping unknown layers FP32: {listing}")

    head_levels = dense_head_levels(model)
    first, last = find_first_last_layers(model, qcfg)
    ctx = ConversionContext(qcfg, relu_fed_layers(model), set(first) | set(last), head_levels)
    converted = Counter()
    root_cls = _quant_module_class(model)
    new_root = root_cls.from_float(model, name="", ctx=ctx) if root_cls is not None else None
    if new_root is not None:  # a bare layer given as the model: the new layer is returned
        converted[root_cls.__name__] += 1
        model = new_root
    if new_root is None or root_cls.convert_children:
        _convert(model, "", ctx, converted)
    param = next(model.parameters(), None)
    if param is not None:  # new quantizers live where the model does
        for q in quantizers_of(model).values():
            q.to(param.device)
    logger.info(
        f"quantize_model: method={qcfg.method} W{qcfg.weight_bits}A{qcfg.act_bits} "
        f"scope={qcfg.scope}, weights per {qcfg.weight_granularity}"
        + (f" (BN outputs and adds {qcfg.output_bits}-bit)" if qcfg.scope == "aqd" else "")
        + f"; input layers {first}, output layers {last} at "
        f"{qcfg.first_last_bits or 'FP32'}; converted {dict(converted)}; quantizers "
        f"{dict(ctx.num_quantizers)}; kept FP32: {ctx.fp32_layers or 'none'}."
    )
    return model


def quantizers_of(model: nn.Module) -> Dict[str, Quantizer]:
    """All quantizers of a model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}
