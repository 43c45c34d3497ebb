"""Several processes on CPU (gloo): `tools/train_net.py --num-gpus 2` on a machine without GPUs
trains like one process with the same total batch (synchronized BN, global loss normalizers, a
data stream shared out by position)."""
import json
import os
import socket
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.utils import comm

from hqod.data import DigitsSpec, generate_digits
from hqod.engine.launch import d2_launch_supports_cpu, launch

from helpers import ROOT, tiny_overrides


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The worker of detectron2's launch module, v0.6's and main's (abridged).
D2_V06_WORKER = """
def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args):
    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(backend="NCCL", init_method=dist_url, world_size=world_size, rank=global_rank)
"""
D2_MAIN_WORKER = """
def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args):
    has_gpu = torch.cuda.is_available()
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO", init_method=dist_url,
                            world_size=world_size, rank=global_rank)
"""


@pytest.mark.parametrize("source, expected", [(D2_V06_WORKER, False), (D2_MAIN_WORKER, True), (None, False)])
def test_d2_launch_supports_cpu_reads_detectron2s_launch_module(tmp_path, monkeypatch, source, expected):
    """True for a launch module whose worker falls back to gloo, False for one that asserts
    CUDA, and False when the module's source cannot be read (no file)."""
    module = types.ModuleType("detectron2.engine.launch")
    if source is not None:
        module.__file__ = str(tmp_path / "launch.py")
        (tmp_path / "launch.py").write_text(source)
    monkeypatch.setitem(sys.modules, "detectron2.engine.launch", module)
    assert d2_launch_supports_cpu() is expected


def test_launch_runs_one_process_in_place_and_knows_the_installed_detectron2():
    out = []
    launch(out.append, 1, args=(5,))
    assert out == [5]
    # detectron2 main (the one with comm.create_local_process_group) runs CPU processes; v0.6 not
    assert d2_launch_supports_cpu() is hasattr(comm, "create_local_process_group")


def _sync_worker(rank, port, result_file):
    """Rank r holds rows r::2 of a batch (sizes 3 and 2: unequal on purpose)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    from hqod.engine.distributed import SyncBatchNormCPU, convert_sync_batchnorm
    from hqod.engine.loss_normalizers import track_loss_normalizers

    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 7) * 3 + 2
    w = torch.randn(5, 3, 6, 7)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    assert convert_sync_batchnorm(bn, cuda=False) == 1 and isinstance(bn[0], SyncBatchNormCPU)
    with torch.no_grad():
        bn[0].weight.uniform_(0.5, 1.5)
        bn[0].bias.uniform_(-1, 1)
    xs = x[rank::2].clone().requires_grad_()
    out = bn(xs)
    # the loss of the whole batch is the sum over processes; DDP would average the parameter
    # gradients, so here they are summed by hand
    (out * w[rank::2]).sum().backward()
    for p in bn.parameters():
        dist.all_reduce(p.grad)

    # global loss normalizer: EMA of the total number of positives, divided by the world size
    class Det(RetinaNet):
        def __init__(self):
            torch.nn.Module.__init__(self)

    det = Det()
    track_loss_normalizers(det)
    norms = [det._ema_update("loss_normalizer", [30, 50][rank], 100) for _ in range(2)]
    torch.save(
        {"out": out.detach(), "gx": xs.grad, "gw": bn[0].weight.grad, "gb": bn[0].bias.grad,
         "rm": bn[0].running_mean, "rv": bn[0].running_var, "n": bn[0].num_batches_tracked,
         "norms": norms},
        f"{result_file}.{rank}",
    )  # fmt: skip
    dist.destroy_process_group()


def test_sync_batchnorm_and_loss_normalizer_over_two_processes(tmp_path):
    """SyncBatchNormCPU over 2 gloo processes = one nn.BatchNorm2d over the whole batch: outputs,
    input and parameter gradients, running statistics (tolerance 1e-5 relative, float32); the
    synchronized loss normalizer is the single-process EMA of the total, halved."""
    result = str(tmp_path / "r")
    mp.spawn(_sync_worker, nprocs=2, args=(_free_port(), result))
    r = [torch.load(f"{result}.{rank}") for rank in range(2)]

    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 7) * 3 + 2
    w = torch.randn(5, 3, 6, 7)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    xr = x.clone().requires_grad_()
    out = bn(xr)
    (out * w).sum().backward()

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

    for rank in range(2):
        assert close(r[rank]["out"], out[rank::2].detach())
        assert close(r[rank]["gx"], xr.grad[rank::2])
        assert close(r[rank]["gw"], bn.weight.grad) and close(r[rank]["gb"], bn.bias.grad)
        assert close(r[rank]["rm"], bn.running_mean) and close(r[rank]["rv"], bn.running_var)
        assert int(r[rank]["n"]) == int(bn.num_batches_tracked) == 1
        ema1 = 0.9 * 100 + 0.1 * 80
        assert r[rank]["norms"] == pytest.approx([ema1 / 2, (0.9 * ema1 + 0.1 * 80) / 2])


@pytest.fixture(scope="module")
def square_digits(tmp_path_factory):
    """Digits scenes of one size (128 x 128): no padding differences between batches of 4 and of
    2, one aspect-ratio group. Returns the $DETECTRON2_DATASETS folder holding digits/."""
    root = tmp_path_factory.mktemp("square")
    generate_digits(str(root / "digits"), DigitsSpec(num_train=16, num_val=4, min_size=128, max_size=128, seed=5))
    return root


TINY = tiny_overrides(4)


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    return [(r["loss_cls"], r["loss_box_reg"]) for r in records if "total_loss" in r]


def test_two_cpu_processes_train_like_one_with_the_same_total_batch(square_digits, tmp_path):
    """
    QAT (AQD W4A4: BN outputs and adds quantized, integer-aware, multi-level BN head) for 2
    iterations from a briefly trained FP32 detector: ``--num-gpus 2`` (2 CPU processes, batch 2
    each) against 1 process with batch 4, same data. Only the float32 summation order differs.
    Tolerances, with what was measured on the CI machine kind (2-core x86 VM):

    * losses of both iterations: relative 1e-5 (measured 2e-7);
    * weights: max |difference| 1e-6 (8e-9), and under 1e-3 of the weight update (norms; 2e-5);
    * quantizer steps and BN running statistics: relative 1e-5 (2e-7).

    Why 2 iterations: low-bit QAT is chaotic in the float summation order. Values on a rounding
    boundary flip by a whole step (AQD's signed grid has no zero level, so values near 0 sit on
    one), and the flips grow with every update: from the third iteration on, ONE process differs
    from itself run with 2 threads instead of 1 by 1-2% of the loss and by half of the weight
    update (measured), so no tolerance could tell a bug from that noise. Two iterations still
    check what a bug would change by far more: BN statistics over all processes (forward of
    iteration 0), loss normalizers over all processes, the gradient average and the first
    updates (iteration 1 and the weights).

    Steps by the quantizers' own rule (``quant.step_init=paper``): with the MSE-searched steps
    the two runs calibrate the same (iteration-0 losses within 3e-8, measured) but the chaos
    starts one iteration earlier (iteration-1 losses 0.3-4 % apart); the search's equivalence
    over batch splits is tested in test_quantizers.py.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=str(square_digits))

    def train_net(*args):  # a fresh process each: no state of other tests leaks in
        return subprocess.Popen([sys.executable, "tools/train_net.py", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def wait(p):
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output[-3000:]

    init_dir = str(tmp_path / "fp32")
    wait(train_net("--config-file", "configs/retina_r18_fp32.py", *TINY, "optimizer.lr=0.01",
                   "train.max_iter=40", "train.eval_period=0", "train.log_period=100", "train.checkpointer.period=1000",
                   "train.deterministic=True", f"train.output_dir={init_dir}"))  # fmt: skip
    init = os.path.join(init_dir, "model_final.pth")

    common = ["--config-file", "configs/retina_r18_aqd_w4.py", *TINY, f"train.init_checkpoint={init}",
              "quant.calib_images=4", "quant.step_init=paper", "train.max_iter=2", "train.eval_period=0", "train.log_period=1",
              "train.metrics_window=1", "train.checkpointer.period=100", "train.deterministic=True"]  # fmt: skip
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    runs = [
        train_net(*common, f"train.output_dir={one}"),
        train_net("--num-gpus", "2", "--dist-url", "auto", *common, f"train.output_dir={two}"),
    ]
    for p in runs:
        wait(p)
    log = open(os.path.join(two, "log.txt")).read()
    assert "batch 2 per process x 2 processes" in log and "BatchNorm layers synchronized" in log

    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 2
    measured = {"loss": max(abs(x - y) / abs(x) for a, b in zip(l1, l2) for x, y in zip(a, b))}
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5)

    s1 = torch.load(os.path.join(one, "model_final.pth"), weights_only=False)["model"]
    s2 = torch.load(os.path.join(two, "model_final.pth"), weights_only=False)["model"]
    s0 = torch.load(init, weights_only=False)["model"]
    assert s1.keys() == s2.keys()
    diff2 = update2 = 0.0
    for k in s1:
        a, b = s1[k].double(), s2[k].double()
        if not s1[k].is_floating_point():
            assert torch.equal(s1[k], s2[k]), k
        elif k.endswith((".interval", ".scale", ".log2_threshold")) or "running_" in k:
            kind = "steps" if "running_" not in k else "bn_stats"
            rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            measured[kind] = max(measured.get(kind, 0.0), rel)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max())), k
        else:
            measured["weights"] = max(measured.get("weights", 0.0), float((a - b).abs().max()))
            assert (a - b).abs().max() <= 1e-6, k
            if k in s0:
                diff2 += float((a - b).square().sum())
                update2 += float((a - s0[k].double()).square().sum())
    measured["weights/update"] = (diff2 / update2) ** 0.5
    print("2 processes vs 1, measured:", {k: f"{v:.1e}" for k, v in measured.items()})
    assert update2 > 0 and (diff2 / update2) ** 0.5 < 1e-3
