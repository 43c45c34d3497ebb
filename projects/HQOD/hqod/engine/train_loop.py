"""Training and evaluation for LazyConfig detectors, in the shape of detectron2's
tools/lazyconfig_train_net.py (do_train / do_test), with the checks HQOD-D2 adds."""
import json
import logging
import os
import re

import torch
from omegaconf import ListConfig

from detectron2.config import instantiate
from detectron2.engine import create_ddp_model, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from hqod.data import ensure_datasets
from hqod.modeling import dense_detectors
from hqod.pretrain import (
    IMAGENET_BACKBONES,
    PRETRAIN_BACKBONES,
    convert_command,
    imagenet_backbone_path,
    pretrain_command,
    pretrained_backbone_path,
)
from hqod.quantization import QuantConfig, calibrate, quantize_model, uninitialized_quantizers

from .amp import trainer_class
from .checkpoint import Checkpointer, ExtraTrainingState
from .defaults import UserError, resolve_device
from .distributed import convert_sync_batchnorm
from .loss_normalizers import track_loss_normalizers
from .hooks import SafeEvalHook, SafePeriodicCheckpointer, diverged

logger = logging.getLogger("hqod")


def _dataset_names(loader_cfg):
    names = loader_cfg.dataset.names
    return [names] if isinstance(names, str) else list(names)


def build_model(cfg):
    """``cfg.model``, quantized by ``cfg.quant`` when the config has that node (with a ``ptq``
    node: BN folded and the head quantizer PTQ uses, :func:`hqod.ptq.prepare_model`), on its device.
    Dense detectors keep their loss-normalizer EMAs in buffers, over all processes
    (:mod:`hqod.engine.loss_normalizers`); in several processes BN is synchronized everywhere
    (:mod:`hqod.engine.distributed`): N processes train as one with the same total batch."""
    try:
        model = instantiate(cfg.model)
    except ImportError as e:  # a _target_ that does not exist (detector, backbone, head name)
        m = re.search(r"Error loading '([^']+)'", str(e))
        what = f"{m.group(1)!r} cannot be imported" if m else str(e).strip().splitlines()[0]
        raise UserError(
            f"Cannot build the model: {what} (a model._target_ or a module name in the config). "
            f"Known detectors: {', '.join(dense_detectors())}."
        ) from e
    if cfg.get("quant") is not None:
        try:
            if cfg.get("ptq") is not None:  # the structure post-training quantization made
                from hqod.ptq import prepare_model

                model = prepare_model(model, cfg.quant, cfg.ptq)
            else:
                model = quantize_model(model, cfg.quant)
        except ValueError as e:  # bad bits, method, scope, layer names: the message says which
            msg = str(e)
            raise UserError(msg if msg.startswith(("quant.", "ptq.")) else f"quant: {msg}") from e
    track_loss_normalizers(model)
    model.to(resolve_device(cfg.train.device))
    if comm.get_world_size() > 1:
        n = convert_sync_batchnorm(model)
        logger.info(f"{comm.get_world_size()} processes: {n} BatchNorm layers synchronized.")
    return model


def _fp32_checkpoint_missing(path):
    """One message naming the command that produces a missing FP32 checkpoint: by convention
    configs/<name>.py writes output/<name>/model_final.pth."""
    name = os.path.basename(os.path.dirname(os.path.normpath(path)))
    config = os.path.join("configs", f"{name}.py")
    how = (
        f"Train it first: python tools/train_net.py --config-file {config}"
        if os.path.isfile(config)
        else "Train the FP32 detector first, or point train.init_checkpoint at its model_final.pth."
    )
    return UserError(f"FP32 checkpoint {path} (train.init_checkpoint) does not exist. {how}")


def init_qat(cfg, model, data_loader):
    """FP32 -> QAT: load the FP32 detector named by ``train.init_checkpoint`` into the quantized
    model (hqod's Checkpointer, strict: a checkpoint of another architecture is refused), then
    the calibration pass over ``quant.calib_images`` training images (observers on, fake
    quantization off), which gives the quantizers the state the FP32 checkpoint cannot hold. A
    quantized checkpoint (``tools/ptq.py``'s, for PTQ -> QAT) restores every quantizer: no pass."""
    path = cfg.train.init_checkpoint
    if path:
        if "://" not in path and not os.path.isfile(path):
            raise _fp32_checkpoint_missing(path)
        Checkpointer(model, strict=True).load(path)
    else:
        logger.warning("QAT from scratch: train.init_checkpoint is empty (no FP32 detector).")
    if model is not None and not uninitialized_quantizers(model):  # a quantized checkpoint (PTQ -> QAT)
        logger.info("Every quantizer was restored from the checkpoint: no calibration pass.")
        return
    with torch.no_grad():
        # QuantConfig holds the default of a node without the key, as for every quant field
        calibrate(model, data_loader, QuantConfig.from_cfg(cfg.quant).calib_images)


def check_init_checkpoint(cfg):
    """A missing ``train.init_checkpoint`` of an FP32 run: one message; for a digits-pretrained
    or a converted ImageNet backbone, the command that makes it."""
    path = cfg.train.init_checkpoint
    if not path or "://" in path or os.path.isfile(path) or cfg.get("quant") is not None:
        return
    # the backbones a command of ours makes: (where it writes, what to run)
    made_here = [
        (pretrained_backbone_path(d), f"Pretrained backbone {path} (train.init_checkpoint) does not "
         f"exist: make it with `{pretrain_command(d)}` (on 2 cores: ResNet-18 about 3 minutes, MobileNetV2 about 30)")
        for d in PRETRAIN_BACKBONES
    ] + [
        (imagenet_backbone_path(b), f"ImageNet backbone {path} (train.init_checkpoint) does not exist: "
         f"convert torchvision's ImageNet {'MobileNetV2' if b == 'mv2' else f'ResNet-{b[1:]}'} weights with `{convert_command(b)}`")
        for b in IMAGENET_BACKBONES
    ]  # fmt: skip
    for target, how in made_here:
        if os.path.normpath(path) == os.path.normpath(target):
            raise UserError(f'{how}, or set train.init_checkpoint="" to train from scratch.')
    raise UserError(
        f"Checkpoint {path} does not exist. Set train.init_checkpoint to an existing file (or to "
        '"" to train from scratch).'
    )


def do_test(cfg, model, output_dir=None):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (one
    evaluator or a list); returns detectron2's results dict, e.g.
    ``{"bbox": {"AP": ..., "AP50": ..., ...}, "harmony": {"mean_gap": ..., ...}}``, also written
    to ``results.json`` in ``output_dir`` (default ``<train.output_dir>/inference``), where the
    evaluators without their own ``output_dir`` write their files."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ensure_datasets(_dataset_names(cfg.dataloader.test))
    output_dir = output_dir or os.path.join(cfg.train.output_dir, "inference")
    evaluators = cfg.dataloader.evaluator
    for evaluator in evaluators if isinstance(evaluators, ListConfig) else [evaluators]:
        if evaluator.get("output_dir") is None:
            evaluator.output_dir = output_dir
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def _build_train_loader(cfg):
    try:
        return instantiate(cfg.dataloader.train)
    except AssertionError as e:  # detectron2: every image was filtered out (no instances)
        if "No valid data" not in str(e):
            raise
        names = ", ".join(_dataset_names(cfg.dataloader.train))
        raise UserError(
            f"Training dataset {names} has no image with instances (images without annotations "
            "are dropped for training); check its annotation file."
        ) from e


def _writers(cfg):
    """detectron2's default writers; ``train.metrics_window`` is the median window of the
    values written to metrics.json and TensorBoard (1: the raw value of each iteration)."""
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

    out, window = cfg.train.output_dir, cfg.train.get("metrics_window", 20)
    return [
        CommonMetricPrinter(cfg.train.max_iter),
        JSONWriter(os.path.join(out, "metrics.json"), window_size=window),
        TensorboardXWriter(out, window_size=window),
    ]


def _apply_optimizer_settings(optimizer, configured):
    """After loading an optimizer state: the configured hyperparameters (lr, weight decay,
    momentum, ...) replace the saved ones where they differ, logged."""
    if len(configured) != len(optimizer.param_groups):
        return
    changed = set()
    for group, conf in zip(optimizer.param_groups, configured):
        for key, value in conf.items():
            if key not in group or not isinstance(value, (int, float, bool)):
                continue
            saved = group.get("initial_lr", group[key]) if key == "lr" else group[key]
            if saved != value:
                changed.add(f"{'base lr' if key == 'lr' else key}: {saved} -> {value}")
                group[key] = value
                if key == "lr":  # the base of the LR schedule
                    group["initial_lr"] = value
    if changed:
        logger.warning("Resuming with the optimizer settings of the config: " + "; ".join(sorted(changed)))


def build_trainer(cfg, model, *, resume=False):
    """
    The trainer ``tools/train_net.py`` runs, ready to start: detectron2's SimpleTrainer (or its
    mixed-precision variant for ``train.amp.enabled``, :mod:`hqod.engine.amp`) over
    ``cfg.optimizer``, ``cfg.lr_multiplier`` and ``cfg.dataloader.train`` with its hooks
    (iteration timer, LR schedule, periodic checkpoints, evaluation, writers), FP32 -> QAT
    initialization and calibration for quantized configs, and the state of the last checkpoint
    when resuming. Returns ``(trainer, start_iter, results)``; ``results`` holds the last
    evaluation once training has run (see :func:`do_train`).
    """
    ensure_datasets(_dataset_names(cfg.dataloader.train))
    trainer_cls = trainer_class(cfg, next(model.parameters()).device)  # train.amp
    resuming = resume and Checkpointer(model, cfg.train.output_dir).has_checkpoint()
    if not resuming:
        check_init_checkpoint(cfg)
    if comm.is_main_process() and cfg.train.output_dir:
        os.makedirs(cfg.train.output_dir, exist_ok=True)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = _build_train_loader(cfg)
    quantized = cfg.get("quant") is not None
    if quantized and not resuming:
        init_qat(cfg, model, train_loader)  # before DDP wraps the model

    ddp_kwargs = dict(cfg.train.ddp)
    if next(model.parameters()).device.type == "cpu":
        ddp_kwargs.setdefault("device_ids", None)  # CPU processes (gloo): no device
    model = create_ddp_model(model, **ddp_kwargs)
    trainer = trainer_cls(model, train_loader, optimizer)
    results = {}

    def evaluate():
        results.clear()
        results.update(do_test(cfg, model))
        return results

    checkpointables = {"trainer": trainer, "training_state": ExtraTrainingState(model)}
    if hasattr(train_loader, "state_dict") and hasattr(train_loader, "load_state_dict"):
        checkpointables["data_loader"] = train_loader
    checkpointer = Checkpointer(model, cfg.train.output_dir, **checkpointables)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            SafePeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            SafeEvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(_writers(cfg), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    if resuming:
        # Everything, quantizer state included, comes back from the last checkpoint; the
        # optimizer settings of the config (e.g. a lower optimizer.lr after a divergence) win
        # over those saved with the optimizer state.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
        _apply_optimizer_settings(optimizer, configured)
        start_iter = trainer.iter + 1
    else:
        if not quantized:
            checkpointer.load(cfg.train.init_checkpoint)
        start_iter = 0
    if hasattr(train_loader, "set_start_iter"):
        train_loader.set_start_iter(start_iter)  # the data of iteration start_iter comes next
    return trainer, start_iter, results


def do_train(cfg, model, *, resume=False):
    """
    Train ``model`` (already built and on its device) with the trainer of
    :func:`build_trainer`: periodic checkpoints, evaluation, metrics.json / TensorBoard /
    console logs with ETA. Returns the results of the final evaluation (detectron2's EvalHook
    runs it after the last iteration).

    ``resume``: continue from the last checkpoint of ``train.output_dir`` exactly: weights,
    quantizer state, optimizer, LR schedule, iteration, loss-normalizer EMAs, RNG states and
    the position in the data stream (hqod's resumable train loader). A NaN/inf loss or weight
    raises :class:`TrainingDiverged`; nothing is saved after it.
    """
    trainer, start_iter, results = build_trainer(cfg, model, resume=resume)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise diverged(e, cfg.train.output_dir) from e
    return results
