#!/usr/bin/env python
"""
Train and evaluate a detector from a LazyConfig (the shape of detectron2's
tools/lazyconfig_train_net.py):

    python tools/train_net.py --config-file configs/retina_r18_fp32.py [key=value ...]
    python tools/train_net.py --config-file configs/retina_r18_fp32.py --eval-only \
        train.init_checkpoint=output/retina_r18_fp32/model_final.pth

Datasets, checkpoints and config keys are checked first; a mistake gives one error line that says
what to change and exit code 2 (--debug shows its traceback too); any other exception is a bug
and keeps its traceback. A loss or weights that become infinite or NaN stop training with one
line naming the iteration, the loss values and the last good checkpoint, and exit code 3.

Several processes (detectron2's flags): ``--num-gpus N`` starts N processes on this machine, one
per GPU, or N CPU processes (gloo) on a machine without GPUs; ``--num-machines M --machine-rank R
--dist-url tcp://HOST:PORT`` on each of M machines. ``--resume`` continues the run of
``train.output_dir`` exactly where its last checkpoint left it.
"""
import logging
import sys

import torch.multiprocessing as mp

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from hqod.engine import (
    USER_ERRORS,
    Checkpointer,
    TrainingDiverged,
    build_model,
    check_output_dir,
    do_test,
    do_train,
    launch,
    load_config,
    setup_determinism,
    user_error_message,
)

logger = logging.getLogger("hqod")


class _QuietUserErrors(logging.Filter):
    """On the console, drop detectron2's "Exception during training:" record (and its
    traceback) when the exception is one that run() reports in one line; log.txt keeps it."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, USER_ERRORS + (TrainingDiverged, FloatingPointError))


def _quiet_console(debug):
    if debug:
        return
    for name in ("detectron2", "hqod", "fvcore"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.addFilter(_QuietUserErrors())


def main(args):
    cfg = load_config(args.config_file, args.opts)
    check_output_dir(cfg.train.output_dir, args.resume, args.eval_only, cfg)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="hqod")
    _quiet_console(args.debug)
    setup_determinism(cfg)
    model = build_model(cfg)
    logger.info("Model:\n{}".format(model))
    if args.eval_only:
        Checkpointer(model, strict=True).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(cfg, model, resume=args.resume)


def _report(msg, code):
    # one line per machine (local rank 0), not one per process
    if comm.get_world_size() == 1 or comm.get_local_rank() == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(args):
    try:
        return main(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        _report(user_error_message(e), 2)
    except TrainingDiverged as e:
        if args.debug:
            raise
        _report(e, 3)


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of every error (user errors and divergence too)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        # --num-gpus N: N processes per machine; CPU processes (gloo) where there is no GPU
        launch(
            run,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except mp.ProcessExitedException as e:  # a process stopped with its own one-line error
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
