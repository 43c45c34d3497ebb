"""
The ``ptq`` config node (``configs/common/ptq.py``), validated into a :class:`PTQConfig`. Bits,
quantizer, granularity and the layers kept 8-bit or FP32 are the ``quant`` node's (one place,
shared with QAT); the ``ptq`` node says how the quantized model is calibrated.

Fields (None = the method's default, :data:`METHOD_DEFAULTS`):

* ``method``: a name in ``PTQ_METHODS`` — ``minmax``, ``mse`` (observers only), ``adaround``
  (layer-wise reconstruction of the weight rounding, MSE), ``brecq`` (block-wise in the
  backbone, layer-wise in neck and head, Fisher-weighted, AdaRound + activation steps),
  ``qdrop`` (BRECQ + dropping activation quantization with ``drop_prob``), ``regptq`` (QDrop's
  reconstruction + the filtered global loss + LLAQ on the regression branch).
* ``calib_images``: training images used for calibration (never val), default 256.
* ``batch_size``: images per calibration batch (1): a reconstruction sample is one call of a
  unit on one batch, and one step reads one sample.
* ``init_images``: images the observers set the quantizers' steps on before reconstruction (64
  of the calibration images; ``mse``: the steps of least error searched on the next 64).
* ``samples``: calls cached per unit, drawn at random from its calls over the calibration
  images (128; 0: all): a step reads one, so a few hundred steps need no more, and the caches of
  every unit fit one pass of the FP32 model.
* ``iters``: optimization steps per block / layer; ``lr``: Adam's learning rate of the
  activation steps (QDrop: 4e-5); ``round_lr``: of AdaRound's rounding variables (None:
  ``ROUND_TRAVEL / iters``, 0.04 at 500 steps; see below); ``llaq_lr``: of LLAQ's parameters
  (1e-3).

  ``round_lr``: Adam moves a parameter by at most about its learning rate per step, so BRECQ's and
  QDrop's 1e-3 over 20,000 steps let a rounding variable ``V`` travel about 20 in logit space,
  enough to turn any weight's rounding; 1e-3 over our 500 steps allowed 0.5, and only weights
  next to a rounding boundary could change (RetinaNet-R18 W2A4 BRECQ: 0.27 AP, against 39.5 with
  0.01 and 48.1 with the default; BENCHMARKS.md, issue 16). The default keeps the papers' travel
  at any step count.
* ``round_weight``: AdaRound's regularizer weight (0.01), its exponent annealed from 20 to 2
  after a warm-up of ``warmup`` (0.2) of the steps.
* ``fisher``: weight the output error by the squared gradient of the detection loss (BRECQ).
* ``drop_prob``: QDrop's probability of keeping an activation unquantized during
  reconstruction.
* ``global_loss``: Reg-PTQ's global term; ``box_filter``: its two-step filter (FP32
  confidence >= ``theta_c``, then IoU(FP32 box, quantized box) >= ``theta_i``); ``lam``: the
  weight of its box term, ``p``: the exponent of that term (L_p).
* ``head_quantizer``: ``"uniform"`` or ``"llaq"`` (Reg-PTQ's log-affine quantizer) for the
  weights of ``llaq_layers`` (None: the tower and predictor of each declared head's
  ``bbox_pred``). Reconstruction learns the weights' rounding on either grid (AdaRound; on
  LLAQ's levels ``hqod.ptq.reconstruct.AdaRoundLLAQ``).
* ``fold_bn``: fold every conv's BN into its weight and bias before quantizing (the heads'
  per-level BN cannot be folded into one shared conv; it stays as the per-level affine of the
  multi-level BN). Scope ``aqd`` keeps BN as AQD's integer BN: ``fold_bn=False`` there.
* ``window``: a reconstruction sample is one call of a unit cropped to a ``window`` x
  ``window`` window of its output (``hqod.ptq.reconstruct``: memory and time divided by the
  map's area over the window's); 0: whole maps.
* ``cache_mb``: memory for the samples cached per pass of the FP32 model (more units per pass,
  fewer passes); ``seed``: which training images, the drop masks and the batch order.
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Tuple

__all__ = ["PTQConfig", "METHOD_DEFAULTS", "HEAD_QUANTIZERS", "ROUND_TRAVEL"]

HEAD_QUANTIZERS = ("uniform", "llaq")
# Adam's learning rate times the steps of AdaRound's rounding variables in BRECQ and QDrop
# (1e-3 x 20,000): the default round_lr is this over ``iters``
ROUND_TRAVEL = 20.0

# What each method is, as defaults of the fields left None.
METHOD_DEFAULTS = {
    "minmax": dict(step_init="minmax", reconstruct=False),
    "mse": dict(step_init="mse", reconstruct=False),
    "adaround": dict(step_init="mse", reconstruct=True, granularity="layer", fisher=False, learn_act=False),
    "brecq": dict(step_init="mse", reconstruct=True, granularity="block", fisher=True),
    "qdrop": dict(step_init="mse", reconstruct=True, granularity="block", fisher=True, drop_prob=0.5),
    "regptq": dict(
        step_init="mse", reconstruct=True, granularity="block", fisher=True, drop_prob=0.5,
        global_loss=True, box_filter=True, head_quantizer="llaq",
    ),
}


@dataclass(frozen=True)
class PTQConfig:
    method: str = "regptq"
    calib_images: int = 256
    batch_size: int = 1
    iters: int = 500
    lr: float = 4e-5
    round_lr: Optional[float] = None
    llaq_lr: float = 1e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    fisher: Optional[bool] = None
    drop_prob: Optional[float] = None
    global_loss: Optional[bool] = None
    box_filter: Optional[bool] = None
    theta_c: float = 2e-4
    theta_i: float = 0.1
    lam: float = 1.0
    p: float = 1.0
    head_quantizer: Optional[str] = None
    llaq_layers: Optional[Tuple[str, ...]] = None
    fold_bn: bool = True
    window: int = 32
    samples: int = 128
    init_images: int = 64
    cache_mb: int = 4096
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg) -> "PTQConfig":
        """Build from the ``ptq`` node (DictConfig or dict); every field validated with an
        error naming the allowed values; the method's defaults filled in."""
        if isinstance(cfg, PTQConfig):
            return cfg
        from hqod.quantization.config import _to_plain

        kw = dict(_to_plain(cfg) or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kw) - set(known))
        if unknown:
            raise ValueError(f"Unknown ptq config keys {unknown}; allowed: {known}.")
        method = kw.get("method", cls.method)
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"ptq.method must be one of {sorted(METHOD_DEFAULTS)}; got {method!r}.")
        for key in ("calib_images", "batch_size", "iters", "window", "samples", "init_images", "cache_mb"):
            v = kw.get(key, getattr(cls, key))
            low = 0 if key in ("iters", "window", "samples") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"ptq.{key} must be an int >= {low}; got {v!r}.")
        for key in ("lr", "round_lr", "llaq_lr", "round_weight", "lam", "p", "theta_c", "theta_i", "warmup", "drop_prob"):
            v = kw.get(key, getattr(cls, key))
            if v is None and key in ("drop_prob", "round_lr"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"ptq.{key} must be a number >= 0; got {v!r}.")
        for key in ("warmup", "drop_prob", "theta_c", "theta_i"):
            v = kw.get(key)
            if v is not None and v > 1:
                raise ValueError(f"ptq.{key} is a fraction in [0, 1]; got {v!r}.")
        if kw.get("head_quantizer") not in (None,) + HEAD_QUANTIZERS:
            raise ValueError(f"ptq.head_quantizer must be one of {list(HEAD_QUANTIZERS)}; got {kw['head_quantizer']!r}.")
        if kw.get("llaq_layers") is not None:
            layers = kw["llaq_layers"]
            layers = [layers] if isinstance(layers, str) else layers
            if not all(isinstance(n, str) for n in layers):
                raise ValueError(f"ptq.llaq_layers must be None or a list of module-name globs; got {layers!r}.")
            kw["llaq_layers"] = tuple(layers)
        for key in ("fisher", "global_loss", "box_filter", "fold_bn"):
            if kw.get(key) is not None and not isinstance(kw[key], bool):
                raise ValueError(f"ptq.{key} must be a bool; got {kw[key]!r}.")
        return cls(**kw)

    def _default(self, key, fallback):
        value = getattr(self, key, None)
        return METHOD_DEFAULTS[self.method].get(key, fallback) if value is None else value

    # The resolved settings (the field, or the method's default).
    @property
    def reconstruct(self) -> bool:
        return METHOD_DEFAULTS[self.method]["reconstruct"]

    @property
    def step_init(self) -> str:
        return METHOD_DEFAULTS[self.method]["step_init"]

    @property
    def block_wise(self) -> bool:
        return METHOD_DEFAULTS[self.method].get("granularity") == "block"

    @property
    def learn_act(self) -> bool:
        return METHOD_DEFAULTS[self.method].get("learn_act", True)

    def resolved(self) -> "PTQConfig":
        """The config with every None replaced by the method's default."""
        return replace(
            self,
            round_lr=ROUND_TRAVEL / max(self.iters, 1) if self.round_lr is None else self.round_lr,
            fisher=self._default("fisher", False),
            drop_prob=self._default("drop_prob", 0.0),
            global_loss=self._default("global_loss", False),
            box_filter=self._default("box_filter", False),
            head_quantizer=self._default("head_quantizer", "uniform"),
        )

    def as_dict(self):
        return asdict(self)
