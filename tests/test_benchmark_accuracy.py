"""tools/benchmark_accuracy.py without training: its plan and commands, and its report (tables,
paired differences, target verdicts) on hand-made records whose answers are written out here."""
import hashlib
import json
import os
import re
import shutil

import pytest

from helpers import ROOT, load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark_accuracy")


def record(name, seed, ap=5.0, ap75=4.0, corr=0.3, gap01=1.0, wall_s=300.0):
    """A run's record with the given metrics (the others fixed)."""
    return {
        "name": name,
        "seed": seed,
        "command": f"python tools/train_net.py {name} {seed}",
        "wall_s": wall_s,
        "results": {
            "bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap75},
            "harmony": {"mean_gap": 0.4, "gap_0.0-0.1": gap01, "ideal": 0.0, "corr": corr, "num_tp": 100},
        },
        "tp": {"score": [0.9, 0.5], "iou": [0.95, 0.65]},
    }


def write_record(tool, records_dir, rec):
    path = tool.record_path(records_dir, rec["name"], rec["seed"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f)


def w2_pair(method, ap_gains, ap75_gains):
    """Baseline and HQOD W2 records, one seed per gain (baseline AP 3, AP75 2)."""
    records = []
    for seed, (gain, gain75) in enumerate(zip(ap_gains, ap75_gains)):
        records.append(record(f"{method}_w2", seed, ap=3.0, ap75=2.0))
        records.append(record(f"{method}_w2_hqod", seed, ap=3.0 + gain, ap75=2.0 + gain75))
    return records


# ------------------------------------------------------------------------------------------
# Plan and commands
# ------------------------------------------------------------------------------------------
def test_plan_default_seeds_and_fp32_first(tool):
    assert tool.plan(["lsq_w2"]) == [("fp32", 0)] + [("lsq_w2", seed) for seed in range(5)]
    # Table IV's ablation pairs with LSQ W2's seed 3, Table III's HarDet* with seeds 0-3
    assert tool.plan(["lsq_w2_tcorr", "lsq_w2_hardet"]) == [("fp32", 0), ("lsq_w2_hardet", 0), ("lsq_w2_hardet", 1), ("lsq_w2_hardet", 2), ("lsq_w2_tcorr", 3), ("lsq_w2_hardet", 3)]
    assert tool.plan(["atss_tqt_w2", "lsq_w4"], seeds=[5]) == [("fp32", 0), ("atss_fp32", 0), ("lsq_w4", 5), ("atss_tqt_w2", 5)]
    assert tool.plan(["fp32"], seeds=[3]) == [("fp32", 0)]


def test_docstring_run_count_matches_plan(tool):
    count = int(re.search(r"about (\d+) runs", tool.__doc__).group(1))
    assert count == len(tool.plan(list(tool.RUNS)))


def test_qat_command(tool, tmp_path):
    out = str(tmp_path)
    cmd = tool.command("lsq_w2_tcorr", 2, out)
    assert f"train.init_checkpoint={out}/fp32/model_final.pth" in cmd
    assert f"train.output_dir={out}/seed2/lsq_w2_tcorr" in cmd
    assert "train.seed=2" in cmd and "model.hiou=False" in cmd
    assert all(opt in cmd for opt in tool.SCHEDULE["qat"]) and not any(opt in cmd for opt in tool.SCHEDULE["fp32"])
    assert "--resume" not in cmd
    os.makedirs(tool.run_dir(out, "lsq_w2_tcorr", 2))
    assert "--resume" in tool.command("lsq_w2_tcorr", 2, out)


def test_fp32_and_atss_commands(tool, tmp_path):
    out = str(tmp_path)
    fp32 = tool.command("fp32", 0, out)
    assert all(opt in fp32 for opt in tool.SCHEDULE["fp32"])
    assert f"train.output_dir={out}/fp32" in fp32
    assert not any(opt.startswith("train.init_checkpoint=") for opt in fp32)  # the config's
    assert f"train.init_checkpoint={out}/atss_fp32/model_final.pth" in tool.command("atss_tqt_w2_hqod", 0, out)
    # --fp32-checkpoint: evaluated, and the RetinaNet (not the ATSS) QAT runs fine-tune it
    assert {"--eval-only", "train.init_checkpoint=given.pth"} <= set(tool.command("fp32", 0, out, "given.pth"))
    assert "train.init_checkpoint=given.pth" in tool.command("aqd_w4", 1, out, "given.pth")
    assert "train.init_checkpoint=given.pth" not in tool.command("atss_tqt_w2", 0, out, "given.pth")


def test_list_runs_nothing(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # main() moves to the repository root; restored afterwards
    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: pytest.fail("--list ran a command"))
    tool.main(["--list", "--output-dir", str(tmp_path / "out"), "--records-dir", str(tmp_path / "records")])
    lines = capsys.readouterr().out.splitlines()
    entries = tool.plan(list(tool.RUNS))
    assert len(lines) == len(entries) + 2
    for line, (name, seed) in zip(lines[1:], entries):
        assert line.split() == [name, str(seed), "todo"]
        end = lines[0].index("seed") + 4  # the seeds right-aligned under their header, whatever the name's length
        assert line[:end].split() == [name, str(seed)] and line[end - 1] == str(seed)
    assert lines[-1] == f"0 done, {len(entries)} remaining"
    assert os.listdir(tmp_path) == []


def test_list_done_and_partial(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out, records = str(tmp_path / "out"), str(tmp_path / "records")
    write_record(tool, records, record("fp32", 0, wall_s=600.0))  # done: its record, no output needed
    os.makedirs(tool.run_dir(out, "lsq_w4", 1))
    tool.main(["--list", "--output-dir", out, "--records-dir", records, "--runs", "lsq_w4"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[1:-1]] == [["fp32", "0", "done", "10.0"], ["lsq_w4", "0", "todo"], ["lsq_w4", "1", "partial"]]
    assert lines[-1] == "1 done, 2 remaining"
    assert tool.record_path(records, "lsq_w4", 1) == os.path.join(records, "seed1", "lsq_w4.json")


def test_report_only_reads_records(tool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, records = str(tmp_path / "out"), str(tmp_path / "records")
    for rec in (record("lsq_w3", 0, ap=4.0), record("lsq_w3", 1, ap=6.0), record("lsq_w3_hqod", 1, ap=7.0)):
        write_record(tool, records, rec)
    os.makedirs(tool.run_dir(out, "lsq_w3_hqod", 0))  # interrupted: not in the report
    tool.main(["--report-only", "--output-dir", out, "--records-dir", records])
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    assert "| lsq_w3 | 0, 1 | 4.00 / 6.00 | 5.00 ± 1.41 |" in text
    assert "| lsq_w3_hqod | 1 | 7.00 | 7.00 ± — |" in text
    assert "| lsq_w3_hqod - lsq_w3 | 1 | +1.00 (+1.00) |" in text
    # harmony recomputed from the records' TPs (gaps 0.05 and 0.15: half below 0.1), not the stored 1.0
    assert "gap<0.1 %" in text and "| 50.00 / 50.00 |" in text
    assert "differ from their record" not in text


def fake_train(tool, monkeypatch, model_bytes):
    """subprocess.run standing in for train_net.py: writes a run's inference files and, for an
    FP32 run, ``model_final.pth`` holding ``model_bytes[0]``; records each command."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        out = next(opt.split("=", 1)[1] for opt in cmd if opt.startswith("train.output_dir="))
        os.makedirs(os.path.join(out, "inference"), exist_ok=True)
        with open(os.path.join(out, "inference", "results.json"), "w") as f:
            json.dump({"bbox": {"AP": 12.5, "AP50": 20.0, "AP75": 10.0}}, f)
        with open(os.path.join(out, "inference", "harmony_tp.json"), "w") as f:
            json.dump({"score": [0.1234567, 0.8], "iou": [0.9, 0.7654321]}, f)
        if "/fp32" in out:
            with open(os.path.join(out, "model_final.pth"), "wb") as f:
                f.write(model_bytes[0])
        return tool.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tool.subprocess, "run", run)
    monkeypatch.setattr(tool, "git_commit", lambda: "abc1234")
    return calls


def test_run_writes_records_and_retrains_a_missing_fp32_model(tool, tmp_path, monkeypatch, capsys):
    out, records = str(tmp_path / "out"), str(tmp_path / "records")
    model = [b"fp32 weights"]
    calls = fake_train(tool, monkeypatch, model)
    tool.run("fp32", 0, out, records, None)
    tool.run("lsq_w2", 0, out, records, None)
    fp32, qat = (tool.read_record(tool.record_path(records, n, 0)) for n in ("fp32", "lsq_w2"))
    sha = hashlib.sha256(b"fp32 weights").hexdigest()
    assert fp32["model_sha256"] == sha and qat["init_sha256"] == sha
    assert qat["results"]["bbox"]["AP"] == 12.5 and qat["commit"] == "abc1234"
    assert qat["fp32_bbox"] == {"AP": 12.5, "AP50": 20.0, "AP75": 10.0}  # its FP32 model's (the fake's)
    # and its FP32 model's harmony: gaps 0.777 and 0.035 (half below 0.1); two points, score up, IoU down
    assert qat["fp32_harmony"]["gap_0.0-0.1"] == pytest.approx(50.0) and qat["fp32_harmony"]["corr"] == pytest.approx(-1.0)
    assert qat["tp"] == {"score": [0.123457, 0.8], "iou": [0.9, 0.765432]}  # 6 decimals
    assert len(calls) == 2
    tool.run("lsq_w2", 0, out, records, None)  # recorded: not run again
    assert len(calls) == 2
    # a fresh machine: records, no checkpoints; the FP32 run is trained again for the next QAT run
    shutil.rmtree(out)
    model[0] = b"other weights"
    tool.run("lsq_w2", 1, out, records, None)
    assert [c[c.index("--config-file") + 1] for c in calls[2:]] == ["configs/retina_r18_fp32.py", "configs/retina_r18_lsq_w2.py"]
    assert "differs from its record" in capsys.readouterr().out
    lines = tool.fp32_model_lines(tool.finished_records(records))
    other = hashlib.sha256(b"other weights").hexdigest()
    assert lines == [f"- lsq_w2 seed 1 fine-tuned FP32 model {other[:12]}, not the recorded {sha[:12]}"]


def test_failed_run_leaves_no_record(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool.subprocess, "run", lambda cmd, **k: tool.subprocess.CompletedProcess(cmd, 3))
    with pytest.raises(SystemExit, match=r"fp32 \(seed 0\) failed with exit code 3; see .*/fp32/stdout.txt"):
        tool.run("fp32", 0, str(tmp_path / "out"), str(tmp_path / "records"), None)
    assert not os.path.exists(tmp_path / "records")


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def test_mean_std_cells(tool):
    assert tool.mean_std([10, 12, 14], "{:.2f}") == "12.00 ± 2.00"
    assert tool.mean_std([0.25], "{:.3f}") == "0.250 ± —"


def test_results_table_row(tool):
    records = [record("lsq_w2", s, ap=ap, ap75=1.0, corr=0.2, gap01=0.5, wall_s=60.0 * (s + 1)) for s, ap in zip((2, 0, 1), (14, 10, 12))]
    row = [line for line in tool.results_table(records).splitlines() if line.startswith("| lsq_w2 |")]
    assert row == [
        "| lsq_w2 | 0, 1, 2 | 10.00 / 12.00 / 14.00 | 12.00 ± 2.00 | 1.00 / 1.00 / 1.00 | 1.00 ± 0.00"
        " | 0.200 / 0.200 / 0.200 | 0.200 ± 0.000 | 0.50 / 0.50 / 0.50 | 0.50 ± 0.00 | 24.00 | 0.400 | 0.0 | 100 | 2.0 |"
    ]


def test_paired_differences(tool):
    records = w2_pair("lsq", [2.0, -0.5, 3.0], [1.0, 1.5, 2.0]) + [record("lsq_w2_hqod", 7, ap=9.0)]  # seed 7: unpaired
    d_ap = tool.paired_differences(records, "lsq_w2", "lsq_w2_hqod", "AP")
    assert d_ap == pytest.approx({0: 2.0, 1: -0.5, 2: 3.0})
    assert tool.differences_cell(d_ap) == "+1.50 (+2.00 / -0.50 / +3.00)"
    for rec in records:  # seed 1's pair fine-tuned two different FP32 models: not a pair
        rec["init_sha256"] = "b" if (rec["name"], rec["seed"]) == ("lsq_w2_hqod", 1) else "a"
    assert tool.paired_differences(records, "lsq_w2", "lsq_w2_hqod", "AP") == pytest.approx({0: 2.0, 2: 3.0})
    for rec in records:
        rec["init_sha256"] = "a"
    assert "| lsq_w2_hqod - lsq_w2 | 0, 1, 2 | +1.50 (+2.00 / -0.50 / +3.00) | +1.50 (+1.00 / +1.50 / +2.00) |" in tool.differences_table(records)


W2_TEXT = "LSQ+HQOD W2 >= LSQ W2 + 1.0 AP and + 1.0 AP75 (mean paired difference over >= 3 seeds, every seed > 0)"


def test_target_w2_met(tool):
    line = tool.target_hqod_w2(w2_pair("lsq", [1.0, 1.5, 2.0], [1.2, 1.2, 1.2]), "lsq")
    assert line == f"- {W2_TEXT}: met (ΔAP +1.50 (+1.00 / +1.50 / +2.00), ΔAP75 +1.20 (+1.20 / +1.20 / +1.20))"


def test_target_w2_missed_when_one_seed_negative(tool):
    line = tool.target_hqod_w2(w2_pair("lsq", [2.0, -0.5, 3.0], [2.0, 2.0, 2.0]), "lsq")
    assert line.startswith(f"- {W2_TEXT}: missed (ΔAP +1.50 (+2.00 / -0.50 / +3.00)")


def test_target_w2_not_measured(tool):
    assert tool.target_hqod_w2(w2_pair("aqd", [2.0, 2.0], [2.0, 2.0]), "aqd").endswith(": not measured (only 2 paired seeds)")
    assert tool.target_hqod_w2([record("aqd_w2", 0)], "aqd").endswith(": not measured (missing aqd_w2_hqod)")


def test_targets_bit_separation_and_w4(tool):
    records = [record("fp32", 0, ap=10.0), record("lsq_w2", 0, ap=4.0), record("lsq_w2", 1, ap=6.0)]
    records += [record("lsq_w4_hqod", 0, ap=9.0), record("lsq_w4_hqod", 1, ap=11.5)]
    assert tool.target_bit_separation(records) == "- the benchmark separates bit widths: LSQ W2 AP <= FP32 AP - 5: met (LSQ W2 5.00 vs FP32 10.00)"
    records[2] = record("lsq_w2", 1, ap=6.5)
    assert tool.target_bit_separation(records).endswith(": missed (LSQ W2 5.25 vs FP32 10.00)")
    assert tool.target_hqod_w4(records, "lsq") == "- LSQ+HQOD W4 AP >= FP32 AP: met (LSQ+HQOD W4 10.25 vs FP32 10.00)"
    assert tool.target_hqod_w4(records, "aqd") == "- AQD+HQOD W4 AP >= FP32 AP: not measured (missing aqd_w4_hqod)"
    assert tool.target_bit_separation(records[1:]).endswith(": not measured (missing fp32)")


def test_targets_use_the_fp32_model_each_run_fine_tuned(tool):
    """A QAT record keeps the AP of its own FP32 model (a later sitting may train another one):
    the targets compare with that, run by run, not with the FP32 record."""
    records = [record("fp32", 0, ap=10.0), record("lsq_w4_hqod", 0, ap=9.0), record("lsq_w4_hqod", 1, ap=11.5)]
    records[2]["fp32_bbox"] = {"AP": 12.0}  # seed 1 fine-tuned a retrained FP32 model of 12 AP
    assert tool.fp32_reference(records, "lsq_w4_hqod") == pytest.approx(11.0)  # (10 + 12) / 2
    assert tool.target_hqod_w4(records, "lsq") == "- LSQ+HQOD W4 AP >= FP32 AP: missed (LSQ+HQOD W4 10.25 vs FP32 11.00)"
    records[1]["fp32_bbox"] = {"AP": 8.0}
    assert tool.target_hqod_w4(records[1:], "lsq").endswith(": met (LSQ+HQOD W4 10.25 vs FP32 10.00)")


def harmony_records(corr, gap01):
    """FP32 and LSQ baseline/HQOD runs at W4, W3, W2 with the given corr / gap<0.1 share per run."""
    return [record(name, 0, corr=corr[name], gap01=gap01[name]) for name in corr]


def test_targets_harmony(tool):
    corr = {"fp32": 0.40, "lsq_w4": 0.35, "lsq_w4_hqod": 0.37, "lsq_w3": 0.30, "lsq_w3_hqod": 0.31, "lsq_w2": 0.25, "lsq_w2_hqod": 0.24}
    gap01 = {"fp32": 1.0, "lsq_w4": 0.5, "lsq_w4_hqod": 0.9, "lsq_w3": 0.2, "lsq_w3_hqod": 0.4, "lsq_w2": 0.0, "lsq_w2_hqod": 0.1}
    falls, corr_rises, share_rises = tool.targets_harmony(harmony_records(corr, gap01), "lsq")
    assert falls == (
        "- LSQ: score-IoU correlation falls as bits drop (FP32 > W4 > W3 > W2): met "
        "(corr minus its FP32 model's: +0.000 > -0.050 > -0.100 > -0.150)"
    )
    assert corr_rises == "- LSQ+HQOD raises the score-IoU correlation at W4, W3, W2: missed (W4 +0.020 (+0.020), W3 +0.010 (+0.010), W2 -0.010 (-0.010))"
    assert share_rises == (
        "- LSQ+HQOD raises the share of TPs with gap < 0.1 at W4, W3, W2: met "
        "(W4 +0.4 pt (+0.4 pt), W3 +0.2 pt (+0.2 pt), W2 +0.1 pt (+0.1 pt))"
    )
    del corr["lsq_w3"], gap01["lsq_w3"]
    falls, corr_rises, _ = tool.targets_harmony(harmony_records(corr, gap01), "lsq")
    assert falls.endswith(": not measured (missing lsq_w3)") and corr_rises.endswith(": not measured (missing lsq_w3)")


def test_targets_harmony_across_fp32_models(tool):
    """Runs that fine-tuned two FP32 models (corr 0.40, the FP32 record's, and 0.50): each run's
    correlation is taken against its own model's, each HQOD run against its baseline of the same
    seed and model."""
    records = [record("fp32", 0, corr=0.40), record("lsq_w4", 0, corr=0.38), record("lsq_w4_hqod", 0, corr=0.39)]
    records += [record("lsq_w3", 0, corr=0.46), record("lsq_w3_hqod", 0, corr=0.47)]  # the second model's
    records += [record("lsq_w2", 0, corr=0.30), record("lsq_w2_hqod", 0, corr=0.33), record("lsq_w2_hqod", 1, corr=0.20)]
    for rec in records:
        rec["model_sha256" if rec["name"] == "fp32" else "init_sha256"] = "first"
    for rec in records[3:5] + records[7:]:
        rec["init_sha256"] = "second"
        rec["fp32_harmony"] = {"corr": 0.50}
    falls, corr_rises, _ = tool.targets_harmony(records, "lsq")
    # by the means alone W3 (0.46) sits above W4 (0.38) and FP32 (0.40); against their own models
    # W4 lost 0.02, W3 0.04 and W2 0.10
    assert falls.endswith(": met (corr minus its FP32 model's: +0.000 > -0.020 > -0.040 > -0.100)")
    # seed 1 of W2 + HQOD (the second model) has no baseline: only seed 0 is paired (+0.03)
    assert corr_rises.endswith(": met (W4 +0.010 (+0.010), W3 +0.010 (+0.010), W2 +0.030 (+0.030))")
    records[4]["init_sha256"] = "first"  # W3 + HQOD from the other model than its baseline
    _, corr_rises, _ = tool.targets_harmony(records, "lsq")
    assert corr_rises.endswith(": not measured (no seed of one FP32 model with both runs at W3)")
    del records[1]["init_sha256"], records[0]["model_sha256"]
    records[1]["init_sha256"] = "third"  # an FP32 model with neither its own copy nor the FP32 record
    falls, _, _ = tool.targets_harmony(records, "lsq")
    assert falls.endswith(": not measured (the score-IoU correlation of lsq_w4's FP32 model is unknown)")


def test_targets_all_lines(tool):
    lines = tool.targets([])
    assert len(lines) == 1 + 2 + 2 + 6
    assert all(re.fullmatch(r"- .+: not measured \(missing .+\)", line) for line in lines)
