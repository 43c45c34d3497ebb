#!/usr/bin/env python
"""
The accuracy and harmony benchmark on the embedded dataset (HQOD Tables I/IV, Figs. 2, 4, 5):
RetinaNet-R18 FP32; LSQ, LSQ+HQOD, AQD, AQD+HQOD at W4 and W2; TCorr-only and HIoU-only
(LSQ W2, Table IV). Each run is ``tools/train_net.py`` in its own process with a fixed seed;
every QAT run fine-tunes the same FP32 detector.

    python tools/benchmark_accuracy.py --seeds 0 1 --fp32-checkpoint output/retina_r18_fp32/model_final.pth

Without ``--fp32-checkpoint`` the FP32 detector is trained first (per seed). Results go to
``--output-dir`` (default ``output/benchmark_accuracy``): ``seed<S>/<run>/`` per run (a finished
run is not repeated, an interrupted one resumes), ``results.md`` (the table, the targets, the
commands) and Fig. 2/4/5-style PNGs from the first seed.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import hqod  # noqa: F401

from hqod.evaluation import harmony_metrics
from hqod.evaluation.harmony_plots import (
    load_tp_records,
    plot_gap_histogram,
    plot_iou_bin_difference,
    plot_score_iou_density,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run name -> (config under configs/, extra overrides)
RUNS = {
    "fp32": ("retina_r18_fp32", []),
    "lsq_w4": ("retina_r18_lsq_w4", []),
    "lsq_w4_hqod": ("retina_r18_lsq_w4_hqod", []),
    "aqd_w4": ("retina_r18_aqd_w4", []),
    "aqd_w4_hqod": ("retina_r18_aqd_w4_hqod", []),
    "lsq_w2": ("retina_r18_lsq_w2", []),
    "lsq_w2_hqod": ("retina_r18_lsq_w2_hqod", []),
    "lsq_w2_tcorr": ("retina_r18_lsq_w2_hqod", ["model.hiou=False"]),
    "lsq_w2_hiou": ("retina_r18_lsq_w2_hqod", ["model.tcorr=False"]),
    "aqd_w2": ("retina_r18_aqd_w2", []),
    "aqd_w2_hqod": ("retina_r18_aqd_w2_hqod", []),
}
COLUMNS = [  # (header, results.json task, key, format)
    ("AP", "bbox", "AP", "{:.2f}"),
    ("AP50", "bbox", "AP50", "{:.2f}"),
    ("AP75", "bbox", "AP75", "{:.2f}"),
    ("mean gap", "harmony", "mean_gap", "{:.3f}"),
    ("gap<0.1 %", "harmony", "gap_0.0-0.1", "{:.2f}"),
    ("ideal %", "harmony", "ideal", "{:.1f}"),
    ("corr(p, u)", "harmony", "corr", "{:.3f}"),
    ("TPs", "harmony", "num_tp", "{:.0f}"),
]


def run_dir(output_dir, seed, name):
    return os.path.join(output_dir, f"seed{seed}", name)


def command(name, seed, output_dir, fp32_checkpoint):
    """The train_net.py command line of one run."""
    config, extra = RUNS[name]
    out = run_dir(output_dir, seed, name)
    cmd = [sys.executable, "tools/train_net.py", "--config-file", f"configs/{config}.py"]
    if name == "fp32" and fp32_checkpoint:
        cmd.append("--eval-only")
    elif os.path.isdir(out):
        cmd.append("--resume")  # an interrupted run continues
    opts = [f"train.output_dir={out}", f"train.seed={seed}", *extra]
    if name == "fp32":
        if fp32_checkpoint:
            opts.append(f"train.init_checkpoint={fp32_checkpoint}")
    else:
        opts.append(f"train.init_checkpoint={fp32_checkpoint or os.path.join(run_dir(output_dir, seed, 'fp32'), 'model_final.pth')}")
    return cmd + opts


def run(name, seed, output_dir, fp32_checkpoint):
    """Run one benchmark entry unless its results exist; returns its record."""
    out = run_dir(output_dir, seed, name)
    record_file = os.path.join(out, "benchmark.json")
    if os.path.isfile(record_file):
        with open(record_file) as f:
            record = json.load(f)
        # the harmony metrics of this version, from the run's TP records
        record["results"]["harmony"] = harmony_metrics(*load_tp_records(os.path.join(out, "inference")))
        return record
    cmd = command(name, seed, output_dir, fp32_checkpoint)
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(out, "stdout.txt"), "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {name} (seed {seed}) failed with exit code {proc.returncode}; see {out}/stdout.txt")
    with open(os.path.join(out, "inference", "results.json")) as f:
        results = json.load(f)
    record = {"name": name, "seed": seed, "command": " ".join(["python", *cmd[1:]]), "wall_s": wall, "results": results}
    with open(record_file, "w") as f:
        json.dump(record, f, indent=2)
    return record


def _value(record, task, key):
    return record["results"].get(task, {}).get(key, float("nan"))


def summarize(records, names, seeds):
    """Markdown table: one row per run, mean over seeds and (with several) the min-max spread."""
    head = "| run | " + " | ".join(h for h, *_ in COLUMNS) + " | wall (min) |"
    lines = [head, "|---" + "|---:" * (len(COLUMNS) + 1) + "|"]
    for name in names:
        rs = [records[(name, s)] for s in seeds if (name, s) in records]
        cells = []
        for _, task, key, fmt in COLUMNS:
            v = np.array([_value(r, task, key) for r in rs])
            cell = fmt.format(v.mean())
            if len(v) > 1:
                cell += f" ({fmt.format(v.min())}–{fmt.format(v.max())})"
            cells.append(cell)
        wall = np.mean([r["wall_s"] for r in rs]) / 60
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall:.1f} |")
    return "\n".join(lines)


def _mean(records, name, seeds, task, key):
    v = [_value(records[(name, s)], task, key) for s in seeds if (name, s) in records]
    return float(np.mean(v)) if v else float("nan")


def targets(records, seeds):
    """The issue's targets, each with the measured numbers and met/missed."""
    m = lambda name, key, task="bbox": _mean(records, name, seeds, task, key)  # noqa: E731
    out = []

    def check(text, ok, detail):
        if not np.isnan(ok):
            out.append(f"- {text}: {'met' if ok else 'missed'} ({detail})")

    for method in ("lsq", "aqd"):
        h4, fp = m(f"{method}_w4_hqod", "AP"), m("fp32", "AP")
        check(f"{method.upper()}+HQOD W4 AP >= FP32 AP", float(h4 >= fp) if not np.isnan(h4 + fp) else np.nan, f"{h4:.1f} vs {fp:.1f}")
        for key in ("AP", "AP75"):
            h2, b2 = m(f"{method}_w2_hqod", key), m(f"{method}_w2", key)
            check(f"{method.upper()}+HQOD W2 {key} >= baseline + 1.0", float(h2 >= b2 + 1.0) if not np.isnan(h2 + b2) else np.nan, f"{h2:.1f} vs {b2:.1f}")
        for bits in (4, 2):
            h, b = m(f"{method}_w{bits}_hqod", "gap_0.0-0.1", "harmony"), m(f"{method}_w{bits}", "gap_0.0-0.1", "harmony")
            check(f"{method.upper()} W{bits}: TP share with gap < 0.1 higher with HQOD", float(h > b) if not np.isnan(h + b) else np.nan, f"{h:.1f}% vs {b:.1f}%")
        g = [m(n, "mean_gap", "harmony") for n in ("fp32", f"{method}_w4", f"{method}_w2")]
        check(f"{method.upper()}: mean |score - IoU| grows as bits drop (FP32 < W4 < W2)", float(g[0] < g[1] < g[2]) if not np.isnan(sum(g)) else np.nan, " < ".join(f"{x:.3f}" for x in g))
        c = [m(n, "corr", "harmony") for n in ("fp32", f"{method}_w4", f"{method}_w2")]
        check(f"{method.upper()}: score-IoU correlation drops as bits drop (FP32 > W4 > W2)", float(c[0] > c[1] > c[2]) if not np.isnan(sum(c)) else np.nan, " > ".join(f"{x:.3f}" for x in c))
    return "\n".join(out)


def figures(output_dir, seed):
    """Fig. 2/4/5-style PNGs of the runs of ``seed`` that exist."""
    tps = {}
    for name in RUNS:
        path = os.path.join(run_dir(output_dir, seed, name), "inference", "harmony_tp.json")
        if os.path.isfile(path):
            tps[name] = load_tp_records(path)
    made = []
    pick = lambda names: {n: tps[n] for n in names if n in tps}  # noqa: E731
    if pick(["fp32", "lsq_w4", "lsq_w2"]):
        made.append(plot_score_iou_density(pick(["fp32", "lsq_w4", "lsq_w2"]), os.path.join(output_dir, "fig2_score_iou_density.png")))
    if pick(["fp32", "lsq_w4", "lsq_w2", "lsq_w2_hqod"]):
        made.append(plot_gap_histogram(pick(["fp32", "lsq_w4", "lsq_w2", "lsq_w2_hqod"]), os.path.join(output_dir, "fig5_gap_histogram.png")))
    for run in ("lsq_w2_tcorr", "lsq_w2_hqod"):
        if run in tps and "lsq_w2" in tps:
            made.append(plot_iou_bin_difference(tps[run], tps["lsq_w2"], os.path.join(output_dir, f"fig4_{run}_vs_lsq_w2.png"), names=(run, "lsq_w2")))
    return made


def _from_root(path):
    """``path`` relative to the repository root when inside it (commands run there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="default: all")
    parser.add_argument("--fp32-checkpoint", help="evaluate and fine-tune this FP32 detector instead of training one per seed")
    parser.add_argument("--output-dir", default="output/benchmark_accuracy")
    args = parser.parse_args(argv)
    if args.fp32_checkpoint and not os.path.isfile(args.fp32_checkpoint):
        sys.exit(f"error: --fp32-checkpoint {args.fp32_checkpoint} does not exist.")
    names = (["fp32"] if "fp32" not in args.runs else []) + args.runs  # QAT needs the FP32 run
    names = sorted(set(names), key=list(RUNS).index)
    output_dir, fp32 = _from_root(args.output_dir), args.fp32_checkpoint and _from_root(args.fp32_checkpoint)
    os.chdir(ROOT)  # the commands (and the paths above) are relative to the repository root

    records = {}
    for seed in args.seeds:
        for name in names:
            records[(name, seed)] = run(name, seed, output_dir, fp32)

    made = figures(output_dir, args.seeds[0])
    text = "\n".join(
        [
            f"Machine: {platform.machine()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; seeds {args.seeds}",
            "",
            summarize(records, names, args.seeds),
            "",
            "Targets:",
            targets(records, args.seeds),
            "",
            "Figures: " + ", ".join(os.path.relpath(p, output_dir) for p in made),
            "",
            "Commands:",
            *[f"- `{records[(n, s)]['command']}`" for s in args.seeds for n in names],
        ]
    )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
