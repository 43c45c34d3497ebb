"""tools/gpu_check.py on a machine without a GPU: its bookkeeping on hand-made cases, its inputs,
its refusal without CUDA, and a dry run of its checks on the CPU (--device cpu)."""
import re

import pytest
import torch

from hqod.quantization import QUANTIZERS

from helpers import load_tool


@pytest.fixture(scope="module")
def gpu_check():
    return load_tool("gpu_check")


def test_run_checks_reports_pass_fail_skip_and_table(gpu_check):
    def passes(ctx):
        return "all good"

    def misses(ctx):
        raise gpu_check.CheckFailed("AP 1.0 vs 2.0\nlast line")

    def crashes(ctx):
        raise RuntimeError("boom")

    def not_here(ctx):
        raise gpu_check.Skip("needs 2 GPUs (1 here)")

    checks = [("a", passes), ("b", misses), ("c", crashes), ("d", not_here)]
    results = gpu_check.run_checks(checks, ctx=None)
    assert [(r.name, r.status, r.detail) for r in results] == [
        ("a", "pass", "all good"),
        ("b", "fail", "last line"),
        ("c", "fail", "RuntimeError: boom"),
        ("d", "skip", "needs 2 GPUs (1 here)"),
    ]
    for r in results:
        r.seconds = 1.25
    assert gpu_check.summary_table(results).splitlines() == [
        "| check   | result   |   s | detail                |",
        "|---------|----------|-----|-----------------------|",
        "| a       | PASS     | 1.2 | all good              |",
        "| b       | FAIL     | 1.2 | last line             |",
        "| c       | FAIL     | 1.2 | RuntimeError: boom    |",
        "| d       | SKIP     | 1.2 | needs 2 GPUs (1 here) |",
    ]


def test_loss_falls(gpu_check):
    assert gpu_check.loss_falls([5, 4, 3, 2], window=2)
    assert not gpu_check.loss_falls([2, 3, 4, 5], window=2)
    assert not gpu_check.loss_falls([5, 4, 3], window=2)  # too short for two windows
    assert not gpu_check.loss_falls([5, 4, 3, float("nan")], window=2)


@pytest.mark.parametrize("name,bits,signed", [("lsq", 4, True), ("tqt", 2, False), ("lq", 2, True), ("lq", 3, False)])
def test_tie_free_input(gpu_check, name, bits, signed):
    q = QUANTIZERS.get(name)(bits=bits, signed=signed)
    q(torch.randn(1000).abs() + 0.1)  # initialize the step
    x, grad = gpu_check.tie_free_input(q, 20000, torch.Generator().manual_seed(0))
    grid = q.integer_grid()
    v = x.double() / grid.step + grid.offset2 / 2
    frac = v - v.floor()
    # 0.1 to 0.4 steps from an integer (a clip boundary) and so at least 0.1 from a tie (x.5)
    assert frac.sub(0.5).abs().min() >= 0.1 - 1e-4
    assert torch.minimum(frac, 1 - frac).min() >= 0.1 - 1e-4
    clipped = (v > grid.eta_max + 1).double().mean().item()
    assert 0.17 < clipped < 0.23 + 1.0 / (grid.eta_max - grid.eta_min + 3)  # 20 % set above, plus draws
    assert grad.min() >= 0.5 and grad.max() <= 1.5


def test_main_without_cuda_is_one_line(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: no CUDA GPU is visible to PyTorch; run on a GPU machine, or --device cpu for a dry run."
    )


def test_unknown_check_is_one_line(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "qat,speed"]) == 2
    assert "unknown checks ['speed']" in capsys.readouterr().err


def test_dry_run_on_cpu(gpu_check, capsys):
    """Every check but the two-process one (tests/test_distributed.py covers that path), small."""
    argv = ["--device", "cpu", "--iterations", "6", "--image-size", "160", "--train-images", "8", "--val-images", "4"]
    code = gpu_check.main(argv + ["--checks", "quantizers,qat,amp,evaluation,integer"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "result" not in line]
    assert [row.split("|")[1:3] for row in rows] == [
        [f" {name:<11}", " PASS     "] for name in ("quantizers", "qat", "amp", "evaluation", "integer")
    ]
    assert "0 differ between cpu and cpu" in out


def test_lightweight_check_on_cpu(gpu_check, monkeypatch, capsys):
    """SSD-lite and YOLOX-tiny QAT train, evaluate on the "device" and on the CPU, and compare.
    A few iterations from a random init cannot show a falling loss (QAT's lr 1e-3 in warm-up),
    so the losses handed to loss_falls are checked here instead: one finite loss per iteration."""
    histories = []
    monkeypatch.setattr(gpu_check, "loss_falls", lambda losses, window: histories.append(losses) or True)
    argv = ["--device", "cpu", "--iterations", "4", "--image-size", "160", "--train-images", "8", "--val-images", "4"]
    assert gpu_check.main(argv + ["--checks", "lightweight"]) == 0, capsys.readouterr().out
    assert [len(h) for h in histories] == [4, 4]
    assert all(0 < v < 100 for h in histories for v in h)
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lightweight")][0]
    # the same model on the same device: the same AP to the last digit
    aps = re.findall(r"(\w+) \(random init\): 4 it\..*?AP (\S+) \(cpu\) vs (\S+) \(cpu\)", row)
    assert [(name, a == b) for name, a, b in aps] == [("ssdlite", True), ("yolox", True)]


def test_missing_lightweight_checkpoint_is_one_line(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--yolox-fp32-checkpoint", "no/such.pth"]) == 2
    assert capsys.readouterr().err.strip() == "error: --yolox-fp32-checkpoint no/such.pth does not exist."
