"""tools/benchmark_ptq.py without calibrating: its commands, records and report (tables and
target verdicts) on hand-made records whose answers are written out here."""
import json
import os
import shutil

import pytest

from helpers import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark_ptq")


def test_commands(tool):
    cmd = tool.command("regptq_w2a4_unfiltered", "out", "fp32.pth")[1:]
    assert cmd == [
        "tools/ptq.py", "--config-file", "configs/retina_r18_regptq_w4a4.py", "--overwrite",
        "quant.weight_bits=2", "quant.act_bits=4", "train.output_dir=out/regptq_w2a4_unfiltered",
        "train.init_checkpoint=fp32.pth", "ptq.box_filter=False",
    ]  # fmt: skip
    assert tool.command("fp32", "out", "fp32.pth")[1:] == [
        "tools/train_net.py", "--config-file", "configs/retina_r18_fp32.py", "--eval-only",
        "train.output_dir=out/fp32", "train.init_checkpoint=fp32.pth",
    ]  # fmt: skip
    assert len(tool.RUNS) == 1 + 4 * 5 + 3 + 2  # + mse_w4a4, adaround_w4a4 (the W4A4 decomposition)
    assert tool.command("mse_w4a4", "out", "fp32.pth")[3] == "configs/retina_r18_mse_w4a4.py"


def _record(name, ap, ap75=None, seconds=300.0):
    return {
        "name": name, "command": f"python tools/ptq.py {name}", "commit": "abc1234", "date": "2026-12-01",
        "machine": "x86_64, 2 cores", "wall_s": seconds + 60, "fp32_sha256": "a",
        "results": {"bbox": {"AP": ap, "AP75": ap if ap75 is None else ap75}},
        "calibration_s": seconds, "peak_memory_mb": 3072.0,
    }  # fmt: skip


def _write(records_dir, records):
    os.makedirs(records_dir, exist_ok=True)
    for r in records:
        with open(os.path.join(records_dir, f"{r['name']}.json"), "w") as f:
            json.dump(r, f)


def test_report_tables_and_targets(tool, tmp_path):
    records = [_record("fp32", 57.7), _record("regptq_w4a4", 56.0, 60.0, seconds=540)]
    # W2A4 in the claimed order; W3A3 not (QDrop below BRECQ)
    records += [_record(f"{m}_w2a4", ap) for m, ap in zip(tool.METHODS, (10.0, 20.0, 25.0, 30.0))]
    records += [_record(f"{m}_w3a3", ap) for m, ap in zip(tool.METHODS, (30.0, 40.0, 39.0, 45.0))]
    records += [_record("regptq_w2a4_local", 26.0), _record("regptq_w2a4_unfiltered", 28.0), _record("regptq_w2a4_uniform", 31.0)]
    records += [_record("minmax_w4a4", 53.0, seconds=18), _record("mse_w4a4", 53.5, 61.0, seconds=60)]
    _write(tmp_path / "records", records)
    text = tool.report(str(tmp_path / "records"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "results.md").read_text() == text + "\n"
    assert "| W4A4 | 53.00 (53.00) | — | — | 56.00 (60.00) |" in text
    assert "| W4A4 | 0.3 / 3.0 | — | — | 9.0 / 3.0 |" in text  # 540 s, 3072 MB
    assert "| MSE-searched steps, nearest rounding | 53.50 | 61.00 | 1.0 |" in text
    assert "| + layer-wise AdaRound (AdaRound) | — | — | — |" in text
    assert "| + global loss and LLAQ (Reg-PTQ) | 56.00 | 60.00 | 9.0 |" in text
    assert "| + global loss, unfiltered | 28.00 | 28.00 |" in text
    assert "- Reg-PTQ W4A4 within 2 AP of FP32: met: 56.00 vs FP32 57.70" in text
    assert "- W2A4: Reg-PTQ >= QDrop >= BRECQ >= min-max: met: 30.00 >= 25.00 >= 20.00 >= 10.00" in text
    assert "- W3A3: Reg-PTQ >= QDrop >= BRECQ >= min-max: MISSED: 45.00 >= 39.00 >= 40.00 >= 30.00" in text
    # 26 -> 28 -> 30 rises, but the uniform head (31) beats LLAQ (30)
    assert "- no ablation step negative (W2A4): MISSED: 26.00 -> 28.00 -> 30.00; uniform 31.00 -> LLAQ 30.00" in text
    assert "- R18 W4A4 Reg-PTQ calibration <= 10 min: met: 9.0 min on x86_64, 2 cores" in text
    assert "warning" not in text


def test_unfinished_targets_are_not_measured(tool, tmp_path):
    _write(tmp_path / "records", [_record("regptq_w4a4", 50.0, seconds=700), {**_record("fp32", 57.7), "fp32_sha256": "b"}])
    text = tool.report(str(tmp_path / "records"), str(tmp_path / "out"))
    assert "- Reg-PTQ W4A4 within 2 AP of FP32: MISSED: 50.00 vs FP32 57.70" in text
    assert "- W2A4: Reg-PTQ >= QDrop >= BRECQ >= min-max: not measured" in text
    assert "- no ablation step negative (W2A4): not measured" in text
    assert "- R18 W4A4 Reg-PTQ calibration <= 10 min: MISSED: 11.7 min" in text
    assert "warning: the records quantized 2 different FP32 models" in text


def test_a_run_leaves_its_record(tool, tmp_path, monkeypatch):
    """subprocess.run stands in for tools/ptq.py: writes what it writes."""
    fp32 = tmp_path / "fp32.pth"
    fp32.write_bytes(b"weights")

    def fake(cmd, stdout, stderr):
        out = [a.split("=", 1)[1] for a in cmd if a.startswith("train.output_dir=")][0]
        os.makedirs(os.path.join(out, "inference"))
        with open(os.path.join(out, "inference", "results.json"), "w") as f:
            json.dump({"bbox": {"AP": 40.0, "AP75": 44.0}}, f)
        with open(os.path.join(out, "ptq_report.json"), "w") as f:
            json.dump({"seconds": 123.0, "peak_memory_mb": 2048.0, "units": []}, f)
        return tool.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tool.subprocess, "run", fake)
    monkeypatch.setattr(tool, "git_commit", lambda: "abc1234")
    out, records = str(tmp_path / "out"), str(tmp_path / "records")
    tool.run("qdrop_w4a4", out, records, str(fp32))
    record = json.load(open(os.path.join(records, "qdrop_w4a4.json")))
    assert record["calibration_s"] == 123.0 and record["results"]["bbox"]["AP"] == 40.0
    assert record["commit"] == "abc1234" and record["fp32_sha256"] == tool.sha256(str(fp32))
    assert tool.status(out, records, "qdrop_w4a4") == "done"
    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: pytest.fail("a finished run ran again"))
    tool.run("qdrop_w4a4", out, records, str(fp32))
    # another FP32 model: the record is stale, the run is made again and its record replaced
    fp32.write_bytes(b"other weights")
    assert tool.status(out, records, "qdrop_w4a4", tool.sha256(str(fp32))) == "stale"
    assert tool.status(out, records, "qdrop_w4a4") == "done"  # no model to compare with
    monkeypatch.setattr(tool.subprocess, "run", fake)
    shutil.rmtree(os.path.join(out, "qdrop_w4a4"))  # what tools/ptq.py --overwrite does
    tool.run("qdrop_w4a4", out, records, str(fp32))
    assert json.load(open(os.path.join(records, "qdrop_w4a4.json")))["fp32_sha256"] == tool.sha256(str(fp32))
