"""
Set-up for tools/train_net.py: loading a LazyConfig with checked overrides, the output directory
guard, the device. Every user mistake becomes one :class:`UserError` whose message says what to
change; tools/train_net.py prints it without a traceback.
"""
import difflib
import os

import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig


class UserError(RuntimeError):
    """A mistake in the command line, config or files; the message says what to change."""


def _all_keys(cfg, prefix=""):
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        v = cfg._get_node(k)
        if OmegaConf.is_dict(v):
            keys += _all_keys(v, full + ".")
    return keys


def load_config(config_file, overrides=()):
    """Load a LazyConfig and apply ``key=value`` overrides, refusing keys the config lacks."""
    if not os.path.isfile(config_file):
        raise UserError(f"Config file {config_file} does not exist (see configs/ for the list).")
    cfg = LazyConfig.load(config_file)
    known = _all_keys(cfg)
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o:
            raise UserError(f"Override {o!r} is not of the form key=value.")
        if key not in known and not _is_list_index(cfg, key):
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UserError(f"Unknown config key {key!r} in override {o!r}.{hint}")
    try:
        return LazyConfig.apply_overrides(cfg, list(overrides))
    except Exception as e:  # hydra's parser errors are long; keep the one line that matters
        raise UserError(f"Cannot apply overrides {list(overrides)}: {e}") from None


def _is_list_index(cfg, key):
    """``a.b.0.c``-style keys into lists are checked by OmegaConf itself."""
    return any(part.isdigit() for part in key.split(".")) and (
        OmegaConf.select(cfg, key, default="__missing__") != "__missing__"
    )


def resolve_device(device):
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={device} but no CUDA GPU is available; use train.device=cpu.")
    return device


def check_output_dir(output_dir, resume, eval_only):
    """
    Never overwrite another run silently: a directory that already holds checkpoints is used only
    with --resume (continue it) or --eval-only (read it).
    """
    if resume or eval_only or not output_dir:
        return
    if os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        raise UserError(
            f"Output directory {output_dir} already holds a training run (it has checkpoints). "
            "Add --resume to continue it, or choose another train.output_dir=... ."
        )
