"""
Classification crops for pretraining a detector's backbone on the embedded dataset.

The papers start every detector from an ImageNet-pretrained backbone; here the equivalent is a
backbone trained as an 11-way classifier (the 10 digits + background) on small crops drawn like
the scenes of :mod:`hqod.data.digits` — the same textured backgrounds, ink colours, digit scales,
rotations, distractor shapes, occluding bars, pixel noise and JPEG compression — but made from the
**train** split's digit pool only: val's digit samples are never drawn (:func:`crop_digit_pools`).

Each crop is a pure function of ``(seed, index)``, so a crop set is reproducible on any machine
and independent of the number of worker processes.
"""
import functools
import io

import numpy as np
from PIL import Image

from .digits import (
    _background,
    _contrasting_color,
    _digit_pools,
    _distractor_alpha,
    _paste,
    _render_digit,
)

# Label of the crops without a (centred) digit; digits keep their class 0..9.
BACKGROUND = 10
NUM_CROP_CLASSES = 11


@functools.lru_cache(maxsize=None)  # one read of scikit-learn's digits per process
def crop_digit_pools(holdout_fraction=0.1):
    """``(digit images, labels, {"fit": indices, "holdout": indices})``: the train split's digit
    samples (those that render the train scenes), divided into the samples pretraining learns
    from and a held-out share that measures how it generalizes to unseen writers. The samples
    that render val scenes are in neither."""
    images, labels, pools = _digit_pools()
    train = pools["train"]
    n_holdout = int(round(len(train) * holdout_fraction))
    return images, labels, {"fit": train[n_holdout:], "holdout": train[:n_holdout]}


def make_crop(rng, digit_images, digit_labels, pool, size=64, background_prob=0.2):
    """One ``size`` x ``size`` RGB crop (uint8 HWC) and its label: a digit of the pool near the
    centre, rendered as in a scene (side 0.25-0.9 of the crop, i.e. the small-to-large objects a
    detector sees at its input scale), or, with ``background_prob``, no centred digit (label
    :data:`BACKGROUND`): texture, distractor shapes, and sometimes a digit cut off at an edge.
    Returns ``(pixels, label, digit_index)``; ``digit_index`` is -1 when no digit is centred."""
    # a window of a scene-sized background, so that texture lines are as dense as in scenes
    x, y = rng.randint(0, size + 1, 2)
    canvas = np.ascontiguousarray(_background(rng, 2 * size, 2 * size)[y : y + size, x : x + size])
    label, centred = BACKGROUND, -1
    if rng.rand() >= background_prob:
        centred = int(pool[rng.randint(len(pool))])
        side = rng.uniform(0.25, 0.9) * size
        alpha = _render_digit(digit_images[centred], side, rng.uniform(0.75, 1.3), rng)
        alpha = alpha[:size, :size]
        h, w = alpha.shape
        jitter = 0.12 * size
        x0 = int(np.clip((size - w) / 2 + rng.uniform(-jitter, jitter), 0, size - w))
        y0 = int(np.clip((size - h) / 2 + rng.uniform(-jitter, jitter), 0, size - h))
        color = _contrasting_color(rng, canvas[y0 : y0 + h, x0 : x0 + w])
        _paste(canvas, alpha, color, x0, y0)
        label = int(digit_labels[centred])
        if rng.rand() < 0.25:  # an occluding bar over up to 30% of the digit, as in the scenes
            if rng.rand() < 0.5:
                ow, oh = int(w * rng.uniform(0.15, 0.3)) + 1, h
                ox, oy = (x0 if rng.rand() < 0.5 else x0 + w - ow), y0
            else:
                ow, oh = w, int(h * rng.uniform(0.15, 0.3)) + 1
                ox, oy = x0, (y0 if rng.rand() < 0.5 else y0 + h - oh)
            _paste(canvas, np.ones((oh, ow), np.float32), rng.rand(3).astype(np.float32), ox, oy)
    elif rng.rand() < 0.5:  # a digit mostly outside the crop: background for the detector too
        idx = int(pool[rng.randint(len(pool))])
        alpha = _render_digit(digit_images[idx], rng.uniform(0.4, 0.9) * size, rng.uniform(0.75, 1.3), rng)
        h, w = alpha.shape
        x0 = (size - w) // 2 + int(rng.uniform(0.65, 0.85) * w) * rng.choice([-1, 1])
        y0 = (size - h) // 2 + int(rng.uniform(0.65, 0.85) * h) * rng.choice([-1, 1])
        _paste_clipped(canvas, alpha, _contrasting_color(rng, canvas), x0, y0)
    for _ in range(rng.randint(0, 3)):  # clutter: unlabeled shapes and strokes, partly outside
        if centred >= 0 and rng.rand() < 0.5:  # keep most digits uncluttered
            continue
        alpha = _distractor_alpha(rng, rng.uniform(0.2, 0.6) * size)
        s = alpha.shape[0]
        x0, y0 = (int(v) for v in rng.randint(-s // 2, size - s // 2, 2))
        _paste_clipped(canvas, alpha, _contrasting_color(rng, canvas), x0, y0)
    canvas = np.clip(canvas + rng.normal(0, 0.02, canvas.shape), 0, 1)
    buffer = io.BytesIO()  # the scenes are JPEG files (quality 92)
    Image.fromarray((canvas * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    return pixels, label, centred


def _paste_clipped(canvas, alpha, color, x0, y0):
    """:func:`_paste` of ``alpha`` at (x0, y0), which may lie partly outside ``canvas``."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    xs, ys = max(0, -x0), max(0, -y0)
    x1, y1 = min(W, x0 + w), min(H, y0 + h)
    if x1 > max(0, x0) and y1 > max(0, y0):
        _paste(canvas, alpha[ys : ys + y1 - max(0, y0), xs : xs + x1 - max(0, x0)], color, max(0, x0), max(0, y0))


def crop_rng(seed, index):
    """The generator of crop ``index`` of the stream ``seed``."""
    return np.random.RandomState(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_crops(indices, *, seed=0, split="fit", size=64, background_prob=0.2, pools=None):
    """Crops ``indices`` of the stream ``seed``, drawn from the digit samples of ``split``
    (``"fit"`` or ``"holdout"``, :func:`crop_digit_pools`; ``pools`` = its result, to reuse):
    ``(images, labels, digit_ids)`` as uint8 ``(N, size, size, 3)``, int64 ``(N,)`` and int64
    ``(N,)`` (-1 where no digit is centred)."""
    images, labels, split_pools = pools or crop_digit_pools()
    crops = [
        make_crop(crop_rng(seed, i), images, labels, split_pools[split], size, background_prob)
        for i in indices
    ]
    return (
        np.stack([c[0] for c in crops]) if crops else np.zeros((0, size, size, 3), np.uint8),
        np.array([c[1] for c in crops], np.int64),
        np.array([c[2] for c in crops], np.int64),
    )
