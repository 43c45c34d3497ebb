#!/usr/bin/env python
"""
Generate the embedded digits detection dataset (hqod.data.digits) under $DETECTRON2_DATASETS
(default datasets/): datasets/digits/{train,val}/*.jpg and datasets/digits/annotations/*.json.

    python tools/generate_digits.py [--root datasets] [--num-train 2000] [--num-val 500] [--force]
"""
import argparse
import os
import shutil
import sys
import time

import hqod  # noqa: F401
from hqod.data import DigitsSpec, datasets_root, generate_digits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="datasets root (default $DETECTRON2_DATASETS or datasets)")
    parser.add_argument("--num-train", type=int, default=DigitsSpec.num_train)
    parser.add_argument("--num-val", type=int, default=DigitsSpec.num_val)
    parser.add_argument("--seed", type=int, default=DigitsSpec.seed)
    parser.add_argument("--force", action="store_true", help="regenerate even if it exists")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error("--num-train and --num-val must be positive")
    out = os.path.join(args.root or datasets_root(), "digits")
    done = all(
        os.path.isfile(os.path.join(out, "annotations", f"instances_{s}.json")) for s in ("train", "val")
    )
    if done and not args.force:
        print(f"{out} already exists (use --force to regenerate).")
        return
    if args.force and os.path.isdir(out):
        shutil.rmtree(out)
    start = time.perf_counter()
    spec = DigitsSpec(num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    for f in generate_digits(out, spec):
        print(f"wrote {f}")
    print(f"digits dataset generated in {time.perf_counter() - start:.1f} s: {out}")


if __name__ == "__main__":
    sys.exit(main())
