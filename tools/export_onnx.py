#!/usr/bin/env python
"""
Export a trained detector's network (backbone + FPN + head) to ONNX and run it in ONNX Runtime
(hqod.deploy):

    python tools/export_onnx.py --config-file configs/retina_r18_lsq_w4.py \
        [--checkpoint PATH] [--output FILE] [--opset N] [--verify [--num-images N] [--float64]] [key=value ...]

A quantized detector (scope aqd_star: LSQ, TQT, AQD* configs) is exported with
QuantizeLinear/DequantizeLinear around every quantized conv, on the grids QAT trained, BN folded;
an FP32 detector as plain ONNX. Resizing, anchor decoding and NMS stay in detectron2's Python
post-processing (hqod.deploy.OnnxDetector). Default output: <checkpoint name>.onnx next to the
checkpoint (default train.output_dir/model_final.pth). Prints the file size and the kernels
ONNX Runtime runs the convolutions with (QLinearConv: integer; Conv/FusedConv: float).
--verify runs the PyTorch model and ONNX Runtime on the first N test images: head outputs in
output steps, detections after NMS matched one to one, COCO AP of both (target |diff| <= 0.1);
--float64 also against the PyTorch model computing in float64 (the same function, exact rounding).
A mistake gives one error line (exit code 2; --debug for the traceback).
"""
import argparse
import json
import os
import tempfile

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import instantiate

from hqod.data import ensure_datasets
from hqod.deploy import OnnxDetector, OnnxExportError, compare_onnx_model, conv_kernel_counts, executed_kernels, export_onnx
from hqod.engine import UserError, export_tool_main, final_checkpoint, load_config, load_trained_model, run_tool

MAX_AP_DIFF = 0.1  # the deployment issue's target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--checkpoint", default="", help="default: train.output_dir/model_final.pth")
    parser.add_argument("--output", default="", help="ONNX file (default: <checkpoint name>.onnx next to it)")
    parser.add_argument("--opset", type=int, default=13, help="ONNX opset (13 or later)")
    parser.add_argument("--trace-size", type=int, default=256, help="side of the zero image traced (H, W stay dynamic)")
    parser.add_argument("--verify", action="store_true", help="compare with the PyTorch model on test images")
    parser.add_argument("--num-images", type=int, default=0, help="test images to verify on (0: all)")
    parser.add_argument("--float64", action="store_true", help="--verify: also compare with the PyTorch model computing in float64")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--report-json", default="", help="also write the figures as JSON here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def main(args):
    cfg = load_config(args.config_file, args.opts)
    checkpoint = final_checkpoint(cfg, args.checkpoint)
    model = load_trained_model(cfg, args.config_file, checkpoint)
    output = args.output or os.path.splitext(checkpoint)[0] + ".onnx"
    if os.path.abspath(output) == os.path.abspath(checkpoint):
        raise UserError(f"--output {output} is the checkpoint itself; name another file.")
    divisibility = max(model.backbone.size_divisibility, 1)
    side = -(-args.trace_size // divisibility) * divisibility
    try:
        info = export_onnx(model, output, image_size=(side, side), opset=args.opset)
    except OnnxExportError as e:
        raise UserError(str(e)) from e
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        detector = OnnxDetector(model, output, threads=args.threads or None, optimized_model=optimized)
        kernels = executed_kernels(optimized)
    integer, floating = conv_kernel_counts(kernels)
    result = dict(info, output=output, size_mib=os.path.getsize(output) / 2**20, kernels=kernels)
    print(
        f"ONNX model saved to {output} ({result['size_mib']:.2f} MiB, opset {args.opset}, "
        f"{info['quantized_convs']} quantized convs as Q/DQ). ONNX Runtime runs {integer} convolutions "
        f"as integer kernels and {floating} in float.", flush=True,
    )
    if args.verify:
        names = cfg.dataloader.test.dataset.names
        names = [names] if isinstance(names, str) else list(names)
        ensure_datasets(names)
        report = compare_onnx_model(
            model, detector, instantiate(cfg.dataloader.test),
            num_images=args.num_images or None, dataset_name=names[0], reference64=args.float64,
        )
        print(report.format())
        for which, diff in (("float32 (as run)", report.ap_diff), ("float64", report.ap_diff64)):
            if diff is not None:
                print(f"  verdict vs PyTorch {which}: COCO AP within {MAX_AP_DIFF}: {'yes' if diff <= MAX_AP_DIFF else 'NO'}")
        result["verify"] = report.to_dict()
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run(args):
    return run_tool(main, args)


if __name__ == "__main__":
    export_tool_main(run, parse_args())
