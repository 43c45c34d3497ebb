"""
The embedded detection dataset: real handwritten digits in cluttered generated scenes.

Each scene is a textured, cluttered background with 3-9 handwritten digits from scikit-learn's
bundled ``load_digits()`` (1,797 real 8x8 digits, 10 classes), upsampled to small, medium and large
objects in COCO's area terms (< 32², 32²-96², > 96² pixels), plus unlabeled distractor strokes and
shapes and partial occlusion. Train and val scenes use disjoint digit samples (different writers'
strokes), so val measures generalization. Boxes are tight around the visible ink, so AP75 rewards
precise localization.

Written once as JPEG images + COCO-format JSON and loaded through detectron2's
``register_coco_instances`` (see :mod:`hqod.data.datasets`), exactly the path real COCO takes.
Deterministic: the same arguments give byte-identical JSON and images on any machine.
"""
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

CLASS_NAMES = [str(i) for i in range(10)]
# Fraction of the 1,797 digit samples reserved for train scenes; the rest render val scenes.
_TRAIN_DIGIT_FRACTION = 0.75


@dataclass(frozen=True)
class DigitsSpec:
    """What to generate. Changing any field gives a different dataset (and folder name check)."""

    num_train: int = 2000
    num_val: int = 500
    min_size: int = 256
    max_size: int = 384
    seed: int = 0


def _digit_pools():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # 8x8 in [0, 1]
    order = np.random.RandomState(1234).permutation(len(images))
    n_train = int(len(images) * _TRAIN_DIGIT_FRACTION)
    pools = {"train": order[:n_train], "val": order[n_train:]}
    return images, digits.target.astype(np.int64), pools


def _background(rng, h, w):
    """Low-frequency colored noise + gradient + random lines + pixel noise, as float RGB in [0,1]."""
    grid = rng.rand(rng.randint(3, 8), rng.randint(3, 8), 3).astype(np.float32)
    low = np.asarray(
        Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32
    ) / 255.0
    base = rng.rand(3).astype(np.float32)
    bg = 0.45 * low + 0.55 * base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.rand() * 2 * np.pi
    grad = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
    bg = bg + 0.25 * (grad - grad.mean()) * (rng.rand(3) - 0.5)
    img = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 10)):  # texture lines
        pts = [(int(rng.randint(0, w)), int(rng.randint(0, h))) for _ in range(2)]
        color = tuple(int(c) for c in rng.randint(0, 256, 3))
        draw.line(pts, fill=color, width=int(rng.randint(1, 3)))
    out = np.asarray(img, np.float32) / 255.0
    out += rng.normal(0, rng.uniform(0.01, 0.06), out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def _sample_side(rng):
    """Rendered side in pixels. The tight ink box of a digit is about 0.5·side², which gives about
    36% small, 47% medium and 17% large boxes in COCO area terms (COCO: 41%, 34%, 24%)."""
    r = rng.rand()
    if r < 0.35:
        return rng.uniform(24, 44)
    if r < 0.75:
        return rng.uniform(48, 125)
    return rng.uniform(145, 210)


def _render_digit(digit, side, aspect, rng):
    """Upsample an 8x8 digit to an alpha mask about ``side`` px tall (stroke ink in [0, 1])."""
    h = max(int(round(side)), 8)
    w = max(int(round(side * aspect)), 8)
    img = Image.fromarray((digit * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(side / 40.0, 0.3)))
    alpha = np.asarray(img, np.float32) / 255.0
    # Sharpen to stroke-like ink with a soft edge.
    alpha = np.clip((alpha - 0.25) * 2.5, 0, 1)
    angle = rng.uniform(-15, 15)
    alpha = np.asarray(
        Image.fromarray((alpha * 255).astype(np.uint8)).rotate(angle, Image.BILINEAR, expand=True),
        np.float32,
    ) / 255.0
    return alpha


def _distractor_alpha(rng, side):
    """An unlabeled shape of digit-like size: ellipse ring, box outline, polyline or scribble."""
    s = max(int(side), 8)
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    width = max(1, int(s / rng.uniform(6, 12)))
    kind = rng.randint(4)
    m = width
    if kind == 0:
        draw.ellipse([m, m, s - m - 1, s - m - 1], outline=255, width=width)
    elif kind == 1:
        draw.rectangle([m, m, s - m - 1, s - m - 1], outline=255, width=width)
    elif kind == 2:
        pts = [(int(rng.randint(m, s - m)), int(rng.randint(m, s - m))) for _ in range(3)]
        draw.line(pts, fill=255, width=width)
    else:
        pts = [(int(rng.randint(m, s - m)), int(rng.randint(m, s - m))) for _ in range(6)]
        draw.line(pts, fill=255, width=width, joint="curve")
    return np.asarray(img, np.float32) / 255.0


def _paste(canvas, alpha, color, x0, y0):
    """Alpha-blend a solid color into ``canvas`` at (x0, y0); returns the written ink mask."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    x1, y1 = min(x0 + w, W), min(y0 + h, H)
    a = alpha[: y1 - y0, : x1 - x0, None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + color * a
    ink = np.zeros((H, W), bool)
    ink[y0:y1, x0:x1] = a[..., 0] > 0.5
    return ink


def _contrasting_color(rng, bg_patch):
    mean = bg_patch.reshape(-1, 3).mean(0)
    for _ in range(10):
        color = rng.rand(3).astype(np.float32)
        if np.abs(color - mean).sum() > 0.9:
            return color
    return (1.0 - mean).astype(np.float32)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _make_scene(rng, spec, digit_images, digit_labels, pool):
    H = int(rng.randint(spec.min_size, spec.max_size + 1))
    W = int(rng.randint(spec.min_size, spec.max_size + 1))
    canvas = _background(rng, H, W)
    placed = []  # (box, label, ink mask)
    for _ in range(rng.randint(3, 10)):
        idx = pool[rng.randint(len(pool))]
        side = min(_sample_side(rng), 0.65 * min(H, W))
        alpha = _render_digit(digit_images[idx], side, rng.uniform(0.75, 1.3), rng)
        h, w = alpha.shape
        for _attempt in range(10):
            x0, y0 = int(rng.randint(0, W - w + 1)), int(rng.randint(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, p[0]) < 0.1 for p in placed):
                break
        else:
            continue
        color = _contrasting_color(rng, canvas[y0 : y0 + h, x0 : x0 + w])
        ink = _paste(canvas, alpha, color, x0, y0)
        for p in placed:  # a later digit may hide part of an earlier one
            p[2] &= ~ink
        placed.append([box, int(digit_labels[idx]), ink])

    # Distractors and occluders: unlabeled ink that may cover part of a digit.
    for _ in range(rng.randint(2, 8)):
        side = min(_sample_side(rng), 0.5 * min(H, W))
        alpha = _distractor_alpha(rng, side)
        s = alpha.shape[0]
        x0, y0 = int(rng.randint(0, W - s + 1)), int(rng.randint(0, H - s + 1))
        color = _contrasting_color(rng, canvas[y0 : y0 + s, x0 : x0 + s])
        ink = _paste(canvas, alpha, color, x0, y0)
        for p in placed:
            p[2] &= ~ink
    for p in placed:
        if rng.rand() < 0.25:  # partial occlusion by a solid bar over up to 30% of the box
            x0, y0, x1, y1 = p[0]
            bw, bh = x1 - x0, y1 - y0
            if rng.rand() < 0.5:
                ow, oh = int(bw * rng.uniform(0.15, 0.3)) + 1, bh
                ox = x0 if rng.rand() < 0.5 else x1 - ow
                oy = y0
            else:
                ow, oh = bw, int(bh * rng.uniform(0.15, 0.3)) + 1
                ox, oy = x0, (y0 if rng.rand() < 0.5 else y1 - oh)
            bar = np.ones((oh, ow), np.float32)
            ink = _paste(canvas, bar, rng.rand(3).astype(np.float32), ox, oy)
            for q in placed:
                q[2] &= ~ink

    canvas = np.clip(canvas + rng.normal(0, 0.02, canvas.shape), 0, 1)
    annotations = []
    for box, label, ink in placed:
        ys, xs = np.nonzero(ink)
        if len(xs) < 6:
            continue  # fully hidden
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if (x1 - x0) < 4 or (y1 - y0) < 4:
            continue
        annotations.append(
            {"bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "category_id": label + 1}
        )
    return (canvas * 255).astype(np.uint8), annotations


_POOL_STATE = {}


def _init_worker(spec, split, image_dir):
    digit_images, digit_labels, pools = _digit_pools()
    _POOL_STATE.update(
        spec=spec, images=digit_images, labels=digit_labels, pool=pools[split], image_dir=image_dir,
        offset={"train": 0, "val": 1_000_003}[split],
    )


def _write_scene(i):
    st = _POOL_STATE
    # One RandomState per image: the result does not depend on the number of worker processes.
    rng = np.random.RandomState(st["spec"].seed * 7_919 + st["offset"] + i)
    pixels, anns = _make_scene(rng, st["spec"], st["images"], st["labels"], st["pool"])
    file_name = f"{i:06d}.jpg"
    Image.fromarray(pixels).save(os.path.join(st["image_dir"], file_name), quality=92)
    return file_name, pixels.shape[0], pixels.shape[1], anns


def generate_split(root, split, spec: DigitsSpec = DigitsSpec(), num_workers=None):
    """Write ``root/{split}/*.jpg`` and ``root/annotations/instances_{split}.json``."""
    num = {"train": spec.num_train, "val": spec.num_val}[split]
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    num_workers = num_workers or min(4, os.cpu_count() or 1)
    if num_workers > 1 and num > 50:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(num_workers, _init_worker, (spec, split, image_dir)) as pool:
            scenes = pool.map(_write_scene, range(num), chunksize=16)
    else:
        _init_worker(spec, split, image_dir)
        scenes = [_write_scene(i) for i in range(num)]
    images, annotations = [], []
    for i, (file_name, height, width, anns) in enumerate(scenes):
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for a in anns:
            w, h = a["bbox"][2], a["bbox"][3]
            annotations.append(
                dict(a, id=len(annotations) + 1, image_id=image_id, area=w * h, iscrowd=0)
            )
    coco = {
        "info": {"description": f"HQOD-D2 embedded digits dataset, {split}", "spec": spec.__dict__},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)],  # 1-based, as COCO
    }
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    tmp = json_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, json_file)  # the JSON appears last: its presence marks a complete split
    logger.info(f"digits/{split}: {len(images)} images, {len(annotations)} boxes in {image_dir}")
    return json_file


def generate_digits(root, spec: DigitsSpec = DigitsSpec(), splits=("train", "val")):
    return [generate_split(root, s, spec) for s in splits]
