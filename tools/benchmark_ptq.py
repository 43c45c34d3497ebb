#!/usr/bin/env python
"""
The post-training quantization benchmark (issue 16; Reg-PTQ's Tables 1-4 in kind) on the
embedded dataset: the FP32 RetinaNet-R18 of the accuracy benchmark, quantized by ``minmax``,
``brecq``, ``qdrop`` and ``regptq`` at W8A8, W4A8, W4A4, W3A3 and W2A4, and Reg-PTQ's ablations
at W2A4 (local loss only -> + global loss unfiltered -> + the two-step filter; uniform vs LLAQ
regression head), and W4A4 taken apart one method's addition at a time (min-max -> MSE step
search -> AdaRound -> BRECQ -> QDrop -> Reg-PTQ: the ``mse_w4a4`` and ``adaround_w4a4`` runs
besides the others). Each run is ``tools/ptq.py`` in its own process with the configs' defaults
(256 training images); its record keeps the COCO results, the calibration's wall time and the
process's peak memory.

    python tools/benchmark_ptq.py                                   # every run
    python tools/benchmark_ptq.py --runs regptq_w4a4 qdrop_w4a4     # some runs
    python tools/benchmark_ptq.py --list                            # the plan and its status
    python tools/benchmark_ptq.py --report-only                     # the report of finished runs

The FP32 detector is ``--fp32-checkpoint`` (default: the accuracy benchmark's,
``output/benchmark_accuracy/fp32/model_final.pth``; ``python tools/benchmark_accuracy.py --runs
fp32`` trains it); the ``fp32`` run evaluates it. Runs go to ``--output-dir`` (default
``output/benchmark_ptq/<run>``); a finished run leaves its record in ``--records-dir`` (default
``benchmarks/ptq``, tracked in git, so the benchmark can be finished over several sittings) with
its command, commit, date, machine and the SHA-256 of the FP32 model it quantized, and is not
repeated while that model stays the same (a record of another FP32 model is stale: the run is
made again and its record replaced); an interrupted one is run again from the start. The report
(``results.md`` in the output directory) has the AP table, the ablation, wall time and peak
memory, and the targets.
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional

from hqod.benchmark import git_commit, machine, relative_to, sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("minmax", "brecq", "qdrop", "regptq")
BITS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")


class Run(NamedTuple):
    method: Optional[str]  # None: the FP32 detector, evaluated
    bits: Optional[str]
    overrides: List[str]


def _bits_overrides(bits):
    weight, act = bits[1:].split("a")
    return [f"quant.weight_bits={weight}", f"quant.act_bits={act}"]


RUNS = {"fp32": Run(None, None, [])}
RUNS.update({f"{m}_{b}": Run(m, b, []) for b in BITS for m in METHODS})
# Reg-PTQ's ablation at W2A4: each step adds one part to the one before; the full method is regptq_w2a4
ABLATION = [
    ("local loss only (QDrop + LLAQ)", "regptq_w2a4_local"),
    ("+ global loss, unfiltered", "regptq_w2a4_unfiltered"),
    ("+ two-step filter (Reg-PTQ)", "regptq_w2a4"),
]
RUNS.update(
    {
        "regptq_w2a4_local": Run("regptq", "w2a4", ["ptq.global_loss=False"]),
        "regptq_w2a4_unfiltered": Run("regptq", "w2a4", ["ptq.box_filter=False"]),
        "regptq_w2a4_uniform": Run("regptq", "w2a4", ["ptq.head_quantizer=uniform"]),
    }
)
# W4A4 taken apart, one method's addition per row: where the reconstruction gains or loses AP
DECOMPOSITION = [
    ("min-max steps, nearest rounding", "minmax_w4a4"),
    ("MSE-searched steps, nearest rounding", "mse_w4a4"),
    ("+ layer-wise AdaRound (AdaRound)", "adaround_w4a4"),
    ("+ block-wise, Fisher-weighted, learned activation steps (BRECQ)", "brecq_w4a4"),
    ("+ activation dropping (QDrop)", "qdrop_w4a4"),
    ("+ global loss and LLAQ (Reg-PTQ)", "regptq_w4a4"),
]
RUNS.update({"mse_w4a4": Run("mse", "w4a4", []), "adaround_w4a4": Run("adaround", "w4a4", [])})
ORDERED_AT = ("w2a4", "w3a3")  # where Reg-PTQ >= QDrop >= BRECQ >= min-max is claimed
TIME_LIMIT_S = 600  # R18 W4A4 Reg-PTQ calibration on 2 cores
FP32_GAP = 2.0  # Reg-PTQ W4A4 within this many AP of FP32


def run_dir(output_dir, name):
    return os.path.join(output_dir, name)


def record_path(records_dir, name):
    return os.path.join(records_dir, f"{name}.json")


def status(output_dir, records_dir, name, fp32_sha256=None):
    """done (its record exists, made from the FP32 model of SHA-256 ``fp32_sha256`` when given),
    stale (its record quantized another FP32 model), partial (its output directory exists) or todo."""
    path = record_path(records_dir, name)
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)["fp32_sha256"]
        return "done" if fp32_sha256 in (None, recorded) else "stale"
    return "partial" if os.path.isdir(run_dir(output_dir, name)) else "todo"


def command(name, output_dir, fp32_checkpoint):
    """The command line of one run: tools/ptq.py, or train_net.py --eval-only for ``fp32``."""
    run = RUNS[name]
    out = run_dir(output_dir, name)
    if run.method is None:
        cmd = ["tools/train_net.py", "--config-file", "configs/retina_r18_fp32.py", "--eval-only"]
    else:
        cmd = ["tools/ptq.py", "--config-file", f"configs/retina_r18_{run.method}_w4a4.py", "--overwrite"]
        cmd += _bits_overrides(run.bits)
    return [sys.executable, *cmd, f"train.output_dir={out}", f"train.init_checkpoint={fp32_checkpoint}", *run.overrides]


def run(name, output_dir, records_dir, fp32_checkpoint):
    """Run one entry unless it has a record of this FP32 model; write its record."""
    fp32_sha256 = sha256(fp32_checkpoint)
    if status(output_dir, records_dir, name, fp32_sha256) == "done":
        return
    out = run_dir(output_dir, name)
    os.makedirs(out, exist_ok=True)
    cmd = command(name, output_dir, fp32_checkpoint)
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: {name} failed with exit code {proc.returncode}; see {out}/stdout.txt")
    record = {
        "name": name,
        "command": " ".join(["python", *cmd[1:]]),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "wall_s": time.perf_counter() - start,
        "fp32_sha256": fp32_sha256,
    }
    with open(os.path.join(out, "inference", "results.json")) as f:
        record["results"] = json.load(f)
    if RUNS[name].method is not None:
        with open(os.path.join(out, "ptq_report.json")) as f:
            report = json.load(f)
        record["calibration_s"], record["peak_memory_mb"] = report["seconds"], report["peak_memory_mb"]
    os.makedirs(records_dir, exist_ok=True)
    with open(record_path(records_dir, name), "w") as f:
        json.dump(record, f, indent=1)


def read_records(records_dir):
    records = {}
    for path in glob.glob(os.path.join(glob.escape(records_dir), "*.json")):
        with open(path) as f:
            record = json.load(f)
        if record["name"] in RUNS:
            records[record["name"]] = record
    return records


def ap(records, name, key="AP"):
    return records[name]["results"]["bbox"][key] if name in records else None


def _cell(value, fmt="{:.2f}"):
    return "—" if value is None else fmt.format(value)


def results_table(records):
    """AP (AP75) per bit width and method, calibration minutes / peak GB below."""
    lines = ["| bits | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for bits in BITS:
        cells = []
        for m in METHODS:
            name = f"{m}_{bits}"
            cells.append(f"{_cell(ap(records, name))} ({_cell(ap(records, name, 'AP75'))})" if name in records else "—")
        lines.append(f"| {bits.upper()} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration wall minutes / peak memory GB:", "", lines[0], lines[1]]
    for bits in BITS:
        cells = []
        for m in METHODS:
            r = records.get(f"{m}_{bits}")
            cells.append(f"{r['calibration_s'] / 60:.1f} / {r['peak_memory_mb'] / 1024:.1f}" if r else "—")
        lines.append(f"| {bits.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(records):
    lines = ["| W2A4 | AP | AP75 |", "|---|---|---|"]
    rows = ABLATION + [("uniform regression head instead of LLAQ", "regptq_w2a4_uniform")]
    for label, name in rows:
        lines.append(f"| {label} | {_cell(ap(records, name))} | {_cell(ap(records, name, 'AP75'))} |")
    return "\n".join(lines)


def decomposition_table(records):
    lines = ["| W4A4 | AP | AP75 | calibration (min) |", "|---|---|---|---|"]
    for label, name in DECOMPOSITION:
        r = records.get(name)
        minutes = _cell(r and r["calibration_s"] / 60, "{:.1f}")
        lines.append(f"| {label} | {_cell(ap(records, name))} | {_cell(ap(records, name, 'AP75'))} | {minutes} |")
    return "\n".join(lines)


def verdict(ok):
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def targets(records):
    """The issue's targets, one line each with its verdict and numbers."""
    lines = []
    fp32, w4a4 = ap(records, "fp32"), ap(records, "regptq_w4a4")
    ok = None if None in (fp32, w4a4) else w4a4 >= fp32 - FP32_GAP
    detail = "" if ok is None else f": {w4a4:.2f} vs FP32 {fp32:.2f}"
    lines.append(f"- Reg-PTQ W4A4 within {FP32_GAP:g} AP of FP32: {verdict(ok)}{detail}")
    for bits in ORDERED_AT:
        aps = [ap(records, f"{m}_{bits}") for m in reversed(METHODS)]
        ok = None if None in aps else all(a >= b for a, b in zip(aps, aps[1:]))
        detail = "" if ok is None else ": " + " >= ".join(f"{a:.2f}" for a in aps)
        lines.append(f"- {bits.upper()}: Reg-PTQ >= QDrop >= BRECQ >= min-max: {verdict(ok)}{detail}")
    steps = [ap(records, name) for _, name in ABLATION]
    head = [ap(records, "regptq_w2a4_uniform"), ap(records, "regptq_w2a4")]
    ok = None if None in steps + head else all(b >= a for a, b in zip(steps, steps[1:])) and head[1] >= head[0]
    detail = "" if ok is None else ": " + " -> ".join(f"{a:.2f}" for a in steps) + f"; uniform {head[0]:.2f} -> LLAQ {head[1]:.2f}"
    lines.append(f"- no ablation step negative (W2A4): {verdict(ok)}{detail}")
    r = records.get("regptq_w4a4")
    ok = None if r is None else r["calibration_s"] <= TIME_LIMIT_S
    detail = "" if r is None else f": {r['calibration_s'] / 60:.1f} min on {r['machine']}"
    lines.append(f"- R18 W4A4 Reg-PTQ calibration <= {TIME_LIMIT_S // 60} min: {verdict(ok)}{detail}")
    return lines


def report(records_dir, output_dir):
    """results.md from every record, written to ``output_dir`` and returned."""
    records = read_records(records_dir)
    models = {r["fp32_sha256"] for r in records.values()}
    text = "\n".join(
        [
            f"Machine: {machine()}; {datetime.date.today().isoformat()}",
            f"FP32 RetinaNet-R18: AP {_cell(ap(records, 'fp32'))} (AP75 {_cell(ap(records, 'fp32', 'AP75'))})",
            *([f"warning: the records quantized {len(models)} different FP32 models"] if len(models) > 1 else []),
            "",
            "AP (AP75) on digits_val:",
            "",
            results_table(records),
            "",
            "Reg-PTQ ablation:",
            "",
            ablation_table(records),
            "",
            "W4A4, one method's addition per row:",
            "",
            decomposition_table(records),
            "",
            "Targets:",
            *targets(records),
            "",
            "Commands:",
            *[f"- `{r['command']}` ({r.get('commit') or 'commit unknown'}, {r['date']})" for r in records.values()],
        ]
    )
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="default: all")
    parser.add_argument("--fp32-checkpoint", default="output/benchmark_accuracy/fp32/model_final.pth")
    parser.add_argument("--output-dir", default="output/benchmark_ptq")
    parser.add_argument("--records-dir", default="benchmarks/ptq", help="finished runs' records (tracked in git)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the plan (status of every run) and exit")
    mode.add_argument("--report-only", action="store_true", help="write the report of the finished runs without running any")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    output_dir, records_dir = relative_to(ROOT, args.output_dir), relative_to(ROOT, args.records_dir)
    fp32 = relative_to(ROOT, args.fp32_checkpoint)
    os.chdir(ROOT)  # the commands (and the paths above) are relative to the repository root
    if args.list:
        fp32_sha256 = sha256(fp32) if os.path.isfile(fp32) else None
        for name in args.runs:
            print(f"{name:<24} {status(output_dir, records_dir, name, fp32_sha256)}")
        return
    if not args.report_only:
        if not os.path.isfile(fp32):
            sys.exit(f"error: --fp32-checkpoint {fp32} does not exist; train it with python tools/benchmark_accuracy.py --runs fp32")
        for name in args.runs:
            run(name, output_dir, records_dir, fp32)
    print(report(records_dir, output_dir))


if __name__ == "__main__":
    main()
