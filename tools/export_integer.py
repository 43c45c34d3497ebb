#!/usr/bin/env python
"""
Export a trained AQD detector to the integer-only engine and verify it against the fake-quant
model (hqod.quantization.integer, AQD Eq. 4-8):

    python tools/export_integer.py --config-file configs/retina_r18_aqd_w4.py \
        [--checkpoint PATH] [--output FILE] [--num-images N] [key=value ...]

Loads the config (with overrides) and the QAT checkpoint (default: train.output_dir/
model_final.pth), converts the model to integer arithmetic, saves it (default: model_integer.pth
next to the checkpoint: the config and the fake-quant state it is built from; read it back with
hqod.quantization.load_integer_model, which rebuilds the same integers), loads the saved file back and runs it and the fake-quant model on the first N images of the test set. Prints the
agreement report — head outputs in output steps, detections after NMS, COCO AP of both — against
the fake-quant model as it runs (float32) and against the same model in float64, and the time
per image of both. A mistake gives one error line (exit code 2; --debug for the traceback).
"""
import argparse
import json
import logging
import math
import os

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import instantiate

from hqod.data import ensure_datasets
from hqod.engine import UserError, export_tool_main, final_checkpoint, load_config, load_trained_model, run_tool
from hqod.quantization import (
    IntegerConversionError,
    compare_integer_model,
    load_integer_model,
    save_integer_model,
)

logger = logging.getLogger("hqod")

# The integer engine issue's tolerances.
MAX_STEPS = 1.0
MAX_AP_DIFF = 0.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="an 'aqd' config")
    parser.add_argument("--checkpoint", default="", help="QAT checkpoint (default: train.output_dir/model_final.pth)")
    parser.add_argument("--output", default="", help="integer model file (default: model_integer.pth next to the checkpoint)")
    parser.add_argument("--num-images", type=int, default=0, help="test images to verify on (0: all)")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 fake-quant reference")
    parser.add_argument("--no-ap", action="store_true", help="skip the COCO evaluation")
    parser.add_argument("--report-json", default="", help="also write the figures as JSON here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def _names(loader_cfg):
    names = loader_cfg.dataset.names
    return [names] if isinstance(names, str) else list(names)


def verdict(report):
    """One line per reference: the integer engine issue's three tolerances."""
    lines = []
    for which, agreement, ap_ref in (
        ("float64", report.float64, report.ap_reference64),
        ("float32", report.float32, report.ap_fake_quant),
    ):
        if agreement is None:
            continue
        checks = [
            (f"head outputs within +-{MAX_STEPS:g} step", agreement.max_step_diff <= MAX_STEPS),
            ("same detections after NMS",
             agreement.detections_matched == agreement.detections_ref == report.detections_integer),
        ]
        if ap_ref is not None and report.ap_integer is not None:
            diff = 0.0 if math.isnan(ap_ref) and math.isnan(report.ap_integer) else abs(report.ap_integer - ap_ref)
            checks.append((f"COCO AP within {MAX_AP_DIFF}", diff <= MAX_AP_DIFF))
        lines.append(
            f"  verdict vs fake-quant {which}: " + "; ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in checks)
        )
    return "\n".join(lines)


def main(args):
    cfg = load_config(args.config_file, args.opts)
    checkpoint = final_checkpoint(cfg, args.checkpoint)
    model = load_trained_model(cfg, args.config_file, checkpoint)
    output = args.output or os.path.join(os.path.dirname(checkpoint) or ".", "model_integer.pth")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:  # converts (to_integer) and saves the config and the fake-quant state it comes from
        save_integer_model(model, cfg, output, config_file=args.config_file, overrides=list(args.opts), checkpoint=checkpoint)
    except IntegerConversionError as e:
        raise UserError(str(e)) from e
    loaded = load_integer_model(output)
    size = os.path.getsize(output) / 2**20
    print(f"Integer model saved to {output} ({size:.1f} MiB); verifying the saved file.", flush=True)

    names = _names(cfg.dataloader.test)
    ensure_datasets(names)
    loader = instantiate(cfg.dataloader.test)
    report = compare_integer_model(
        model, loaded, loader,
        num_images=args.num_images or None,
        reference64=not args.no_float64,
        dataset_name=None if args.no_ap else names[0],
    )
    print(report.format())
    print(verdict(report), flush=True)
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return report


def run(args):
    return run_tool(main, args)


if __name__ == "__main__":
    export_tool_main(run, parse_args())
