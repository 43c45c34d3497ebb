#!/usr/bin/env python
"""
How much of each quantizer's integer grid a quantized detector uses, on the first images of the
config's test set: per per-tensor quantizer the levels used, the levels its input's range can
reach, the shares of values clipped at either end and of negative values, then the means per bit
width (hqod.evaluation.grid_occupancy).

    python tools/analyze_grids.py --config-file configs/yolox_tiny_lsq_w4.py --images 8
    python tools/analyze_grids.py --config-file configs/retina_r18_lsq_w4.py --checkpoint PATH

The checkpoint defaults to the config's ``train.output_dir/model_final.pth`` (a QAT checkpoint).
"""
import argparse
import itertools

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import instantiate

from hqod.data import ensure_datasets
from hqod.engine import UserError, final_checkpoint, load_config, load_trained_model, run_tool
from hqod.evaluation.grid_occupancy import grid_occupancy, occupancy_table


def main(args):
    cfg = load_config(args.config_file, args.opts)
    if cfg.get("quant") is None:
        raise UserError(f"{args.config_file} is not a quantized config (no `quant` node): pass a QAT config.")
    checkpoint = final_checkpoint(cfg, args.checkpoint)
    model = load_trained_model(cfg, args.config_file, checkpoint)
    ensure_datasets(cfg.dataloader.test.dataset.names)
    batches = itertools.islice(instantiate(cfg.dataloader.test), args.images)  # one image per batch
    occupancy = grid_occupancy(model, batches)
    print(f"{args.config_file} ({checkpoint}), {args.images} test images\n{occupancy_table(occupancy)}")
    return occupancy


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoint", default="", help="QAT checkpoint (default: train.output_dir/model_final.pth)")
    parser.add_argument("--images", type=int, default=8, help="test images to run")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_tool(main, parse_args())
