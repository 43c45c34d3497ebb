#!/usr/bin/env python
"""
The accuracy and harmony benchmark on the embedded dataset, over seeds (HQOD Tables I/IV,
Figs. 2, 4, 5): RetinaNet-R18 FP32; LSQ, LSQ+HQOD, AQD, AQD+HQOD at W4, W3 and W2; TCorr-only and
HIoU-only (LSQ W2, Table IV); LSQ W2 + HarDet* (Table III); ATSS-R18 FP32, TQT W2 and TQT W2+HQOD;
SSD-lite MobileNetV2 and YOLOX-tiny FP32, LSQ W4 and LSQ W4+HQOD (Table II's lightweight detectors). Each run is
``tools/train_net.py`` in its own process, with the benchmark's schedule (``SCHEDULE``). The FP32
detectors are trained once (seed 0); every QAT run fine-tunes its FP32 detector with its own seed
(``train.seed``): by default 0-2 for the W2 pairs (ATSS's too), 0-1 for the W4 pairs and 0 for the others,
seeds 3-4 of LSQ W2 ± HQOD as more pairs (seed 3 those of TCorr-only and HIoU-only) and seeds 0-3
of HarDet* (``RUNS``). The default plan is about 52 runs; on the 2-core AVX-512 machines of
2026-12-02 (float32) a QAT run takes 13-15 min and the RetinaNet FP32 run about 45-60 min.

    python tools/benchmark_accuracy.py                                  # the whole benchmark
    python tools/benchmark_accuracy.py --runs lsq_w2_hqod --seeds 3     # one run (and its FP32 run)
    python tools/benchmark_accuracy.py --list                           # the plan and its status
    python tools/benchmark_accuracy.py --report-only                    # the report of finished runs

Training goes to ``--output-dir`` (default ``output/benchmark_accuracy``): ``<run>/`` per FP32
run and ``seed<S>/<run>/`` per QAT run (an interrupted run resumes there). A finished run leaves
its record in ``--records-dir`` (default ``benchmarks/accuracy``, tracked in git, so the
benchmark can be finished over several sittings on fresh machines): its command, commit, wall
time, COCO and harmony results, every true positive's score and IoU, and the SHA-256, COCO and
harmony results of the FP32 model it fine-tuned (the SHA-256 of its final model for an FP32 run);
the targets against FP32 compare each run with its own FP32 model. A run with a record is never repeated;
when a QAT run needs an FP32 model whose record exists but whose checkpoint this machine lacks,
the FP32 run is trained again (same command and seed) and the report names any QAT record whose
FP32 model differs from the recorded one. The report, ``results.md`` in the output directory
(per-seed values with mean ± std, HQOD - baseline differences per seed, the targets, the
commands), and Fig. 2/4/5-style PNGs of seed 0 are made from the records.
``--fp32-checkpoint`` evaluates that RetinaNet FP32 detector instead of training one, and the
RetinaNet QAT runs fine-tune it.
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

import hqod  # noqa: F401

from hqod.benchmark import git_commit, machine, relative_to, sha256
from hqod.evaluation import harmony_metrics
from hqod.evaluation.harmony_plots import (
    load_tp_records,
    plot_gap_histogram,
    plot_iou_bin_difference,
    plot_score_iou_density,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Run(NamedTuple):
    config: str  # under configs/
    overrides: List[str]
    fp32: Optional[str]  # the FP32 run it fine-tunes; None: an FP32 run
    seeds: Tuple[int, ...]  # default QAT seeds


RUNS = {
    "fp32": Run("retina_r18_fp32", [], None, (0,)),
    "lsq_w4": Run("retina_r18_lsq_w4", [], "fp32", (0, 1)),
    "lsq_w4_hqod": Run("retina_r18_lsq_w4_hqod", [], "fp32", (0, 1)),
    "aqd_w4": Run("retina_r18_aqd_w4", [], "fp32", (0, 1)),
    "aqd_w4_hqod": Run("retina_r18_aqd_w4_hqod", [], "fp32", (0, 1)),
    "lsq_w3": Run("retina_r18_lsq_w3", [], "fp32", (0,)),
    "lsq_w3_hqod": Run("retina_r18_lsq_w3_hqod", [], "fp32", (0,)),
    "aqd_w3": Run("retina_r18_aqd_w3", [], "fp32", (0,)),
    "aqd_w3_hqod": Run("retina_r18_aqd_w3_hqod", [], "fp32", (0,)),
    # seeds 0-2: target (c); 3: the baseline of Table IV's ablation below; 4: one more pair
    # (this repository's records ran seeds 3-4 on another FP32 model than 0-2)
    "lsq_w2": Run("retina_r18_lsq_w2", [], "fp32", (0, 1, 2, 3, 4)),
    "lsq_w2_hqod": Run("retina_r18_lsq_w2_hqod", [], "fp32", (0, 1, 2, 3, 4)),
    "aqd_w2": Run("retina_r18_aqd_w2", [], "fp32", (0, 1, 2)),
    "aqd_w2_hqod": Run("retina_r18_aqd_w2_hqod", [], "fp32", (0, 1, 2)),
    "lsq_w2_tcorr": Run("retina_r18_lsq_w2_hqod", ["model.hiou=False"], "fp32", (3,)),
    "lsq_w2_hiou": Run("retina_r18_lsq_w2_hqod", ["model.tcorr=False"], "fp32", (3,)),
    # HQOD's Table III baseline: the other harmony loss at W2 (paper: -0.5 AP vs LSQ, HQOD +1.4)
    "lsq_w2_hardet": Run("retina_r18_lsq_w2_hardet", [], "fp32", (0, 1, 2, 3)),
    "atss_fp32": Run("atss_r18_fp32", [], None, (0,)),
    "atss_tqt_w2": Run("atss_r18_tqt_w2", [], "atss_fp32", (0, 1, 2)),
    "atss_tqt_w2_hqod": Run("atss_r18_tqt_w2_hqod", [], "atss_fp32", (0, 1, 2)),
    "ssdlite_fp32": Run("ssdlite_mv2_fp32", [], None, (0,)),
    "ssdlite_lsq_w4": Run("ssdlite_mv2_lsq_w4", [], "ssdlite_fp32", (0, 1)),
    "ssdlite_lsq_w4_hqod": Run("ssdlite_mv2_lsq_w4_hqod", [], "ssdlite_fp32", (0, 1)),
    "yolox_fp32": Run("yolox_tiny_fp32", [], None, (0,)),
    "yolox_lsq_w4": Run("yolox_tiny_lsq_w4", [], "yolox_fp32", (0, 1)),
    "yolox_lsq_w4_hqod": Run("yolox_tiny_lsq_w4_hqod", [], "yolox_fp32", (0, 1)),
}
FP32_SEED = 0
# The benchmark's schedule, added to every FP32 / QAT run (BENCHMARKS.md documents it).
SCHEDULE = {
    "fp32": ["train.max_iter=3000", "train.eval_period=3000", "train.checkpointer.period=500"],
    "qat": ["train.max_iter=1000", "train.eval_period=1000", "train.checkpointer.period=250"],
}
BITS = (4, 3, 2)
# (baseline, variant): compared seed by seed
PAIRS = [
    *[(f"{method}_w{bits}", f"{method}_w{bits}_hqod") for bits in BITS for method in ("lsq", "aqd")],
    ("lsq_w2", "lsq_w2_tcorr"),
    ("lsq_w2", "lsq_w2_hiou"),
    ("lsq_w2", "lsq_w2_hardet"),
    ("atss_tqt_w2", "atss_tqt_w2_hqod"),
    ("ssdlite_lsq_w4", "ssdlite_lsq_w4_hqod"),
    ("yolox_lsq_w4", "yolox_lsq_w4_hqod"),
]
MIN_PAIRED_SEEDS = 3  # for the W2 gain target
# (header, results.json task, key, format); SEED_COLUMNS show per-seed values and mean ± std,
# MEAN_COLUMNS the mean over seeds
SEED_COLUMNS = [
    ("AP", "bbox", "AP", "{:.2f}"),
    ("AP75", "bbox", "AP75", "{:.2f}"),
    ("corr(p, u)", "harmony", "corr", "{:.3f}"),
    ("gap<0.1 %", "harmony", "gap_0.0-0.1", "{:.2f}"),
]
MEAN_COLUMNS = [
    ("AP50", "bbox", "AP50", "{:.2f}"),
    ("mean gap", "harmony", "mean_gap", "{:.3f}"),
    ("ideal %", "harmony", "ideal", "{:.1f}"),
    ("TPs", "harmony", "num_tp", "{:.0f}"),
]


# ------------------------------------------------------------------------------------------
# The plan and its runs
# ------------------------------------------------------------------------------------------
def is_fp32(name):
    return RUNS[name].fp32 is None


def run_dir(output_dir, name, seed):
    """``<output>/<name>`` for an FP32 run (trained once), ``<output>/seed<S>/<name>`` otherwise."""
    return os.path.join(output_dir, name) if is_fp32(name) else os.path.join(output_dir, f"seed{seed}", name)


def record_path(records_dir, name, seed):
    """The record a finished run leaves: ``<records>/<name>.json`` for an FP32 run,
    ``<records>/seed<S>/<name>.json`` otherwise."""
    return run_dir(records_dir, name, seed) + ".json"


def run_seeds(name, seeds=None):
    """The seeds of a run: FP32_SEED for an FP32 run, else ``seeds`` or the run's defaults."""
    return [FP32_SEED] if is_fp32(name) else list(seeds or RUNS[name].seeds)


def plan(names, seeds=None):
    """(name, seed) of ``names`` and the FP32 runs they fine-tune: FP32 runs first, then by seed."""
    needed = set(names) | {RUNS[n].fp32 for n in names if not is_fp32(n)}
    ordered = [n for n in RUNS if n in needed]
    entries = [(n, s) for n in ordered for s in run_seeds(n, seeds)]
    return sorted(entries, key=lambda e: (not is_fp32(e[0]), e[1], ordered.index(e[0])))


def run_status(output_dir, records_dir, name, seed):
    """done (its record exists), partial (its output directory exists) or todo."""
    if os.path.isfile(record_path(records_dir, name, seed)):
        return "done"
    return "partial" if os.path.isdir(run_dir(output_dir, name, seed)) else "todo"


def init_checkpoint(name, output_dir, fp32_checkpoint):
    """What a run starts from: ``fp32_checkpoint`` for the RetinaNet FP32 run and its QAT runs
    when given, else a QAT run's FP32 final model; None: the config's."""
    parent = RUNS[name].fp32
    if fp32_checkpoint and "fp32" in (name, parent):
        return fp32_checkpoint
    if parent:
        return final_model(output_dir, parent)
    return None


def final_model(output_dir, name):
    """The final model an FP32 run writes."""
    return os.path.join(run_dir(output_dir, name, FP32_SEED), "model_final.pth")


def command(name, seed, output_dir, fp32_checkpoint=None):
    """The train_net.py command line of one run."""
    out = run_dir(output_dir, name, seed)
    cmd = [sys.executable, "tools/train_net.py", "--config-file", f"configs/{RUNS[name].config}.py"]
    if name == "fp32" and fp32_checkpoint:
        cmd.append("--eval-only")
    elif os.path.isdir(out):
        cmd.append("--resume")  # an interrupted run continues
    schedule = SCHEDULE["fp32" if is_fp32(name) else "qat"]
    opts = [f"train.output_dir={out}", f"train.seed={seed}", *schedule, *RUNS[name].overrides]
    init = init_checkpoint(name, output_dir, fp32_checkpoint)
    if init:
        opts.append(f"train.init_checkpoint={init}")
    return cmd + opts


def train(name, seed, output_dir, fp32_checkpoint):
    """Run one entry's command (resuming an interrupted one); its wall seconds."""
    out = run_dir(output_dir, name, seed)
    cmd = command(name, seed, output_dir, fp32_checkpoint)
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(out, "stdout.txt"), "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: {name} (seed {seed}) failed with exit code {proc.returncode}; see {out}/stdout.txt")
    return cmd, time.perf_counter() - start


def ensure_fp32_model(name, output_dir, records_dir, fp32_checkpoint):
    """Make sure the FP32 model a QAT run of ``name`` fine-tunes exists on this machine: a
    recorded FP32 run whose checkpoint is missing (a fresh machine) is trained again, and a
    different result is reported (its QAT runs keep their own record of what they fine-tuned)."""
    init = init_checkpoint(name, output_dir, fp32_checkpoint)
    if init is None or os.path.isfile(init):
        return
    parent = RUNS[name].fp32
    train(parent, FP32_SEED, output_dir, fp32_checkpoint)
    recorded = read_record(record_path(records_dir, parent, FP32_SEED)).get("model_sha256")
    trained = sha256(init)
    if recorded and trained != recorded:
        print(f"warning: {parent} trained again differs from its record (SHA-256 {trained[:12]} vs {recorded[:12]}); "
              "the report names the QAT runs of each model.", flush=True)


def run(name, seed, output_dir, records_dir, fp32_checkpoint):
    """Run one benchmark entry unless it has a record; write its record."""
    if run_status(output_dir, records_dir, name, seed) == "done":
        return
    ensure_fp32_model(name, output_dir, records_dir, fp32_checkpoint)
    cmd, wall = train(name, seed, output_dir, fp32_checkpoint)
    inference = os.path.join(run_dir(output_dir, name, seed), "inference")
    with open(os.path.join(inference, "results.json")) as f:
        results = json.load(f)
    scores, ious = load_tp_records(inference)
    init = init_checkpoint(name, output_dir, fp32_checkpoint)
    record = {
        "name": name,
        "seed": seed,
        "command": " ".join(["python", *cmd[1:]]),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "wall_s": wall,
        "results": results,
        # 6 decimals: the harmony metrics' bins and correlation are unchanged at the reported digits
        "tp": {"score": np.round(scores, 6).tolist(), "iou": np.round(ious, 6).tolist()},
    }
    if is_fp32(name):
        record["model_sha256"] = sha256(init if name == "fp32" and fp32_checkpoint else final_model(output_dir, name))
    else:
        record["init_sha256"] = sha256(init)
        # the COCO and harmony results of the FP32 model it fine-tuned (this machine's, which a
        # later sitting may not reproduce)
        fp32_inference = os.path.join(run_dir(output_dir, RUNS[name].fp32, FP32_SEED), "inference")
        with open(os.path.join(fp32_inference, "results.json")) as f:
            record["fp32_bbox"] = json.load(f)["bbox"]
        record["fp32_harmony"] = harmony_metrics(*load_tp_records(fp32_inference))
    path = record_path(records_dir, name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def read_record(path):
    with open(path) as f:
        return json.load(f)


def plan_table(entries, output_dir, records_dir):
    """One line per (run, seed) with its status and the wall minutes of a finished one; totals."""
    width = max(len("run"), *(len(name) for name, _ in entries))
    lines = [f"{'run':<{width}} {'seed':>4}  {'status':<8} {'wall (min)':>10}"]
    done = 0
    for name, seed in entries:
        status = run_status(output_dir, records_dir, name, seed)
        wall = ""
        if status == "done":
            done += 1
            wall = f"{read_record(record_path(records_dir, name, seed))['wall_s'] / 60:.1f}"
        lines.append(f"{name:<{width}} {seed:>4}  {status:<8} {wall:>10}".rstrip())
    lines.append(f"{done} done, {len(entries) - done} remaining")
    return "\n".join(lines)


def tp_arrays(record):
    """(scores, ious) of a record's true positives."""
    return np.asarray(record["tp"]["score"], dtype=np.float64), np.asarray(record["tp"]["iou"], dtype=np.float64)


def finished_records(records_dir):
    """The records under ``records_dir`` (RUNS order, then seed), with the harmony metrics of
    this version recomputed from their true positives."""
    records = []
    for name in RUNS:
        for path in glob.glob(record_path(glob.escape(records_dir), name, "*")):
            record = read_record(path)
            record["results"]["harmony"] = harmony_metrics(*tp_arrays(record))
            records.append(record)
    return sorted(records, key=lambda r: (list(RUNS).index(r["name"]), r["seed"]))


# ------------------------------------------------------------------------------------------
# The report: records are dicts {"name", "seed", "command", "wall_s", "results"}
# ------------------------------------------------------------------------------------------
def values(records, name, key, task="bbox"):
    """{seed: value} of ``name``'s finished seeds, in seed order."""
    found = {r["seed"]: r["results"].get(task, {}).get(key, float("nan")) for r in records if r["name"] == name}
    return dict(sorted(found.items()))


def mean(records, name, key, task="bbox"):
    return float(np.mean(list(values(records, name, key, task).values())))


def mean_std(vals, fmt):
    """``mean ± std`` over seeds (std with ddof=1; "—" for one seed)."""
    vals = np.asarray(vals, dtype=np.float64)
    std = fmt.format(vals.std(ddof=1)) if len(vals) > 1 else "—"
    return f"{fmt.format(vals.mean())} ± {std}"


def per_seed_cell(vals, fmt):
    return " / ".join(fmt.format(v) for v in vals)


def results_table(records):
    """Markdown table, one row per run: per-seed values and mean ± std of SEED_COLUMNS, means of
    MEAN_COLUMNS and of the wall time."""
    head = ["run", "seeds"]
    for header, *_ in SEED_COLUMNS:
        head += [f"{header} per seed", f"{header} mean ± std"]
    head += [header for header, *_ in MEAN_COLUMNS] + ["wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    for name in RUNS:
        seeds = values(records, name, "AP")
        if not seeds:
            continue
        cells = [name, ", ".join(map(str, seeds))]
        for _, task, key, fmt in SEED_COLUMNS:
            vals = list(values(records, name, key, task).values())
            cells += [per_seed_cell(vals, fmt), mean_std(vals, fmt)]
        cells += [fmt.format(mean(records, name, key, task)) for _, task, key, fmt in MEAN_COLUMNS]
        cells.append(f"{np.mean([r['wall_s'] for r in records if r['name'] == name]) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(records, baseline, variant, key, task="bbox"):
    """{seed: variant - baseline} of ``task``'s ``key`` over the seeds both runs finished from the
    same FP32 model (a pair split by a retrained FP32 model that came out different is left out)."""
    base, var = values(records, baseline, key, task), values(records, variant, key, task)
    init = {(r["name"], r["seed"]): r.get("init_sha256") for r in records}
    same = lambda seed: init[baseline, seed] == init[variant, seed]  # noqa: E731
    return {seed: var[seed] - base[seed] for seed in sorted(base.keys() & var.keys()) if same(seed)}


def differences_cell(diffs, fmt="{:+.2f}"):
    """``mean (per seed)`` of paired differences."""
    return f"{fmt.format(np.mean(list(diffs.values())))} ({per_seed_cell(diffs.values(), fmt)})"


def differences_table(records):
    """Markdown table, one row per pair of PAIRS with common seeds: dAP and dAP75 per seed, mean."""
    lines = ["| variant - baseline | seeds | ΔAP mean (per seed) | ΔAP75 mean (per seed) |", "|---|---|---:|---:|"]
    for baseline, variant in PAIRS:
        d_ap, d_ap75 = (paired_differences(records, baseline, variant, key) for key in ("AP", "AP75"))
        if d_ap:
            seeds = ", ".join(map(str, d_ap))
            lines.append(f"| {variant} - {baseline} | {seeds} | {differences_cell(d_ap)} | {differences_cell(d_ap75)} |")
    return "\n".join(lines)


def target_line(records, text, names, measure):
    """``- text: met|missed|not measured (detail)``; not measured while a run of ``names`` has no
    finished seed, else ``measure() -> (ok, detail)`` with ok None for not measured."""
    missing = [name for name in names if not values(records, name, "AP")]
    ok, detail = (None, "missing " + ", ".join(missing)) if missing else measure()
    verdict = "not measured" if ok is None else "met" if ok else "missed"
    return f"- {text}: {verdict} ({detail})"


def fp32_result(records, record, key, task="bbox"):
    """``task``'s ``key`` of the FP32 model a QAT ``record`` fine-tuned: the record's own copy
    (``fp32_bbox`` / ``fp32_harmony``, kept since a new machine may train the FP32 run again),
    else the FP32 run's record when it is that model (or the record does not say); None when
    neither is known."""
    own = record.get(f"fp32_{task}", {}).get(key)
    if own is not None:
        return own
    init = record.get("init_sha256")
    for r in records:
        if r["name"] == RUNS[record["name"]].fp32 and init in (None, r.get("model_sha256")):
            return r["results"][task][key]
    return None


def fp32_reference(records, name):
    """Mean AP of the FP32 models ``name``'s runs fine-tuned (:func:`fp32_result`); None when one
    is unknown."""
    aps = [fp32_result(records, r, "AP") for r in records if r["name"] == name]
    return None if not aps or None in aps else float(np.mean(aps))


def target_against_fp32(records, text, name, ok, label):
    """A target on ``name``'s mean AP against its FP32 reference: ``ok(ap, fp32) -> bool``."""

    def measure():
        ap, fp32 = mean(records, name, "AP"), fp32_reference(records, name)
        if fp32 is None:
            return None, f"missing {RUNS[name].fp32}"
        return ok(ap, fp32), f"{label} {ap:.2f} vs FP32 {fp32:.2f}"

    return target_line(records, text, [name], measure)


def target_bit_separation(records):
    """(a) LSQ W2 is at least 5 AP below the FP32 detector it fine-tuned."""
    text = "the benchmark separates bit widths: LSQ W2 AP <= FP32 AP - 5"
    return target_against_fp32(records, text, "lsq_w2", lambda ap, fp32: ap <= fp32 - 5, "LSQ W2")


def target_hqod_w4(records, method):
    """(b) ``method``+HQOD W4 reaches the AP of the FP32 detector it fine-tuned."""
    text = f"{method.upper()}+HQOD W4 AP >= FP32 AP"
    return target_against_fp32(records, text, f"{method}_w4_hqod", lambda ap, fp32: ap >= fp32, f"{method.upper()}+HQOD W4")


def target_hqod_w2(records, method):
    """(c) ``method``+HQOD W2 gains 1 AP and 1 AP75 over its baseline: mean paired difference over
    at least MIN_PAIRED_SEEDS seeds, each seed's difference positive."""
    baseline, with_hqod = f"{method}_w2", f"{method}_w2_hqod"

    def measure():
        d_ap, d_ap75 = (paired_differences(records, baseline, with_hqod, key) for key in ("AP", "AP75"))
        if len(d_ap) < MIN_PAIRED_SEEDS:
            return None, f"only {len(d_ap)} paired seeds"
        ok = all(np.mean(list(d.values())) >= 1.0 and min(d.values()) > 0 for d in (d_ap, d_ap75))
        return ok, f"ΔAP {differences_cell(d_ap)}, ΔAP75 {differences_cell(d_ap75)}"

    text = (
        f"{method.upper()}+HQOD W2 >= {method.upper()} W2 + 1.0 AP and + 1.0 AP75 "
        f"(mean paired difference over >= {MIN_PAIRED_SEEDS} seeds, every seed > 0)"
    )
    return target_line(records, text, [baseline, with_hqod], measure)


def targets_harmony(records, method):
    """(d) ``method``'s score-IoU correlation falls as bits drop; HQOD raises it and the share of
    TPs with gap < 0.1 at every bit width. Each run is compared with the FP32 model it fine-tuned
    (the fall: the mean over seeds of corr minus its FP32 model's) and each HQOD run with its
    baseline of the same seed and FP32 model (the rise: the mean paired difference), so that runs
    on FP32 models trained in different sittings can be compared."""
    chain = [f"{method}_w{bits}" for bits in BITS]
    pairs = [(f"{method}_w{bits}", f"{method}_w{bits}_hqod") for bits in BITS]

    def falls():
        drops = [0.0]  # FP32 against itself
        for name in chain:
            runs = [r for r in records if r["name"] == name]
            fp32 = [fp32_result(records, r, "corr", "harmony") for r in runs]
            if None in fp32:
                return None, f"the score-IoU correlation of {name}'s FP32 model is unknown"
            drops.append(float(np.mean([r["results"]["harmony"]["corr"] - c for r, c in zip(runs, fp32)])))
        detail = "corr minus its FP32 model's: " + " > ".join(f"{d:+.3f}" for d in drops)
        return all(a > b for a, b in zip(drops, drops[1:])), detail

    def rises(key, fmt):
        def measure():
            diffs = [paired_differences(records, base, h, key, "harmony") for base, h in pairs]
            unpaired = [f"W{bits}" for bits, d in zip(BITS, diffs) if not d]
            if unpaired:
                return None, f"no seed of one FP32 model with both runs at {', '.join(unpaired)}"
            detail = ", ".join(f"W{bits} {differences_cell(d, fmt)}" for bits, d in zip(BITS, diffs))
            return all(np.mean(list(d.values())) > 0 for d in diffs), detail

        return measure

    m, widths = method.upper(), [f"W{bits}" for bits in BITS]
    order, at = " > ".join(["FP32", *widths]), ", ".join(widths)
    names = [name for pair in pairs for name in pair]
    return [
        target_line(records, f"{m}: score-IoU correlation falls as bits drop ({order})", chain, falls),
        target_line(records, f"{m}+HQOD raises the score-IoU correlation at {at}", names, rises("corr", "{:+.3f}")),
        target_line(records, f"{m}+HQOD raises the share of TPs with gap < 0.1 at {at}", names, rises("gap_0.0-0.1", "{:+.1f} pt")),
    ]


def targets(records):
    """The target lines (a)-(d)."""
    methods = ("lsq", "aqd")
    return [
        target_bit_separation(records),
        *(target_hqod_w4(records, m) for m in methods),
        *(target_hqod_w2(records, m) for m in methods),
        *(line for m in methods for line in targets_harmony(records, m)),
    ]


def figures(records, output_dir, seed=0):
    """Fig. 2/4/5-style PNGs of the records of ``seed`` (and the FP32 run) that exist."""
    tps = {r["name"]: tp_arrays(r) for r in records if r["seed"] == seed or is_fp32(r["name"])}
    made = []
    pick = lambda names: {n: tps[n] for n in names if n in tps}  # noqa: E731
    if pick(["fp32", "lsq_w4", "lsq_w2"]):
        made.append(plot_score_iou_density(pick(["fp32", "lsq_w4", "lsq_w2"]), os.path.join(output_dir, "fig2_score_iou_density.png")))
    if pick(["fp32", "lsq_w4", "lsq_w2", "lsq_w2_hqod"]):
        made.append(plot_gap_histogram(pick(["fp32", "lsq_w4", "lsq_w2", "lsq_w2_hqod"]), os.path.join(output_dir, "fig5_gap_histogram.png")))
    for run_name in ("lsq_w2_tcorr", "lsq_w2_hqod"):
        if run_name in tps and "lsq_w2" in tps:
            made.append(plot_iou_bin_difference(tps[run_name], tps["lsq_w2"], os.path.join(output_dir, f"fig4_{run_name}_vs_lsq_w2.png"), names=(run_name, "lsq_w2")))
    return made


def fp32_model_lines(records):
    """One line per QAT record that fine-tuned another FP32 model than its FP32 record's (a
    retrained FP32 run that came out different); none when all agree."""
    models = {r["name"]: r.get("model_sha256") for r in records if is_fp32(r["name"])}
    lines = []
    for r in records:
        recorded = models.get(RUNS[r["name"]].fp32) if not is_fp32(r["name"]) else None
        if recorded and r.get("init_sha256") not in (None, recorded):
            lines.append(f"- {r['name']} seed {r['seed']} fine-tuned FP32 model {r['init_sha256'][:12]}, not the recorded {recorded[:12]}")
    return lines


def report(records_dir, output_dir):
    """results.md over every record in ``records_dir``, written to ``output_dir`` and returned."""
    records = finished_records(records_dir)
    os.makedirs(output_dir, exist_ok=True)
    made = figures(records, output_dir)
    mismatches = fp32_model_lines(records)
    text = "\n".join(
        [
            f"Machine: {machine()}; {datetime.date.today().isoformat()}",
            "",
            results_table(records),
            "",
            "Paired differences (per common seed):",
            "",
            differences_table(records),
            "",
            "Targets:",
            *targets(records),
            "",
            *(["FP32 models that differ from their record:", *mismatches, ""] if mismatches else []),
            "Figures: " + ", ".join(os.path.relpath(p, output_dir) for p in made),
            "",
            "Commands:",
            *[f"- `{r['command']}` ({r.get('commit') or 'commit unknown'}, {r.get('date', 'date unknown')})" for r in records],
        ]
    )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="default: all; a QAT run brings its FP32 run")
    parser.add_argument("--seeds", type=int, nargs="+", help="QAT seeds (default: each run's, see RUNS); FP32 runs have seed 0")
    parser.add_argument(
        "--fp32-checkpoint", help="evaluate this RetinaNet FP32 detector instead of training one; its QAT runs fine-tune it"
    )
    parser.add_argument("--output-dir", default="output/benchmark_accuracy", help="training runs, report and figures")
    parser.add_argument("--records-dir", default="benchmarks/accuracy", help="finished runs' records (tracked in git)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the plan (status of every run and seed) and exit")
    mode.add_argument("--report-only", action="store_true", help="write the report of the finished runs without running any")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fp32_checkpoint and not os.path.isfile(args.fp32_checkpoint):
        sys.exit(f"error: --fp32-checkpoint {args.fp32_checkpoint} does not exist.")
    output_dir, records_dir = relative_to(ROOT, args.output_dir), relative_to(ROOT, args.records_dir)
    fp32 = args.fp32_checkpoint and relative_to(ROOT, args.fp32_checkpoint)
    os.chdir(ROOT)  # the commands (and the paths above) are relative to the repository root
    entries = plan(args.runs, args.seeds)
    if args.list:
        print(plan_table(entries, output_dir, records_dir))
        return
    if not args.report_only:
        for name, seed in entries:
            run(name, seed, output_dir, records_dir, fp32)
    print(report(records_dir, output_dir))


if __name__ == "__main__":
    main()
