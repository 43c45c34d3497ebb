#!/usr/bin/env python
"""
The main job (`make demo`): on the embedded digits dataset, generate the data if missing,
pretrain the ResNet-18 backbone on digit crops of the train split if its checkpoint is missing
(the stand-in for ImageNet pretraining), train FP32 RetinaNet-R18 from it, fine-tune it with
quantization-aware training (AQD W4A4, fully quantized, + the HQOD losses), evaluate both with
COCOEvaluator, and print the AP table and where the outputs went. Each stage is the
`tools/train_net.py` command a user would type (printed before it runs). Running it again
continues (`--resume`) instead of starting over: finished stages only re-evaluate, and nothing in
output/demo is overwritten.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]

# (name, config, overrides); "{out}" is the demo's output folder, "{qat_amp}" qat_amp_override().
STAGES = [
    ("FP32 RetinaNet-R18", "configs/retina_r18_fp32.py", []),
    (
        "AQD W4A4 + HQOD RetinaNet-R18",
        "configs/retina_r18_aqd_w4_hqod.py",
        ["train.init_checkpoint={out}/retina_r18_fp32/model_final.pth", "{qat_amp}"],
    ),
]


def qat_amp_override():
    """``{qat_amp}`` above. On the CPU, the QAT stage runs with train.amp.enabled=True: where the
    CPU has native bfloat16, the quantized convolutions then run on their integer codes in
    bfloat16 (exact products, hqod.engine.amp.BFloat16CodesTrainer, 1.16x faster on the project's
    machine); on other CPUs it stays float32. On CUDA, QAT refuses AMP: the stage runs in float32."""
    import torch

    return "train.amp.enabled=" + str(not torch.cuda.is_available())


def run(cmd):
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def final_metrics(output_dir):
    """The last evaluation that tools/train_net.py wrote to metrics.json."""
    last = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            record = json.loads(line)
            if "bbox/AP" in record:
                last = record
    return {m: last.get(f"bbox/{m}", float("nan")) for m in METRICS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/demo")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    run([sys.executable, "tools/generate_digits.py"])
    run([sys.executable, "tools/pretrain_backbone.py", "--depth", "18"])  # kept if it exists
    rows, qat_amp = [], qat_amp_override()
    for name, config, overrides in STAGES:
        out = os.path.join(args.output_dir, os.path.splitext(os.path.basename(config))[0])
        run(
            [sys.executable, "tools/train_net.py", "--config-file", config, "--resume"]
            + [o.format(out=args.output_dir, qat_amp=qat_amp) for o in overrides]
            + [f"train.output_dir={out}"]
        )
        rows.append((name, final_metrics(out), out))

    print("\nCOCO box AP on digits_val (500 images):\n")
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name, metrics, _ in rows:
        print(f"| {name} | " + " | ".join(f"{metrics[m]:.1f}" for m in METRICS) + " |")
    print("\nOutputs (checkpoints, metrics.json, TensorBoard events, log.txt, inference/):")
    for name, _, out in rows:
        print(f"  {name}: {out}")
    print(f"\nDemo finished in {(time.perf_counter() - start) / 60:.1f} min.")


if __name__ == "__main__":
    sys.exit(main())
