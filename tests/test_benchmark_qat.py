"""tools/benchmark_qat.py: the step benchmark runs and writes its table; a GPU-only option
combination is refused with one line."""
import pytest

from helpers import load_tool


@pytest.fixture(scope="module")
def benchmark_qat():
    return load_tool("benchmark_qat")


def test_step_table(benchmark_qat, tmp_path, capsys):
    out = tmp_path / "table.md"
    argv = ["--size", "64", "--width", "16", "--num-classes", "3", "--reps", "2", "--warmup", "0",
            "--variants", "lsq-aqd*", "--out", str(out)]
    benchmark_qat.main(argv)
    rows = [line.split("|")[1:4] for line in out.read_text().splitlines() if line.startswith("| ") and "variant" not in line]
    assert rows == [[" fp32 ", " — ", " FP32 "], [" lsq-aqd* ", " lsq ", " aqd_star "]]
    medians = [float(line.split("|")[4]) for line in out.read_text().splitlines() if line.startswith("| fp32")]
    assert len(medians) == 1 and medians[0] > 0


def test_process_clock_on_a_gpu_is_refused(benchmark_qat, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark_qat.main(["--device", "cuda", "--clock", "process"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --clock process times the CPU: use the wall clock with --device cuda"
    )
