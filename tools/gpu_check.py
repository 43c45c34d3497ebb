#!/usr/bin/env python
"""
Check that HQOD-D2 works on a CUDA GPU, in a few minutes on one GPU; prints one summary table.

    python tools/gpu_check.py [--fp32-checkpoint output/retina_r18_fp32/model_final.pth]

Checks (each passes, fails or is skipped, with its numbers; the exit status is 1 if any fails):

* ``quantizers``: LSQ, TQT, LQ (AQD) and PyTorch's fused LSQ, 2/4/8 bits, signed and unsigned,
  small and large tensors (PyTorch's fake-quant kernel and the compiled Triton kernel): forward
  and backward on the GPU against the CPU's native kernels, within 1e-5 (relative: outputs to
  their largest value, input gradients to the largest output gradient, step gradients).
* ``qat``: RetinaNet-R18 AQD W4A4 + HQOD from a random FP32 init (calibration, then QAT
  iterations) with falling loss.
* ``amp``: the FP32 RetinaNet with ``train.amp.enabled`` on and off (AMPTrainer, float16):
  first-iteration losses agree, both fall; QAT with AMP is refused with one message on CUDA
  (on the CPU it names the trainer it would use).
* ``evaluation``: the FP32 detector (``--fp32-checkpoint``, else a random one) evaluated by
  COCOEvaluator and HarmonyEvaluator on the GPU and on the CPU: same AP and harmony.
* ``integer``: the AQD model converted by the integer engine, run on the GPU and on the CPU: the
  same integers at every predictor output; its agreement with the fake-quant model.
* ``lightweight``: HQOD's Table II lightweight detectors, SSD-lite MobileNetV2 (TQT W4A4 + HQOD,
  with ``quant.integer_bias``: integer-aware convs of scope AQD*) and YOLOX-tiny (TQT W4A4 +
  HQOD): QAT iterations with falling loss, from ``--ssdlite-fp32-checkpoint`` /
  ``--yolox-fp32-checkpoint`` if given (else a random FP32 init), then the trained model
  evaluated on the GPU and on the CPU: the same AP within 0.5.
* ``distributed``: two processes (NCCL, synchronized BN) training the QAT model, when 2 GPUs
  exist (gloo on the CPU).

The check makes its own small digits dataset (``--train-images``/``--val-images`` scenes) in a
temporary folder. ``--device cpu`` runs the same checks on the CPU (the quantizers then compare
the native kernels with PyTorch's eager ones): the test suite uses it to keep this tool working
on machines without a GPU.
"""
import argparse
import copy
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from tabulate import tabulate

import hqod  # noqa: F401  (registers datasets and resolvers; quiets detectron2 v0.6 warnings)
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

from hqod.data import DigitsSpec, generate_digits
from hqod.engine import build_model, build_trainer, do_test, launch
from hqod.engine.amp import trainer_class
from hqod.engine.defaults import UserError
from hqod.quantization import QUANTIZERS, to_integer
from hqod.quantization.functional import get_backend, kernel_for, set_backend
from hqod.quantization.integer_check import compare_integer_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("hqod.gpu_check")

QAT_CONFIG = "configs/retina_r18_aqd_w4_hqod.py"
FP32_CONFIG = "configs/retina_r18_fp32.py"
DATASETS = ("gpu_check_train", "gpu_check_val")
TOLERANCE = 1e-5  # quantizers, GPU vs CPU
AMP_LOSS_TOLERANCE = 0.02  # first-iteration total loss, float16 autocast vs float32 (relative)
AP_TOLERANCE = 0.2  # AP points, GPU vs CPU evaluation of the same weights
# A fake-quantized model: the GPU's float32 results differ from the CPU's in the last bits, which
# moves a few activations across a quantization level; on 48 images of 320 px that moved
# YOLOX-tiny TQT W4's AP by 0.31, 0.00, 0.10, 0.08 and 0.02 in five runs on an H200, TF32
# convolutions on or off alike (BENCHMARKS.md, GPU check).
QUANTIZED_AP_TOLERANCE = 0.5


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    seconds: float
    detail: str


class Skip(Exception):
    """Raised by a check that does not apply on this machine (the message says why)."""


class CheckFailed(Exception):
    """Raised by a check whose numbers miss their target (the message gives them)."""


def run_checks(checks, ctx) -> List[CheckResult]:
    """Run ``checks`` (``(name, fn(ctx) -> detail)`` pairs) in order; an exception is a failed
    check (its traceback logged), :class:`Skip` a skipped one."""
    results = []
    for name, fn in checks:
        start = time.perf_counter()
        try:
            status, detail = "pass", fn(ctx)
        except Skip as e:
            status, detail = "skip", str(e)
        except Exception as e:  # report every failure, then run the next check
            logger.error(f"{name}:\n{traceback.format_exc()}")
            last_line = ([line for line in str(e).splitlines() if line.strip()] or [""])[-1]
            status, detail = "fail", last_line if isinstance(e, CheckFailed) else f"{type(e).__name__}: {last_line}"
        results.append(CheckResult(name, status, time.perf_counter() - start, detail))
        logger.info(f"{name}: {status} ({results[-1].seconds:.1f} s) {detail}")
    return results


def summary_table(results: List[CheckResult]) -> str:
    rows = [(r.name, r.status.upper(), f"{r.seconds:.1f}", r.detail) for r in results]
    return tabulate(rows, headers=["check", "result", "s", "detail"], tablefmt="github")


def loss_falls(losses: List[float], window: int) -> bool:
    """The mean of the last ``window`` losses is below the mean of the first ``window``."""
    if len(losses) < 2 * window or not all(math.isfinite(v) for v in losses):
        return False
    return sum(losses[-window:]) < sum(losses[:window])


# ---------------------------------------------------------------------------------------------
# Context: device, data, configs.
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    workdir: str
    iterations: int
    image_size: int
    fp32_checkpoint: str = ""
    lightweight_checkpoints: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> FP32 weights
    qat_model: Optional[torch.nn.Module] = None  # from the "qat" check, for "integer"

    def config(self, path: str, name: str, **overrides):
        """``path`` on this check's dataset and device, writing under ``workdir/name``."""
        cfg = LazyConfig.load(os.path.join(ROOT, path))
        cfg.dataloader.train.dataset.names, cfg.dataloader.test.dataset.names = DATASETS
        cfg.dataloader.train.mapper.augmentations[0].short_edge_length = [self.image_size]
        cfg.dataloader.test.mapper.augmentations[0].short_edge_length = self.image_size
        cfg.dataloader.train.num_workers = cfg.dataloader.test.num_workers = 2
        cfg.dataloader.train.seed = 0  # the same images in every run
        cfg.train.update(
            device=str(self.device), output_dir=os.path.join(self.workdir, name), init_checkpoint="",
            max_iter=self.iterations, eval_period=0, log_period=max(1, self.iterations // 4),
        )
        cfg.train.checkpointer.period = 10**9
        if cfg.get("quant") is not None:
            cfg.quant.calib_images = 2 * cfg.dataloader.train.total_batch_size
        return LazyConfig.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def register_datasets(root: str):
    """Register the dataset under ``root`` as :data:`DATASETS` (again, if a previous run of this
    process registered another folder)."""
    for name, split in zip(DATASETS, ("train", "val")):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(
            name, {}, os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)
        )


def _train(cfg):
    """Train ``cfg`` (no evaluation) with the trainer of tools/train_net.py; returns the model,
    the trainer and the total loss of every iteration (empty but in the main process: detectron2
    writes the metrics there only)."""
    model = build_model(cfg)
    cfg = copy.deepcopy(cfg)
    del cfg.dataloader["evaluator"]
    trainer, start_iter, _ = build_trainer(cfg, model)
    trainer.train(start_iter, cfg.train.max_iter)
    history = trainer.storage.histories().get("total_loss")
    return model, trainer, [v for v, _ in history.values()] if history else []


# ---------------------------------------------------------------------------------------------
# The checks.
# ---------------------------------------------------------------------------------------------
def tie_free_input(q, numel: int, generator: torch.Generator):
    """Inputs for quantizer ``q`` whose scaled values ``x / s + offset`` lie at least 0.1 from a
    rounding tie and from an integer (a clip boundary), so that two correct implementations
    agree on every rounding and every gradient mask, with about 20 % above the
    grid, and positive output gradients: the step gradient is then dominated by same-sign
    clipped terms, so its relative difference is meaningful."""
    grid = q.integer_grid()  # x_hat = step * (eta - offset), eta in [eta_min, eta_max]
    levels = torch.randint(grid.eta_min - 1, grid.eta_max + 2, (numel,), generator=generator).double()
    levels[torch.rand(numel, generator=generator) < 0.2] = grid.eta_max + 3  # clipped above
    # 0.1 to 0.4 steps from a level: away from rounding ties and from the clip boundaries
    frac = (torch.rand(numel, generator=generator).double() * 0.3 + 0.1) * (torch.randint(0, 2, (numel,), generator=generator) * 2 - 1)
    x = ((levels + frac - grid.offset2 / 2) * grid.step).float()
    grad = torch.rand(numel, generator=generator) + 0.5
    return x, grad


def _quantizer_outputs(q, x, grad, device):
    q = copy.deepcopy(q).to(device)
    x = x.to(device, copy=True).requires_grad_(True)
    out = q(x)
    out.backward(grad.to(device))
    param_grads = [p.grad.detach().double().cpu() for p in q.parameters()]
    return out.detach().double().cpu(), x.grad.detach().double().cpu(), param_grads, kernel_for(x.detach())


def check_quantizers(ctx: Context) -> str:
    # on the CPU, the native kernels against the compiled ones (torch.compile's C++)
    reference_backend, target_backend = "auto", "auto" if ctx.device.type != "cpu" else "inductor"
    generator = torch.Generator().manual_seed(0)
    worst = {"out": 0.0, "grad_x": 0.0, "grad_step": 0.0}
    kernels, cases, failures = set(), 0, []
    previous = get_backend()
    try:
        for name in ("lsq", "tqt", "lq", "lsq_torch"):
            for bits in (2, 4, 8):
                for signed in (True, False):
                    for numel in (4096, 1 << 18):  # PyTorch's kernel, the compiled kernel
                        q = QUANTIZERS.get(name)(bits=bits, signed=signed)
                        q(torch.randn(numel, generator=generator).abs() * (3 if signed else 1))  # init
                        x, grad = tie_free_input(q, numel, generator)
                        set_backend(reference_backend)
                        ref = _quantizer_outputs(q, x, grad, "cpu")
                        set_backend(target_backend)
                        got = _quantizer_outputs(q, x, grad, ctx.device)
                        kernels.add(got[3])
                        errors = {
                            "out": (got[0] - ref[0]).abs().max().item() / ref[0].abs().max().item(),
                            "grad_x": (got[1] - ref[1]).abs().max().item() / grad.abs().max().item(),
                            "grad_step": max(
                                ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item() for a, b in zip(got[2], ref[2])
                            ),
                        }
                        cases += 1
                        for key, err in errors.items():
                            worst[key] = max(worst[key], err)
                            if not err <= TOLERANCE:
                                failures.append(f"{name} W{bits} {'signed' if signed else 'unsigned'} n={numel} {key} {err:.2e}")
    finally:
        set_backend(previous)
    detail = (
        f"{cases} cases, kernels {'/'.join(sorted(kernels))}; largest differences: output "
        f"{worst['out']:.1e}, input grad {worst['grad_x']:.1e}, step grad {worst['grad_step']:.1e} (relative)"
    )
    if failures:
        raise CheckFailed(f"{len(failures)} cases beyond {TOLERANCE:g}: {'; '.join(failures[:4])}. {detail}")
    return detail


def check_qat(ctx: Context) -> str:
    torch.manual_seed(0)
    cfg = ctx.config(QAT_CONFIG, "qat")
    start = time.perf_counter()
    model, _, losses = _train(cfg)
    seconds = (time.perf_counter() - start) / max(1, len(losses))
    ctx.qat_model = model
    devices = {p.device.type for p in model.parameters()}
    if devices != {ctx.device.type}:
        raise CheckFailed(f"parameters on {devices}, expected {ctx.device.type}")
    window = max(2, len(losses) // 4)
    detail = (
        f"{len(losses)} iterations ({seconds:.2f} s/it incl. calibration), total loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f} (means of {window}: {sum(losses[:window]) / window:.3f} -> "
        f"{sum(losses[-window:]) / window:.3f})"
    )
    if not loss_falls(losses, window):
        raise CheckFailed(f"loss does not fall: {detail}")
    return detail


def check_amp(ctx: Context) -> str:
    runs = {}
    for amp in (False, True):
        torch.manual_seed(0)
        cfg = ctx.config(FP32_CONFIG, f"amp_{amp}", **{"train.amp.enabled": amp})
        start = time.perf_counter()
        _, trainer, losses = _train(cfg)
        runs[amp] = (type(trainer).__name__, losses, (time.perf_counter() - start) / len(losses))
    (name_off, off, s_off), (name_on, on, s_on) = runs[False], runs[True]
    first = abs(on[0] - off[0]) / abs(off[0])
    qat_amp = _qat_amp_outcome(ctx)
    window = max(2, len(on) // 4)
    detail = (
        f"{name_off} {s_off:.3f} s/it, {name_on} {s_on:.3f} s/it; first-iteration loss {off[0]:.4f} vs "
        f"{on[0]:.4f} ({first:.2%}); {qat_amp}"
    )
    if ctx.device.type == "cuda" and name_on != "AMPTrainer":
        raise CheckFailed(f"AMP on CUDA did not use AMPTrainer: {detail}")
    if first > AMP_LOSS_TOLERANCE or not (loss_falls(on, window) and loss_falls(off, window)):
        raise CheckFailed(f"AMP losses disagree or do not fall: {detail}")
    expected = "QAT+AMP refused" if ctx.device.type == "cuda" else "QAT+AMP uses"
    if not qat_amp.startswith(expected):
        raise CheckFailed(detail)
    return detail


def _qat_amp_outcome(ctx: Context) -> str:
    """What ``train.amp.enabled=True`` does to the QAT config: refused on CUDA (float16 autocast
    would round the fake-quantized values), a named trainer on the CPU (bfloat16 codes or float32)."""
    try:
        trainer = trainer_class(ctx.config(QAT_CONFIG, "qat_amp", **{"train.amp.enabled": True}), ctx.device)
    except UserError as e:
        return "QAT+AMP refused" if "train.amp.enabled=False" in str(e) else f"QAT+AMP: unclear message {e}"
    return f"QAT+AMP uses {trainer.__name__}"


def _evaluate(cfg, model, name):
    results = do_test(cfg, model, output_dir=os.path.join(cfg.train.output_dir, name))
    return results["bbox"]["AP"], results["harmony"]


def check_evaluation(ctx: Context) -> str:
    cfg = ctx.config(FP32_CONFIG, "evaluation")
    torch.manual_seed(0)
    model = build_model(cfg)
    if ctx.fp32_checkpoint:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(ctx.fp32_checkpoint)
    model.eval()
    ap_dev, harmony_dev = _evaluate(cfg, model, "device")
    ap_cpu, harmony_cpu = _evaluate(cfg, copy.deepcopy(model).to("cpu"), "cpu")
    key = "mean_abs_gap" if "mean_abs_gap" in harmony_dev else min(harmony_dev)
    detail = (
        f"AP {ap_dev:.2f} ({ctx.device.type}) vs {ap_cpu:.2f} (cpu); harmony {key} "
        f"{harmony_dev[key]:.4f} vs {harmony_cpu[key]:.4f}"
        + ("" if ctx.fp32_checkpoint else " (random weights: pass --fp32-checkpoint for a trained detector)")
    )
    both_empty = math.isnan(ap_dev) and math.isnan(ap_cpu)  # no detection at all (random weights)
    if not (both_empty or abs(ap_dev - ap_cpu) <= AP_TOLERANCE):
        raise CheckFailed(f"AP differs by more than {AP_TOLERANCE}: {detail}")
    return detail


def check_integer(ctx: Context) -> str:
    if ctx.qat_model is None:
        raise Skip("needs the model of the qat check, which failed")
    int_cpu = to_integer(ctx.qat_model)
    int_dev = copy.deepcopy(int_cpu).to(ctx.device)
    cfg = ctx.config(QAT_CONFIG, "integer")
    loader = instantiate(cfg.dataloader.test)
    differing, total = 0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 8:
                break
            outs = []
            for m in (int_cpu, int_dev):
                images = m.preprocess_image(batch)
                features = [m.backbone(images.tensor)[f] for f in m.head_in_features]
                outs.append(m.head.forward_integer(features))
            for per_out_cpu, per_out_dev in zip(*outs):
                for a, b in zip(per_out_cpu, per_out_dev):
                    differing += int((a != b.cpu()).sum())
                    total += a.numel()
    report = compare_integer_model(ctx.qat_model, int_dev, loader, num_images=8, reference64=False)
    detail = (
        f"{total} integer head outputs on 8 images: {differing} differ between {ctx.device.type} and cpu; "
        f"vs fake-quant on {ctx.device.type}: detections matched {report.match_rate:.1%}"
    )
    if differing:
        raise CheckFailed(detail)
    return detail


# name: (QAT config, overrides); integer_bias puts the integer-aware convs of scope AQD* on the device
LIGHTWEIGHT_CONFIGS = {
    "ssdlite": ("configs/ssdlite_mv2_tqt_w4_hqod.py", {"quant.integer_bias": True}),
    "yolox": ("configs/yolox_tiny_tqt_w4_hqod.py", {}),
}


def check_lightweight(ctx: Context) -> str:
    details, failures = [], []
    for name, (path, overrides) in LIGHTWEIGHT_CONFIGS.items():
        torch.manual_seed(0)
        init = ctx.lightweight_checkpoints.get(name, "")
        cfg = ctx.config(path, name, **overrides, **{"train.init_checkpoint": init})
        start = time.perf_counter()
        model, _, losses = _train(cfg)
        seconds = (time.perf_counter() - start) / max(1, len(losses))
        window = max(2, len(losses) // 4)
        model.eval()
        ap_dev, _ = _evaluate(cfg, model, "device")
        ap_cpu, _ = _evaluate(cfg, copy.deepcopy(model).to("cpu"), "cpu")
        detail = (
            f"{name}{'' if init else ' (random init)'}: {len(losses)} it. {seconds:.2f} s/it incl. calibration "
            f"and kernel compilation, loss {sum(losses[:window]) / window:.3f} -> {sum(losses[-window:]) / window:.3f} "
            f"(means of {window}), AP {ap_dev:.2f} ({ctx.device.type}) vs {ap_cpu:.2f} (cpu)"
        )
        details.append(detail)
        if not loss_falls(losses, window):
            failures.append(f"{name}: loss does not fall")
        if not ((math.isnan(ap_dev) and math.isnan(ap_cpu)) or abs(ap_dev - ap_cpu) <= QUANTIZED_AP_TOLERANCE):
            failures.append(f"{name}: AP differs by more than {QUANTIZED_AP_TOLERANCE}")
    if failures:
        raise CheckFailed(f"{'; '.join(failures)}. {'; '.join(details)}")
    return "; ".join(details)


DISTRIBUTED_ITERATIONS = 4


def _distributed_worker(ctx: Context):
    register_datasets(os.path.join(ctx.workdir, "digits"))
    cfg = ctx.config(QAT_CONFIG, "distributed", **{"train.max_iter": DISTRIBUTED_ITERATIONS})
    model, _, losses = _train(cfg)
    synchronized = sum("SyncBatchNorm" in type(m).__name__ for m in model.modules())
    if not synchronized:
        raise CheckFailed("no synchronized BatchNorm in the model")
    finite = len(losses) == DISTRIBUTED_ITERATIONS and all(math.isfinite(v) for v in losses)
    if comm.is_main_process() and not finite:
        raise CheckFailed(f"losses {losses}")


def check_distributed(ctx: Context) -> str:
    """Two processes: NCCL on 2 GPUs, gloo on the CPU."""
    if ctx.device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 GPUs ({torch.cuda.device_count()} here)")
    backend = "NCCL" if ctx.device.type == "cuda" else "gloo"
    launch(_distributed_worker, 2, dist_url="auto", args=(dataclasses.replace(ctx, qat_model=None),))
    return f"2 processes ({backend}), {DISTRIBUTED_ITERATIONS} QAT iterations with synchronized BN"


CHECKS = [
    ("quantizers", check_quantizers),
    ("qat", check_qat),
    ("amp", check_amp),
    ("evaluation", check_evaluation),
    ("integer", check_integer),
    ("lightweight", check_lightweight),
    ("distributed", check_distributed),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the same checks)")
    parser.add_argument("--fp32-checkpoint", default="", help="a trained FP32 RetinaNet-R18 for the evaluation check")
    parser.add_argument("--ssdlite-fp32-checkpoint", default="", help="a trained FP32 SSD-lite for the lightweight check")
    parser.add_argument("--yolox-fp32-checkpoint", default="", help="a trained FP32 YOLOX-tiny for the lightweight check")
    parser.add_argument("--iterations", type=int, default=40, help="training iterations of the qat and amp checks")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--checks", default=",".join(n for n, _ in CHECKS), help="comma-separated subset")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to PyTorch; run on a GPU machine, or --device cpu for a dry run.", file=sys.stderr)
        return 2
    unknown = set(args.checks.split(",")) - {n for n, _ in CHECKS}
    if unknown:
        print(f"error: unknown checks {sorted(unknown)}; choose from {[n for n, _ in CHECKS]}.", file=sys.stderr)
        return 2
    lightweight = {"ssdlite": args.ssdlite_fp32_checkpoint, "yolox": args.yolox_fp32_checkpoint}
    for option, path in [("fp32", args.fp32_checkpoint)] + [(f"{k}-fp32", v) for k, v in lightweight.items()]:
        if path and not os.path.isfile(path):
            print(f"error: --{option}-checkpoint {path} does not exist.", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="hqod_gpu_check_") as workdir:
        size = args.image_size - 64  # scenes of size..size+64 px, resized to --image-size
        spec = DigitsSpec(num_train=args.train_images, num_val=args.val_images, min_size=size, max_size=size + 64, seed=7)
        generate_digits(os.path.join(workdir, "digits"), spec)
        register_datasets(os.path.join(workdir, "digits"))
        ctx = Context(device, workdir, args.iterations, args.image_size, args.fp32_checkpoint, lightweight)
        with EventStorage():
            results = run_checks([(n, f) for n, f in CHECKS if n in args.checks.split(",")], ctx)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nHQOD-D2 GPU check on {name}, torch {torch.__version__}\n")
    print(summary_table(results))
    return int(any(r.status == "fail" for r in results))


if __name__ == "__main__":
    setup_logger(name="hqod")  # here, not in main(): the tests call main() under pytest's capture
    setup_logger(name="detectron2", abbrev_name="d2")
    sys.exit(main())
