"""Training and evaluation for LazyConfig detectors, in the shape of detectron2's
tools/lazyconfig_train_net.py (do_train / do_test), with the checks HQOD-D2 adds."""
import logging
import os

from detectron2.config import instantiate
from detectron2.engine import SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from hqod.data import ensure_datasets

from .checkpoint import Checkpointer
from .defaults import resolve_device

logger = logging.getLogger("hqod")


def _dataset_names(loader_cfg):
    names = loader_cfg.dataset.names
    return [names] if isinstance(names, str) else list(names)


def build_model(cfg):
    model = instantiate(cfg.model)
    model.to(resolve_device(cfg.train.device))
    return model


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; returns
    detectron2's results dict, e.g. ``{"bbox": {"AP": ..., "AP50": ..., ...}}``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ensure_datasets(_dataset_names(cfg.dataloader.test))
    if cfg.dataloader.evaluator.get("output_dir") is None:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results
