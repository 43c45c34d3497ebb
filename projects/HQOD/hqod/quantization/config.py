"""
The ``quant`` config node (``configs/common/quant.py``), validated into a :class:`QuantConfig`.

Fields (all optional except none; defaults = HQOD's LSQ W4A4 "AQD*" setting):

* ``method``: quantizer name in ``QUANTIZERS`` — ``"lsq"``, ``"tqt"``, ``"lq"`` (or the peer
  ``"lsq_torch"``).
* ``weight_bits`` / ``act_bits``: 2..8, weights and input activations of every quantized conv /
  linear layer (the "W" and "A" of WxAy).
* ``output_bits``: 2..8, the grid of the BN outputs and adds of scope ``"aqd"`` (default 8).
  AQD does not round these to the low bit width: a BN output is ``(eta_conv + round(s)) *
  alpha_z`` in accumulator units (Eq. 6) and an add sums two such integers (Eq. 7); only the
  next conv's input quantizer brings them down to ``act_bits``. Our integer engine stores them
  as integers of ``output_bits`` bits, so 8 keeps the model integer-only while the residual
  and FPN streams stay fine-grained; ``output_bits = act_bits`` is the stricter scheme that
  also rounds them to the low bit width (at W2A2 it loses almost the whole detector:
  BENCHMARKS.md, the design-card command).
* ``scope``: ``"aqd_star"`` = convs (and linear layers) only, plus multi-level BN in the head;
  ``"aqd"`` = also BN outputs, the residual adds of ResNet blocks and the FPN top-down adds
  (AQD's full quantization), integer-aware as AQD Eq. 4-8 (integer conv biases, BN shifts
  rounded in accumulator units, adds aligned with c/2^d): the model the integer-only engine
  ``hqod.quantization.to_integer`` converts.
* ``integer_bias``: scope ``"aqd_star"`` with integer-aware convs: each conv's bias and BN shift
  rounded in accumulator units as AQD Eq. 4-6 compute them (the BN output stays float, no
  output grid), so that a deployed conv's int32 bias (ONNX ``QLinearConv``) is exactly the
  trained one. Off (default), the export rounds the float BN shift of a trained model, which
  moves every value within about 1 % of a step of a rounding boundary of the next grid
  (BENCHMARKS.md, the SSD-lite TQT export). Scope ``"aqd"`` always computes them so.
* ``first_last_bits``: bits of the input layer (backbone stem conv) and of the output layers
  (head predictors), weights and input activations; None keeps them FP32 (AQD paper's AQD*).
* ``input_layers`` / ``output_layers``: module names (glob patterns) of those layers; None finds
  them: convs of detectron2's ``BasicStem`` and MobileNetV2's stem; the predictors of the
  declared dense heads (RetinaNet ``cls_score``, ``bbox_pred``; FCOS also ``ctrness``; SSD-lite's
  per level).
* ``overrides``: ``{glob pattern on module names: bits}`` applied last; bits is an int (weights
  and activations), a dict ``{weight_bits, act_bits}`` (either may be left out), or None to keep
  that layer FP32. For BN / add quantizers an int or ``act_bits`` sets their bits (in place of
  ``output_bits``).
* ``keep_unknown_fp32``: a layer type with parameters that ``QUANT_MODULES`` does not know is an
  error (listed by name) unless this is True; then it stays FP32 with a warning.
* ``multi_level_bn``: replace the head towers' BN (shared BN or CycleBatchNormList) with one BN
  per FPN level, indexed by level (AQD). False keeps the float head norms.
* ``step_init``: how the calibration pass sets each quantizer's step: ``"mse"`` (default) the
  step of least squared quantization error, searched in a second pass over as many images from
  1/8 to 4 times the quantizer's own rule in steps of 2^(1/8) (the HQOD authors' code
  initializes activation steps by MSE); ``"paper"`` the quantizer's own rule (LSQ and LQ:
  LSQ's ``2 * mean|x| / sqrt(Qp)``; TQT: its 3-sigma threshold); ``"minmax"`` the grid whose
  largest level is the largest |x| seen (the plain observer of post-training quantization). Without calibration
  (``calib_images = 0``) the first batch initializes by the own rule.
* ``weight_granularity``: ``"tensor"`` (default; the papers' setting): one learned step per
  weight tensor; ``"channel"``: one per output channel (torch.ao's per-channel weights), each
  initialized, searched and trained as the per-tensor step on its channel. Under scope ``"aqd"``
  the accumulator step ``alpha_conv`` is then per output channel, and so are the integer bias
  and BN shift units (Eq. 4-6) and the integer engine's requantization.
* ``calib_images``: images of the calibration pass before QAT (observers on, fake-quant off);
  0 = initialize every quantizer from its first training batch instead. Used by train_net.
"""
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple, Union

from .quantizers import GRANULARITIES, QUANTIZERS, STEP_INITS, check_bits

__all__ = ["QuantConfig", "SCOPES"]

SCOPES = ("aqd_star", "aqd")

BitsOverride = Union[None, int, Dict[str, Optional[int]]]


def _to_plain(cfg):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


def _check_names(value, what):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quant.{what} must be None or a list of module names; got {value!r}.")
    return tuple(value)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "lsq"
    weight_bits: int = 4
    act_bits: int = 4
    output_bits: int = 8
    scope: str = "aqd_star"
    first_last_bits: Optional[int] = 8
    input_layers: Optional[Tuple[str, ...]] = None
    output_layers: Optional[Tuple[str, ...]] = None
    overrides: Dict[str, BitsOverride] = field(default_factory=dict)
    keep_unknown_fp32: bool = False
    multi_level_bn: bool = True
    integer_bias: bool = False
    step_init: str = "mse"
    weight_granularity: str = "tensor"
    calib_images: int = 256

    @classmethod
    def from_cfg(cls, cfg) -> "QuantConfig":
        """Build from the ``quant`` node (DictConfig or dict) or return a QuantConfig as is;
        every field is validated with an error naming the allowed values."""
        if isinstance(cfg, QuantConfig):
            return cfg
        cfg = _to_plain(cfg)
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ValueError(f"The quant config must be a dict; got {type(cfg).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"Unknown quant config keys {unknown}; allowed: {known}.")
        kw = dict(cfg)
        method = kw.get("method", cls.method)
        if method not in QUANTIZERS:
            allowed = sorted(name for name, _ in QUANTIZERS)
            raise ValueError(f"quant.method must be one of {allowed}; got {method!r}.")
        for key in ("weight_bits", "act_bits", "output_bits"):
            if key in kw:
                check_bits(kw[key], f"quant.{key}")
        if kw.get("first_last_bits", 8) is not None:
            check_bits(kw.get("first_last_bits", 8), "quant.first_last_bits")
        scope = kw.get("scope", cls.scope)
        if scope not in SCOPES:
            raise ValueError(f"quant.scope must be one of {list(SCOPES)}; got {scope!r}.")
        for key in ("input_layers", "output_layers"):
            kw[key] = _check_names(kw.get(key), key)
        overrides = kw.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"quant.overrides must be a dict; got {overrides!r}.")
        for pattern, bits in overrides.items():
            if isinstance(bits, dict):
                bad = set(bits) - {"weight_bits", "act_bits"}
                if bad:
                    raise ValueError(
                        f"quant.overrides[{pattern!r}] may only set weight_bits / act_bits; "
                        f"got {sorted(bad)}."
                    )
                for k, v in bits.items():
                    check_bits(v, f"quant.overrides[{pattern!r}].{k}")
            elif bits is not None:
                check_bits(bits, f"quant.overrides[{pattern!r}]")
        kw["overrides"] = dict(overrides)
        for key in ("keep_unknown_fp32", "multi_level_bn", "integer_bias"):
            if key in kw and not isinstance(kw[key], bool):
                raise ValueError(f"quant.{key} must be a bool; got {kw[key]!r}.")
        if kw.get("step_init", cls.step_init) not in STEP_INITS:
            raise ValueError(f"quant.step_init must be one of {list(STEP_INITS)}; got {kw['step_init']!r}.")
        granularity = kw.get("weight_granularity", cls.weight_granularity)
        if granularity not in GRANULARITIES:
            raise ValueError(f"quant.weight_granularity must be one of {list(GRANULARITIES)}; got {granularity!r}.")
        calib = kw.get("calib_images", cls.calib_images)
        if isinstance(calib, bool) or not isinstance(calib, int) or calib < 0:
            raise ValueError(f"quant.calib_images must be an int >= 0; got {calib!r}.")
        return cls(**kw)
