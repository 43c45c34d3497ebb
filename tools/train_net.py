#!/usr/bin/env python
"""
Train and evaluate a detector from a LazyConfig (the shape of detectron2's
tools/lazyconfig_train_net.py):

    python tools/train_net.py --config-file configs/retina_r18_fp32.py [key=value ...]
    python tools/train_net.py --config-file configs/retina_r18_fp32.py --eval-only \
        train.init_checkpoint=output/retina_r18_fp32/model_final.pth

Datasets, checkpoints and config keys are checked first; a mistake gives one error line that says
what to change (add --debug for the traceback).
"""
import logging
import sys

import torch
from omegaconf.errors import OmegaConfBaseException

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from hqod.data import DatasetError
from hqod.engine import (
    Checkpointer,
    UserError,
    build_model,
    check_output_dir,
    do_test,
    do_train,
    load_config,
)

logger = logging.getLogger("hqod")


def main(args):
    cfg = load_config(args.config_file, args.opts)
    check_output_dir(cfg.train.output_dir, args.resume, args.eval_only)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="hqod")
    model = build_model(cfg)
    logger.info("Model:\n{}".format(model))
    if args.eval_only:
        Checkpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(cfg, model, resume=args.resume)


def run(args):
    try:
        return main(args)
    except (UserError, DatasetError, FileNotFoundError, KeyError, OmegaConfBaseException) as e:
        if args.debug:
            raise
        if isinstance(e, OmegaConfBaseException):  # keep the first line, drop OmegaConf's key dump
            msg = str(e).splitlines()[0]
        else:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.num_gpus > 1 and not torch.cuda.is_available():
        print(
            f"error: --num-gpus {args.num_gpus} needs {args.num_gpus} CUDA GPUs and none is "
            "available; run with --num-gpus 1 on CPU.",
            file=sys.stderr,
        )
        sys.exit(2)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
