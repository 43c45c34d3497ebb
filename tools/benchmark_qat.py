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

``--loop`` times the loop ``tools/train_net.py`` runs instead: the same configs, trainer,
hooks and data path (:func:`hqod.engine.build_trainer`, digits images through the resumable
loader and its workers), for ``--iters`` iterations after ``--warmup``, one run per variant and
round, variants interleaved over ``--rounds`` rounds; the per-iteration times are those of
detectron2's IterationTimer (what the training log prints). Only the final evaluation is left
out. ``--shape demo`` is the configs as they are (FPN width 64, 224-288 px, batch 4, 10
classes); ``--shape paper`` the papers' (width 256, 320 px, batch 2, 80 classes). Every variant trains in
float32, or with ``--amp`` with ``train.amp.enabled`` (:mod:`hqod.engine.amp`: the FP32 detector
under bfloat16 autocast, the QAT ones with their convolutions on bfloat16 integer codes), as the
demo's stages do.
``--profile`` adds a breakdown of one run per variant (cProfile, cumulative seconds per
iteration: data, forward, losses, HQOD terms, quantizers, integer BN, backward, optimizer,
metrics, hooks).

    python tools/benchmark_qat.py --loop --shape demo --rounds 3 --iters 30 --profile
"""
import argparse
import copy
import cProfile
import datetime
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time

import torch

import hqod  # noqa: F401  (quiets detectron2 v0.6 deprecation noise)
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.benchmark import cpu_name
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

# --loop: the configs train_net runs (name -> config); the demo's QAT stage is aqd+hqod.
LOOP_VARIANTS = {
    "fp32": "configs/retina_r18_fp32.py",
    "lsq-aqd*": "configs/retina_r18_lsq_w4.py",
    "aqd": "configs/retina_r18_aqd_w4.py",
    "aqd+hqod": "configs/retina_r18_aqd_w4_hqod.py",
}
LOOP_TARGETS = {"lsq-aqd*": 1.15, "aqd": 1.25, "aqd+hqod": 1.25}
LOOP_SHAPES = {
    "demo": [],
    "paper": [
        "model.backbone.out_channels=256",
        "model.num_classes=80",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[320]",
        "dataloader.train.mapper.augmentations.0.max_size=320",
        "dataloader.train.total_batch_size=2",
    ],
}
# What --profile reports: label -> functions whose cumulative time it sums (file suffix, name).
PROFILE_ROWS = {
    "step (run_step)": [("engine/train_loop.py", "run_step")],
    "forward (losses included)": [("meta_arch/dense_detector.py", "forward"), ("meta_arch/retinanet.py", "forward")],
    "  losses (RetinaNet's own)": [("meta_arch/retinanet.py", "losses")],
    "  HQOD terms (p, u, TCorr, HIoU)": [("hqod_mixin.py", "harmony_pairs"), ("hqod/losses.py", "hqod_losses")],
    "  quantizers (forward)": [("quantization/quantizers.py", "forward")],
    "  integer BN (forward)": [("quantization/integer_layers.py", "integer_batch_norm")],
    "backward": [("torch/_tensor.py", "backward")],
    "optimizer step": [("torch/optim/optimizer.py", "wrapper")],
    "metrics (_write_metrics)": [("engine/train_loop.py", "_write_metrics")],
    "hooks after_step": [("engine/train_loop.py", "after_step")],
}


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
    if "out_channels" in cfg.model.backbone:  # an FPN (SSD-lite's levels have fixed widths)
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
        model.to(args.device).train()
        # lr 0: the optimizer does all its work but leaves the weights as they are, so that a
        # random-weight low-bit model (whose BN statistics of near-constant activations can blow
        # gradients up) stays finite over the repetitions; only the time is measured
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
        models[name] = (model, opt)
    return models


def train_step(model, opt, batch, clock=time.perf_counter):
    synchronize = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    synchronize()  # on a GPU, time the kernels, not their launches
    start = clock()
    losses = model(batch)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()
    synchronize()
    return clock() - start


def loop_run(name, args, profile=False):
    """One training run of variant ``name`` as train_net runs it (without the final
    evaluation); returns (per-iteration seconds after warm-up, data seconds, cProfile stats)."""
    from detectron2.config import LazyConfig

    from hqod.engine import build_model, build_trainer

    total = args.warmup + args.iters
    with tempfile.TemporaryDirectory() as out:
        cfg = LazyConfig.load(os.path.join(ROOT, LOOP_VARIANTS[name]))
        cfg = LazyConfig.apply_overrides(
            cfg,
            LOOP_SHAPES[args.shape]
            + [
                f"train.output_dir={out}",
                f"train.max_iter={total}",
                f"train.checkpointer.period={10 * total}",
                f"train.eval_period={10 * total}",
                f"train.log_period={10 * total}",
                # float32 against float32, or with --amp each variant with train.amp (FP32:
                # bfloat16 autocast; QAT: convolutions on bfloat16 integer codes)
                f"train.amp.enabled={args.amp}",
            ],
        )
        # the same FP32 weights for every variant (trained weights: their value ranges matter)
        cfg.train.init_checkpoint = args.fp32_checkpoint
        if "quant" in cfg:
            cfg.quant.calib_images = cfg.dataloader.train.total_batch_size
        del cfg.dataloader.evaluator  # no final evaluation (do_test returns at once)
        model = build_model(cfg)
        trainer, start, _ = build_trainer(cfg, model)
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        trainer.train(start, total)
        if profiler:
            profiler.disable()
        history = trainer.storage.history
        times = [t for t, it in history("time").values() if it >= args.warmup]
        data = [t for t, it in history("data_time").values() if it >= args.warmup]
    return times, data, (pstats.Stats(profiler) if profiler else None)


def profile_rows(stats, iterations):
    """Cumulative seconds per iteration of the functions of :data:`PROFILE_ROWS`."""
    rows = {}
    for label, targets in PROFILE_ROWS.items():
        total = 0.0
        for (filename, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
            if any(filename.endswith(f) and func == fn for f, fn in targets):
                total += ct
        rows[label] = total / iterations
    return rows


def main_loop(args):
    names = ["fp32"] + [n for n in args.loop_variants if n != "fp32"]
    per_run = {n: [] for n in names}
    data = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        medians = {}
        for name in order:
            times, data_times, _ = loop_run(name, args)
            medians[name] = statistics.median(times)
            per_run[name].append(medians[name])
            data[name].append(statistics.median(data_times))
            print(f"round {r}: {name} {medians[name]:.3f} s/iter", file=sys.stderr, flush=True)
        for name in names:
            ratios[name].append(medians[name] / medians["fp32"])
    fp32 = statistics.median(per_run["fp32"])
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    cmd = "python tools/benchmark_qat.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {datetime.date.today().isoformat()}  ",
        f"Loop: tools/train_net.py's trainer, hooks and data path; shape {args.shape} "
        f"({' '.join(LOOP_SHAPES[args.shape]) or 'the configs as they are'}); {args.iters} timed iterations "
        f"after {args.warmup} per run, {args.rounds} interleaved rounds; "
        f"{'train.amp on (bfloat16)' if args.amp else 'float32'}; load average at the end {load}.",
        "",
        "| variant | config | median s/iter | data s/iter | ratio (medians) | ratio (median of per-round) | target |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        med = statistics.median(per_run[name])
        target = f"≤ {LOOP_TARGETS[name]:.2f}" if name in LOOP_TARGETS else ""
        lines.append(
            f"| {name} | {os.path.basename(LOOP_VARIANTS[name])} | {med:.3f} | {statistics.median(data[name]):.3f} | "
            f"{med / fp32:.3f} | {statistics.median(ratios[name]):.3f} | {target} |"
        )
    if args.profile:
        profiles = {}
        for name in names:
            times, _, stats = loop_run(name, args, profile=True)
            profiles[name] = (statistics.median(times), profile_rows(stats, args.warmup + args.iters))
        lines += [
            "",
            "Profile (cProfile, cumulative seconds per iteration, warm-up included; cProfile adds "
            "overhead to Python-heavy parts):",
            "",
            "| part | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
            "| iteration (IterationTimer, median) | " + " | ".join(f"{profiles[n][0]:.3f}" for n in names) + " |",
        ]
        for label in PROFILE_ROWS:
            lines.append(f"| {label} | " + " | ".join(f"{profiles[n][1][label]:.3f}" for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/retina_r18_fp32.py")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--width", type=int, default=256, help="FPN and head channels (papers: 256; FPN detectors)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backend", default="auto", choices=["auto", "inductor", "eager"],
                        help="fake-quant kernels of the lsq/tqt/lq quantizers")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="wall clock, or the process's CPU time (all threads)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the step on a GPU (not with --loop: train.device)")
    parser.add_argument("--out", default="", help="also write the markdown table here")
    parser.add_argument("--loop", action="store_true", help="time the training loop train_net runs")
    parser.add_argument("--shape", default="demo", choices=list(LOOP_SHAPES), help="--loop: demo or paper shapes")
    parser.add_argument("--rounds", type=int, default=3, help="--loop: interleaved rounds")
    parser.add_argument("--iters", type=int, default=30, help="--loop: timed iterations per run")
    parser.add_argument("--loop-variants", nargs="+", default=list(LOOP_VARIANTS), choices=list(LOOP_VARIANTS))
    parser.add_argument("--profile", action="store_true", help="--loop: add a cProfile breakdown")
    parser.add_argument("--amp", action="store_true", help="--loop: every variant with train.amp.enabled (default: float32)")
    parser.add_argument("--fp32-checkpoint", default="", help="--loop: FP32 detector every variant starts from")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_backend(args.backend)
    if args.loop:
        return main_loop(args)
    if args.device != "cpu" and args.clock == "process":
        parser.error("--clock process times the CPU: use the wall clock with --device cuda")
    if "fp32" not in args.variants:
        args.variants = ["fp32"] + args.variants

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
        f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, "
        + (f"{torch.cuda.get_device_name(args.device)}, " if args.device != "cpu" else "")
        + f"torch {torch.__version__}, {args.threads} threads; "
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
