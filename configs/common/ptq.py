"""
Post-training quantization settings: the top-level ``ptq`` node, read by tools/ptq.py
(``hqod.ptq``) and, for the model's structure, by ``hqod.engine.build_model``. Bits, quantizer
and the layers kept 8-bit or FP32 stay in the ``quant`` node. A PTQ config is a QAT config of
the same detector plus this node::

    from .common.ptq import ptq_config, to_ptq
    from .retina_r18_lsq_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

    ptq = ptq_config("regptq")
    to_ptq(train, quant, name="retina_r18_regptq_w4a4")

Fields (validated by ``hqod.ptq.PTQConfig``, which documents them in full):
  method          minmax | mse | adaround | brecq | qdrop | regptq
  calib_images    training images of the calibration (256; never val)
  batch_size      images per calibration batch / reconstruction step (1)
  init_images     images the observers set the steps on (64)
  samples         calls cached per block/layer, at random (128; 0: all)
  iters           optimization steps per block or layer (500; the papers use 2,000-20,000)
  lr, round_lr    Adam: activation steps (4e-5, QDrop's), AdaRound's rounding variables (None:
                  20 / iters, the travel of BRECQ's 1e-3 x 20,000 steps)
  llaq_lr         Adam: LLAQ's parameters (1e-3)
  round_weight    AdaRound's regularizer (0.01), annealed from 20 to 2 after warmup (0.2)
  fisher          BRECQ's squared-gradient weights (None: the method's)
  drop_prob       QDrop's probability of an unquantized activation (None: 0.5 for qdrop/regptq)
  global_loss     Reg-PTQ's FP32 -> quantized head-output loss; box_filter: its two-step filter
  theta_c, theta_i  the filter's FP32 confidence (2e-4) and IoU (0.1) thresholds
  lam, p          weight (1) and exponent (1) of the global loss's box term
  head_quantizer  uniform | llaq (None: llaq for regptq); llaq_layers: None = regression branch
  fold_bn         fold BN into the convs (True; False for quant.scope="aqd")
  window          a sample is a call of a block/layer cropped to window x window output
                  pixels (32; 0: whole maps)
  cache_mb        memory for the samples cached per FP32 pass (4096); seed (0)
"""
import copy
from dataclasses import asdict

from hqod.ptq import PTQConfig

ptq = asdict(PTQConfig())


def ptq_config(method: str):
    """A fresh ``ptq`` node for ``method``."""
    node = copy.deepcopy(ptq)
    node["method"] = method
    return node


def to_ptq(train, quant, *, name: str):
    """PTQ of the QAT config's quantized detector from its FP32 checkpoint
    (``train.init_checkpoint``): weights per output channel (BN folded into them gives every
    channel its own range; BRECQ and QDrop quantize so too), output to ``output/<name>``."""
    quant.weight_granularity = "channel"
    train.output_dir = f"./output/{name}"
