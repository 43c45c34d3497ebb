#!/usr/bin/env python
"""
Task-harmony analysis of one trained detector, or of one against a baseline (HQOD Figs. 1, 2,
4, 5, 6): COCO AP and the harmony metrics of hqod.evaluation.HarmonyEvaluator, and PNGs.

    python tools/analyze_harmony.py --config-file configs/retina_r18_aqd_w2_hqod.py \
        --baseline-config-file configs/retina_r18_aqd_w2.py

Each checkpoint defaults to ``<train.output_dir>/model_final.pth`` of its config
(``--checkpoint`` / ``--baseline-checkpoint`` override it). Writes to ``--output-dir``
(default ``output/harmony/<run>[_vs_<baseline>]``; files there of the same names are replaced):

* ``harmony.json``: per run, ``{"bbox": {...AP...}, "harmony": {...}}``;
* ``<run>/harmony_tp.json``: every true positive's score and IoU;
* ``score_iou_density.png`` (Fig. 2), ``gap_histogram.png`` (Fig. 5),
  ``iou_bin_difference.png`` (Fig. 4, with a baseline);
* ``vis/<run>_<image_id>.png`` (Figs. 1, 6): the first ``--vis-images`` test images, ground
  truth in red, detections scoring at least ``--vis-score`` in blue with their scores.
"""
import argparse
import json
import logging
import os

import torch

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from detectron2.utils.logger import setup_logger

from hqod.engine import Checkpointer, UserError, build_model, do_test, final_checkpoint, load_config, run_tool
from hqod.evaluation.harmony_plots import (
    draw_detections,
    load_tp_records,
    plot_gap_histogram,
    plot_iou_bin_difference,
    plot_score_iou_density,
)

logger = logging.getLogger("hqod")

TABLE_KEYS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("harmony", "mean_gap"), ("harmony", "gap_0.0-0.1"), ("harmony", "ideal"), ("harmony", "corr"), ("harmony", "num_tp")]


def run_name(config_file):
    return os.path.splitext(os.path.basename(config_file))[0]


def resolve_run(config_file, checkpoint, opts):
    """(cfg, checkpoint): the config and the checkpoint to evaluate, which must exist."""
    cfg = load_config(config_file, opts)
    checkpoint = final_checkpoint(cfg, checkpoint)
    if not os.path.isfile(checkpoint):
        raise UserError(
            f"No checkpoint {checkpoint}: train it first (python tools/train_net.py --config-file "
            f"{config_file}) or name one with --checkpoint / --baseline-checkpoint."
        )
    return cfg, checkpoint


def load_model(cfg, checkpoint):
    """The config's model with the trained weights loaded, in eval mode."""
    model = build_model(cfg)
    Checkpointer(model).load(checkpoint)
    return model.eval()


@torch.no_grad()
def visualize(cfg, model, name, num_images, score_thresh, output_dir):
    records = instantiate(cfg.dataloader.test.dataset)[:num_images]
    mapper = instantiate(cfg.dataloader.test.mapper)
    names = cfg.dataloader.test.dataset.names
    metadata = MetadataCatalog.get(names if isinstance(names, str) else names[0])
    for record in records:
        instances = model([mapper(dict(record))])[0]["instances"].to("cpu")
        gt = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record.get("annotations", [])]
        image = read_image(record["file_name"], format="RGB")
        path = os.path.join(output_dir, "vis", f"{name}_{record['image_id']}.png")
        draw_detections(image, instances, gt, path, metadata=metadata, score_thresh=score_thresh)


def _format(key, value):
    return {"mean_gap": f"{value:.3f}", "corr": f"{value:.3f}", "num_tp": f"{value:.0f}"}.get(key, f"{value:.1f}")


def format_table(results):
    head = "| run | " + " | ".join(k for _, k in TABLE_KEYS) + " |"
    rows = [head, "|---" * (len(TABLE_KEYS) + 1) + "|"]
    for name, res in results.items():
        cells = [res.get(task, {}).get(key, float("nan")) for task, key in TABLE_KEYS]
        rows.append(f"| {name} | " + " | ".join(_format(key, v) for v, (_, key) in zip(cells, TABLE_KEYS)) + " |")
    return "\n".join(rows)


def main(args):
    runs = [(args.config_file, args.checkpoint)]
    if args.baseline_config_file:
        runs.append((args.baseline_config_file, args.baseline_checkpoint))
    names = [run_name(c) for c, _ in runs]
    if len(names) == 2 and names[0] == names[1]:
        names = [names[0], names[1] + "_baseline"]
    resolved = [resolve_run(config_file, checkpoint, args.opts) for config_file, checkpoint in runs]
    output_dir = args.output_dir or os.path.join("output", "harmony", "_vs_".join(names))
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, name="hqod")

    results, tps = {}, {}
    for (cfg, checkpoint), name in zip(resolved, names):
        model = load_model(cfg, checkpoint)
        logger.info(f"Evaluating {name} ...")
        results[name] = do_test(cfg, model, os.path.join(output_dir, name))
        tps[name] = load_tp_records(os.path.join(output_dir, name))
        if args.vis_images:
            visualize(cfg, model, name, args.vis_images, args.vis_score, output_dir)

    with open(os.path.join(output_dir, "harmony.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_score_iou_density(tps, os.path.join(output_dir, "score_iou_density.png"))
    plot_gap_histogram(tps, os.path.join(output_dir, "gap_histogram.png"))
    if len(names) == 2:
        plot_iou_bin_difference(tps[names[0]], tps[names[1]], os.path.join(output_dir, "iou_bin_difference.png"), names=names)
    print(format_table(results))
    print(f"Figures and harmony.json in {output_dir}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the run to analyze")
    parser.add_argument("--checkpoint", help="default: <train.output_dir>/model_final.pth")
    parser.add_argument("--baseline-config-file", help="a run to compare with (e.g. without HQOD)")
    parser.add_argument("--baseline-checkpoint", help="default: its <train.output_dir>/model_final.pth")
    parser.add_argument("--output-dir", help="default: output/harmony/<run>[_vs_<baseline>]")
    parser.add_argument("--vis-images", type=int, default=4, help="test images to draw (0: none)")
    parser.add_argument("--vis-score", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides for both runs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    run_tool(main, args)
