"""Training and evaluation for LazyConfig detectors, in the shape of detectron2's
tools/lazyconfig_train_net.py (do_train / do_test), with the checks HQOD-D2 adds."""
import json
import logging
import os

import torch
from omegaconf import ListConfig

from detectron2.config import instantiate
from detectron2.engine import SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from hqod.data import ensure_datasets
from hqod.quantization import calibrate, load_fp32_checkpoint, quantize_model

from .checkpoint import Checkpointer
from .defaults import UserError, resolve_device

logger = logging.getLogger("hqod")


def _dataset_names(loader_cfg):
    names = loader_cfg.dataset.names
    return [names] if isinstance(names, str) else list(names)


def build_model(cfg):
    """``cfg.model``, quantized by ``cfg.quant`` when the config has that node, on its device."""
    model = instantiate(cfg.model)
    if cfg.get("quant") is not None:
        try:
            model = quantize_model(model, cfg.quant)
        except ValueError as e:  # bad bits, method, scope, layer names: the message says which
            raise UserError(f"quant: {e}") from e
    model.to(resolve_device(cfg.train.device))
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
    model (keys mapped, a clear report), then the calibration pass over ``quant.calib_images``
    training images (observers on, fake quantization off)."""
    path = cfg.train.init_checkpoint
    if path:
        if "://" not in path and not os.path.isfile(path):
            raise _fp32_checkpoint_missing(path)
        try:
            load_fp32_checkpoint(model, path)
        except ValueError as e:
            raise UserError(f"train.init_checkpoint={path}: {e}") from e
    else:
        logger.warning("QAT from scratch: train.init_checkpoint is empty (no FP32 detector).")
    with torch.no_grad():
        calibrate(model, data_loader, cfg.quant.get("calib_images", 0))


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


def do_train(cfg, model, *, resume=False):
    """
    Train ``model`` (already built and on its device) with ``cfg.optimizer``,
    ``cfg.lr_multiplier`` and ``cfg.dataloader.train``; periodic checkpoints, evaluation,
    metrics.json / TensorBoard / console logs with ETA. Returns the results of the final
    evaluation (detectron2's EvalHook runs it after the last iteration).
    """
    ensure_datasets(_dataset_names(cfg.dataloader.train))
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    quantized = cfg.get("quant") is not None
    resuming = resume and Checkpointer(model, cfg.train.output_dir).has_checkpoint()
    if quantized and not resuming:
        init_qat(cfg, model, train_loader)  # before DDP wraps the model

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = SimpleTrainer(model, train_loader, optimizer)
    results = {}

    def evaluate():
        results.clear()
        results.update(do_test(cfg, model))
        return results

    checkpointer = Checkpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    if resuming:
        # Everything, quantizer state included, comes back from the last checkpoint.
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
        start_iter = trainer.iter + 1
    else:
        if not quantized:
            checkpointer.load(cfg.train.init_checkpoint)
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results
