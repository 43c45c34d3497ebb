#!/usr/bin/env python
"""
Post-training quantization of a trained FP32 detector, then evaluation:

    python tools/ptq.py --config-file configs/retina_r18_regptq_w4a4.py [key=value ...]

Loads the FP32 detector (``train.init_checkpoint`` of the config: configs/retina_r18_fp32.py's
model_final.pth), folds BN, quantizes (``quant`` node), calibrates on ``ptq.calib_images``
training images by ``ptq.method`` (``ptq`` node, hqod.ptq), saves ``model_final.pth`` and
``config.yaml`` in ``train.output_dir`` and evaluates on the test split (COCOEvaluator,
HarmonyEvaluator); ``ptq_report.json`` there holds the calibration's wall seconds, the process's
peak memory and each block's output error before and after. The checkpoint is read by

    python tools/train_net.py --config-file <same config> --eval-only train.init_checkpoint=<dir>/model_final.pth
    python tools/train_net.py --config-file <same config> train.init_checkpoint=<dir>/model_final.pth   # PTQ -> QAT

Mistakes (unknown method, impossible bits, missing FP32 checkpoint, too few training images, a
layer that cannot be folded) give one error line and exit code 2; nothing is written in the
output directory before the checkpoint is complete.
"""
import json
import logging
import os
import resource

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger

from hqod.engine import Checkpointer, UserError, do_test, load_config, run_tool
from hqod.engine.train_loop import _fp32_checkpoint_missing
from hqod.ptq import PTQConfig, run_ptq
from hqod.quantization import QuantConfig

logger = logging.getLogger("hqod")


def main(args):
    cfg = load_config(args.config_file, args.opts)
    if cfg.get("ptq") is None or cfg.get("quant") is None:
        raise UserError(f"{args.config_file} has no ptq and quant nodes: use a PTQ config (configs/*_<method>_w4a4.py).")
    try:
        QuantConfig.from_cfg(cfg.quant)
        PTQConfig.from_cfg(cfg.ptq)
    except ValueError as e:
        raise UserError(str(e)) from e
    path = cfg.train.init_checkpoint
    if not path or not os.path.isfile(path):
        raise _fp32_checkpoint_missing(path or "<empty train.init_checkpoint>")
    out = cfg.train.output_dir
    final = os.path.join(out, "model_final.pth")
    if os.path.exists(final) and not args.overwrite:
        raise UserError(f"{final} exists (an earlier PTQ run). Choose another train.output_dir=... or add --overwrite.")
    setup_logger(name="hqod")
    setup_logger(name="detectron2")
    fp32 = instantiate(cfg.model)
    Checkpointer(fp32, strict=True).load(path)
    try:
        model, report, seconds = run_ptq(cfg, fp32)
    except ValueError as e:  # configuration the model cannot take: the message says what to change
        raise UserError(str(e)) from e
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    os.makedirs(out, exist_ok=True)
    LazyConfig.save(cfg, os.path.join(out, "config.yaml"))
    with open(os.path.join(out, "ptq_report.json"), "w") as f:
        units = [{"unit": name, "error_before": before, "error_after": after} for name, before, after in report]
        json.dump({"seconds": seconds, "peak_memory_mb": peak_mb, "units": units}, f, indent=1)
    Checkpointer(model, save_dir=out).save("model_final", ptq_seconds=seconds)
    logger.info(f"Saved {final} (calibration {seconds:.0f}s, peak memory {peak_mb:.0f} MB).")
    if args.skip_eval:
        return None
    return do_test(cfg, model)


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier PTQ result in train.output_dir")
    parser.add_argument("--skip-eval", action="store_true", help="calibrate and save only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    run_tool(main, args)
