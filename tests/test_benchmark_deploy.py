"""tools/benchmark_deploy.py (issue 17): the report's ratios and verdicts from given times and
sizes; one short run of the digits shape end to end."""
import json

from helpers import load_tool


def test_report_ratios_and_verdicts():
    tool = load_tool("benchmark_deploy")
    args = tool.parse_args(["--reps", "3"])
    results = {
        "coco": {
            "image": [800, 1344],
            "size_mib": {"fp32": 40.0, "int8": 10.5},
            "kernels": {"QLinearConv": 48, "Conv": 29, "FusedConv": 1},
            "kernel_time_shares": {"Conv": 0.6, "QLinearConv": 0.3, "Add": 0.1},
            "times": {1: {"ort-int8": 1.0, "ort-fp32": 1.5, "torch-fp32": 2.0, "torch-fakequant": 4.0},
                      2: {"ort-int8": 0.5, "ort-fp32": 1.1, "torch-fp32": 1.2, "torch-fakequant": 2.0}},
        }
    }
    report = tool.format_report(results, args)
    assert "| coco (800x1344) | 1 | 1000 ms | 1500 ms | 2000 ms | 4000 ms | 1.50x | 2.00x |" in report
    assert "| coco (800x1344) | 2 | 500 ms | 1100 ms | 1200 ms | 2000 ms | 2.20x | 2.40x |" in report
    assert "| coco | 40.00 MiB | 10.50 MiB | 3.81x | 48 / 30 | Conv 60 %, QLinearConv 30 %, Add 10 % |" in report
    assert "ORT FP32 at the COCO size, 1 thread(s): MISSED (1.50x)" in report
    assert "ORT FP32 at the COCO size, 2 thread(s): MET (2.20x)" in report
    assert "W4 file >= 3.5x smaller than FP32 (coco): MET (3.81x)" in report


def test_digits_shape_runs(tmp_path, capsys):
    import torch

    tool = load_tool("benchmark_deploy")
    out = tmp_path / "results.md"
    threads = torch.get_num_threads()
    results = tool.main(tool.parse_args(["--shapes", "digits", "--threads", "1", "--reps", "1", "--out", str(out)]))
    r = results["digits"]
    assert r["kernels"]["QLinearConv"] == 48  # as tests/test_deploy.py counts for RetinaNet W4
    assert r["size_mib"]["fp32"] / r["size_mib"]["int8"] > 3.5  # int8 weights: ~4x, less scales and biases
    assert set(r["times"][1]) == set(tool.VARIANTS) and all(t > 0 for t in r["times"][1].values())
    assert abs(sum(r["kernel_time_shares"].values()) - 1) < 1e-6 and "QLinearConv" in r["kernel_time_shares"]
    assert out.read_text().startswith("`python tools/benchmark_deploy.py") and json.loads(out.with_suffix(".json").read_text())
    assert torch.get_num_threads() == threads  # the timing at 1 thread leaves the caller's setting
