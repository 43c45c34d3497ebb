#!/usr/bin/env python
"""
Time QAT training steps against the FP32 model: forward + backward + SGD step of the same
detector (same weights, same batch), interleaved repetitions, median per variant.

Variants: FP32; LSQ / TQT / LQ under scope AQD* (convs only + multi-level BN) and AQD (also BN
outputs and adds, integer-aware: AQD Eq. 4-7); ``lq-aqd-float``: AQD with the integer-aware
arithmetic off (float BN and sums, ``set_integer_aware(model, False)``); LSQ through PyTorch's
fused learnable op (``lsq_torch``, the peer). ``--clock process`` times the process's CPU time
instead of the wall clock (steadier on a machine shared with other jobs).
Defaults: RetinaNet-R18-FPN (width 256), 80 classes, 320x320 images, batch 2, 2 threads, W4A4.

    python tools/benchmark_qat.py --reps 5

Prints a markdown table of median step times and ratios to FP32 (``--out`` also writes it).
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import hqod  # noqa: F401  (quiets detectron2 v0.6 deprecation noise)
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.quantization import calibrate, quantize_model, set_integer_aware
from hqod.quantization.functional import get_backend, set_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    # name: (method, scope) — None = FP32
    "fp32": None,
    "lsq-aqd*": ("lsq", "aqd_star"),
    "lsq_torch-aqd*": ("lsq_torch", "aqd_star"),
    "tqt-aqd*": ("tqt", "aqd_star"),
    "lq-aqd*": ("lq", "aqd_star"),
    "lsq-aqd": ("lsq", "aqd"),
    "tqt-aqd": ("tqt", "aqd"),
    "lq-aqd": ("lq", "aqd"),
    "lq-aqd-float": ("lq", "aqd"),  # integer-aware arithmetic off
}
TARGETS = {"lsq-aqd*": 1.10, "lsq-aqd": 1.20, "tqt-aqd": 1.20, "lq-aqd": 1.20}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_batch(batch_size, size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.35 + 8
        boxes = torch.cat([xy, xy + wh], dim=1).clamp(max=size - 1)
        inst = Instances(
            (size, size),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.randint(0, num_classes, (4,), generator=g),
        )
        image = torch.rand(3, size, size, generator=g) * 255
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def build_variants(args):
    cfg = LazyConfig.load(os.path.join(ROOT, args.config))
    cfg.model.num_classes = args.num_classes
    cfg.model.backbone.out_channels = args.width
    torch.manual_seed(0)
    fp32 = instantiate(cfg.model)
    fp32.train()
    calib = [make_batch(args.batch, args.size, args.num_classes, seed=1)]
    models = {}
    for name in args.variants:
        spec = VARIANTS[name]
        model = copy.deepcopy(fp32)
        if spec is not None:
            method, scope = spec
            quant = dict(method=method, scope=scope, weight_bits=args.bits, act_bits=args.bits)
            quantize_model(model, quant)
            if name.endswith("-float"):
                set_integer_aware(model, False)
            calibrate(model, calib, num_images=args.batch)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=1e-4)
        models[name] = (model, opt)
    return models


def train_step(model, opt, batch, clock=time.perf_counter):
    start = clock()
    losses = model(batch)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()
    return clock() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/retina_r18_fp32.py")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--width", type=int, default=256, help="FPN and head channels (papers: 256)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backend", default="auto", choices=["auto", "inductor", "eager"],
                        help="fake-quant kernels of the lsq/tqt/lq quantizers")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="wall clock, or the process's CPU time (all threads)")
    parser.add_argument("--out", default="", help="also write the markdown table here")
    args = parser.parse_args(argv)
    if "fp32" not in args.variants:
        args.variants = ["fp32"] + args.variants
    torch.set_num_threads(args.threads)
    set_backend(args.backend)

    models = build_variants(args)
    batch = make_batch(args.batch, args.size, args.num_classes)
    times = {name: [] for name in models}
    ratios = {name: [] for name in models}
    with EventStorage():
        for rep in range(args.warmup + args.reps):
            # interleaved: every repetition times each variant once, in a rotating order
            order = list(models)
            order = order[rep % len(order):] + order[: rep % len(order)]
            clock = time.process_time if args.clock == "process" else time.perf_counter
            step = {name: train_step(*models[name], batch, clock) for name in order}
            if rep >= args.warmup:
                for name, t in step.items():
                    times[name].append(t)
                    ratios[name].append(t / step["fp32"])
            print(f"rep {rep}: " + ", ".join(f"{n} {t:.2f}s" for n, t in step.items()), file=sys.stderr)

    fp32_median = statistics.median(times["fp32"])
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    cmd = "python tools/benchmark_qat.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads; "
        f"{datetime.date.today().isoformat()}  ",
        f"Model: {args.config} ({args.num_classes} classes), {args.size}x{args.size}, batch "
        f"{args.batch}, W{args.bits}A{args.bits}, {args.reps} timed steps per variant "
        f"(+{args.warmup} warm-up), interleaved; {args.clock} clock; load average at the end "
        f"{load}; fake-quant backend {get_backend()}.",
        "",
        "| variant | method | scope | median step (s) | ratio (medians) | ratio (median of per-rep) | min step (s) | ratio (mins) | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        spec = VARIANTS[name] or ("—", "FP32")
        med = statistics.median(times[name])
        target = f"≤ {TARGETS[name]:.2f}" if name in TARGETS else ""
        low = min(times[name])
        lines.append(
            f"| {name} | {spec[0]} | {spec[1]} | {med:.3f} | {med / fp32_median:.3f} | "
            f"{statistics.median(ratios[name]):.3f} | {low:.3f} | {low / min(times['fp32']):.3f} | {target} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
