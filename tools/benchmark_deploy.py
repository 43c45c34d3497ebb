#!/usr/bin/env python
"""
Deployment speed and size (issue 17): the network of RetinaNet-R18 (backbone + FPN + head, batch
1) run by ONNX Runtime on the int8 Q/DQ export, by ONNX Runtime in FP32, by PyTorch in FP32 and
by PyTorch as the fake-quant model; medians of interleaved repetitions, at 1 and 2 threads.

    python tools/benchmark_deploy.py [--shapes digits coco] [--threads 1 2] [--reps 5] [--bits 4] [--scope aqd_star]

Shapes: ``digits`` = the digits config as it is (10 classes, its FPN width, its test image size,
square); ``coco`` = 80 classes, FPN width 256, a 800x1333 image (padded to 800x1344). The
quantized model is the config's LSQ W<bits>A<bits> (first and last layers at 8 bits) of scope
``--scope``: ``aqd_star`` (convs quantized; the residual and FPN adds in float) or ``aqd`` (also
the BN outputs and adds, on 8-bit grids: every conv output but the predictors' quantized), with
weights from a seeded initialization, BN statistics and quantizer steps from synthetic
images: speed does not depend on what the weights learned. Also reported: the ONNX file sizes,
how many convolutions ONNX Runtime runs as integer kernels (QLinearConv) and in float, and from
ONNX Runtime's profiler the share of the int8 model's time in each kind of kernel. Prints a
markdown table; ``--out`` (default output/benchmark_deploy/results_<scope>.md) also writes it,
with the command, machine and date, and the figures as JSON beside it.
"""
import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import hqod  # noqa: F401  (quiets detectron2 v0.6 deprecation noise)
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.benchmark import cpu_name, git_commit, machine
from hqod.deploy import DetectorNetwork, conv_kernel_counts, executed_kernels, export_onnx, session_options
from hqod.quantization import calibrate, quantize_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/retina_r18_fp32.py"
VARIANTS = ("ort-int8", "ort-fp32", "torch-fp32", "torch-fakequant")
TARGET_SPEEDUP = 2.0  # ONNX Runtime int8 vs ONNX Runtime FP32, COCO size
TARGET_SIZE_RATIO = 3.5  # FP32 file / W4 file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["digits", "coco"], choices=["digits", "coco"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per variant")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits of the quantized model")
    parser.add_argument("--scope", default="aqd_star", choices=["aqd_star", "aqd"], help="quantization scope of the LSQ model")
    parser.add_argument("--out", default="", help="default: output/benchmark_deploy/results_<scope>.md")
    return parser.parse_args(argv)


def _synthetic(size, n, seed):
    """``n`` random images of ``size`` with one box each (detectron2 inputs)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    box = Boxes(torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h]]))
    return [
        {"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w,
         "instances": Instances((h, w), gt_boxes=box, gt_classes=torch.tensor([1]))}
        for _ in range(n)
    ]


def build_models(shape: str, bits: int, scope: str = "aqd_star"):
    """(FP32 model, quantized model, image size (H, W)) of a shape."""
    cfg = LazyConfig.load(os.path.join(ROOT, CONFIG))
    if shape == "coco":
        cfg.model.num_classes = 80
        cfg.model.backbone.out_channels = 256
        size = (800, 1333)
    else:
        side = instantiate(cfg.dataloader.test.mapper.augmentations[0]).short_edge_length[0]
        size = (side, side)
    torch.manual_seed(0)
    fp32 = instantiate(cfg.model)
    fp32.train()
    with torch.no_grad(), EventStorage():  # BN statistics of (synthetic) data, not the init's
        for image in _synthetic(size, 2, seed=1):
            fp32([image])
    fp32.eval()
    quantized = copy.deepcopy(fp32)
    quantize_model(quantized, dict(method="lsq", scope=scope, weight_bits=bits, act_bits=bits))
    quantized.eval()
    with torch.no_grad():
        calibrate(quantized, [[image] for image in _synthetic(size, 2, seed=2)], num_images=2)
    return fp32, quantized.eval(), size


def _ort_session(path, threads, profile_prefix=""):
    import onnxruntime as ort

    options = session_options(threads)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def kernel_time_shares(path, images, threads, tmp):
    """From one profiled run: the share of the int8 model's kernel time per op type."""
    session = _ort_session(path, threads, os.path.join(tmp, "profile"))
    session.run(None, {"images": images})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    totals = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0) + e["dur"]
    whole = sum(totals.values()) or 1
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def bench_shape(shape, args, tmp):
    fp32, quantized, size = build_models(shape, args.bits, args.scope)
    images_tensor = fp32.preprocess_image(_synthetic(size, 1, seed=3)).tensor
    images = images_tensor.numpy()
    paths = {"fp32": os.path.join(tmp, f"{shape}_fp32.onnx"), "int8": os.path.join(tmp, f"{shape}_w{args.bits}.onnx")}
    export_onnx(fp32, paths["fp32"], image_size=tuple(images_tensor.shape[2:]))
    export_onnx(quantized, paths["int8"], image_size=tuple(images_tensor.shape[2:]))
    optimized = os.path.join(tmp, f"{shape}_opt.onnx")
    import onnxruntime as ort

    ort.InferenceSession(paths["int8"], session_options(1, optimized), providers=["CPUExecutionProvider"])
    result = {
        "image": list(images_tensor.shape[2:]),
        "size_mib": {k: os.path.getsize(p) / 2**20 for k, p in paths.items()},
        "kernels": executed_kernels(optimized),
        "times": {},
    }
    nets = {"torch-fp32": DetectorNetwork(fp32).eval(), "torch-fakequant": DetectorNetwork(quantized).eval()}
    for threads in args.threads:
        torch.set_num_threads(threads)  # main() restores the caller's
        sessions = {"ort-int8": _ort_session(paths["int8"], threads), "ort-fp32": _ort_session(paths["fp32"], threads)}
        run = {
            "ort-int8": lambda: sessions["ort-int8"].run(None, {"images": images}),
            "ort-fp32": lambda: sessions["ort-fp32"].run(None, {"images": images}),
            "torch-fp32": lambda: nets["torch-fp32"](images_tensor),
            "torch-fakequant": lambda: nets["torch-fakequant"](images_tensor),
        }
        samples = {v: [] for v in VARIANTS}
        with torch.no_grad():
            for v in VARIANTS:  # warm-up
                run[v]()
            for _ in range(args.reps):
                for v in VARIANTS:
                    start = time.perf_counter()
                    run[v]()
                    samples[v].append(time.perf_counter() - start)
        result["times"][threads] = {v: statistics.median(s) for v, s in samples.items()}
        print(f"[{shape}, {threads} thread(s)] " + ", ".join(f"{v} {1000 * t:.0f} ms" for v, t in result["times"][threads].items()), flush=True)
    result["kernel_time_shares"] = kernel_time_shares(paths["int8"], images, max(args.threads), tmp)
    return result


def format_report(results, args):
    lines = [
        f"RetinaNet-R18 network, batch 1, LSQ W{args.bits}A{args.bits} (scope {args.scope}) for the quantized "
        f"variants; medians of {args.reps} interleaved repetitions.",
        "",
        "| shape (image) | threads | ORT int8 | ORT FP32 | PyTorch FP32 | PyTorch fake-quant | ORT int8 vs ORT FP32 | ORT int8 vs PyTorch FP32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for shape, r in results.items():
        for threads, t in r["times"].items():
            speedup = t["ort-fp32"] / t["ort-int8"]
            lines.append(
                f"| {shape} ({r['image'][0]}x{r['image'][1]}) | {threads} | {1000 * t['ort-int8']:.0f} ms | "
                f"{1000 * t['ort-fp32']:.0f} ms | {1000 * t['torch-fp32']:.0f} ms | {1000 * t['torch-fakequant']:.0f} ms | "
                f"{speedup:.2f}x | {t['torch-fp32'] / t['ort-int8']:.2f}x |"
            )
            if shape == "coco":
                verdicts.append(f"ORT int8 >= {TARGET_SPEEDUP:g}x ORT FP32 at the COCO size, {threads} thread(s): "
                                f"{'MET' if speedup >= TARGET_SPEEDUP else 'MISSED'} ({speedup:.2f}x)")
    lines += ["", "| shape | FP32 file | W%d file | ratio | convs as QLinearConv / float | int8 model's kernel time |" % args.bits,
              "|---|---|---|---|---|---|"]
    for shape, r in results.items():
        integer, floating = conv_kernel_counts(r["kernels"])
        shares = ", ".join(f"{op} {100 * s:.0f} %" for op, s in list(r["kernel_time_shares"].items())[:5])
        ratio = r["size_mib"]["fp32"] / r["size_mib"]["int8"]
        lines.append(
            f"| {shape} | {r['size_mib']['fp32']:.2f} MiB | {r['size_mib']['int8']:.2f} MiB | {ratio:.2f}x | "
            f"{integer} / {floating} | {shares} |"
        )
        if args.bits == 4:
            verdicts.append(f"W4 file >= {TARGET_SIZE_RATIO:g}x smaller than FP32 ({shape}): "
                            f"{'MET' if ratio >= TARGET_SIZE_RATIO else 'MISSED'} ({ratio:.2f}x)")
    return "\n".join(lines + [""] + [f"- {v}" for v in verdicts])


def main(args):
    results = {}
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in args.shapes:
                results[shape] = bench_shape(shape, args, tmp)
    finally:
        torch.set_num_threads(threads)
    report = format_report(results, args)
    out = args.out or os.path.join(ROOT, "output", "benchmark_deploy", f"results_{args.scope}.md")
    header = (
        f"`python tools/benchmark_deploy.py {' '.join(sys.argv[1:])}` — {cpu_name()}, {machine()}, "
        f"{datetime.date.today()}, commit {git_commit()}\n\n"
    )
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(header + report + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(parse_args())
