"""
Set-up for tools/train_net.py: loading a LazyConfig with checked overrides, the output directory
guard, the device. Every user mistake becomes one :class:`UserError` whose message says what to
change; tools/train_net.py prints it without a traceback (:data:`USER_ERRORS`).
"""
import difflib
import logging
import os
import sys
import tempfile

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from detectron2.config import LazyConfig

from hqod.data import DatasetError


class UserError(RuntimeError):
    """A mistake in the command line, config or files; the message says what to change."""


# What the tools report in one line (exit code 2): the mistakes in what the user gave, raised as
# UserError / DatasetError where they are recognized, and a config value that OmegaConf cannot
# resolve (a ${...} to a missing key, a resolver refusing the value: an unknown dataset preset).
# Anything else, a KeyError or FileNotFoundError included, is a bug and keeps its traceback.
USER_ERRORS = (UserError, DatasetError, InterpolationResolutionError)


def user_error_message(error):
    """The line a user error is reported with; OmegaConf's own lines after it (full key, object
    type) are left out."""
    if isinstance(error, InterpolationResolutionError):
        return str(error).splitlines()[0]
    return str(error)


def run_tool(main, args):
    """``main(args)`` of a command-line tool, a user error reported in one line on stderr (exit
    code 2) unless ``args.debug`` asks for its traceback."""
    try:
        return main(args)
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {user_error_message(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def export_tool_main(run, args):
    """The ``__main__`` of an export tool (tools/export_onnx.py, tools/export_integer.py):
    hqod's log, detectron2's warnings only, no autograd, then ``run(args)``. Here and not in
    ``run``: the tests call ``run`` under pytest's output capture, which a logger must not bind."""
    from detectron2.utils.logger import setup_logger

    setup_logger(name="hqod", abbrev_name="hqod")
    setup_logger(name="detectron2", abbrev_name="d2").setLevel(logging.WARNING)
    torch.set_grad_enabled(False)
    return run(args)


def final_checkpoint(cfg, checkpoint: str = "") -> str:
    """``checkpoint``, or by default the ``model_final.pth`` that ``tools/train_net.py`` writes
    in the config's ``train.output_dir``."""
    return checkpoint or os.path.join(cfg.train.output_dir, "model_final.pth")


def load_trained_model(cfg, config_file: str, checkpoint: str):
    """The detector of ``cfg`` with the weights (and quantizer state) of ``checkpoint``, on the
    CPU, in eval mode: what the export tools read. A missing checkpoint, or one without the
    quantizer state a quantized config needs, is a :class:`UserError`."""
    from hqod.quantization import uninitialized_quantizers

    from .checkpoint import Checkpointer
    from .train_loop import build_model

    model = build_model(cfg)
    if not os.path.isfile(checkpoint):
        raise UserError(
            f"Checkpoint {checkpoint} does not exist. Train the model first (python tools/train_net.py "
            f"--config-file {config_file}) or pass --checkpoint."
        )
    Checkpointer(model).load(checkpoint)
    model.to("cpu")
    if cfg.get("quant") is not None and uninitialized_quantizers(model):
        raise UserError(
            f"{checkpoint} holds no quantizer state for this config (an FP32 checkpoint, or another "
            "config's): pass the QAT checkpoint that tools/train_net.py wrote for it."
        )
    return model.eval()


class TrainingDiverged(RuntimeError):
    """The loss or the weights became infinite or NaN; the message names the iteration, the
    loss values and the last good checkpoint (nothing is saved after the failure)."""


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


# A run is defined by its model, quantization and training data: --resume refuses an output
# directory whose run differs in these keys. Other keys (schedule length, learning rate,
# logging, evaluation, workers) may change when resuming; the changes are logged.
RUN_IDENTITY_KEYS = ("model", "quant", "dataloader.dataset", "dataloader.train.dataset", "dataloader.train.mapper")


def _flatten(node, prefix=""):
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}{i}."))
        if not node:
            out[prefix[:-1]] = []
    else:
        out[prefix[:-1]] = node
    return out


def _saved_form(cfg):
    """``cfg`` as detectron2's ``LazyConfig.save`` writes it to config.yaml, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        LazyConfig.save(cfg, path)
        with open(path) as f:
            return yaml.unsafe_load(f)


def config_differences(cfg, saved_yaml):
    """Flattened keys (``a.b.0.c``) whose values differ between ``cfg`` and the config saved in
    ``saved_yaml`` (a run's config.yaml): ``{key: (saved, current)}``, "<absent>" for a key that
    only one of them has. Interpolations are compared unresolved, as saved."""
    with open(saved_yaml) as f:
        saved = _flatten(yaml.unsafe_load(f) or {})
    current = _flatten(_saved_form(cfg))
    diffs = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs[key] = (a, b)
    return diffs


def _is_identity_key(key):
    return any(key == k or key.startswith(k + ".") for k in RUN_IDENTITY_KEYS)


def _describe(diffs, limit=4):
    items = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diffs.items())[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(items) + more


def check_output_dir(output_dir, resume, eval_only, cfg=None):
    """
    Never overwrite another run silently. A directory that already holds checkpoints is used
    only with --eval-only (read it) or --resume (continue it). With ``cfg``, the run's saved
    config.yaml is compared: --resume refuses a run of another model, quantization or training
    data (:data:`RUN_IDENTITY_KEYS`), naming the keys that differ, and logs other changes.
    """
    if eval_only or not output_dir:
        return
    has_run = os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
    saved = os.path.join(output_dir, "config.yaml")
    diffs = {}
    if has_run and cfg is not None and os.path.isfile(saved):
        try:
            diffs = config_differences(cfg, saved)
        except Exception as e:  # an unreadable saved config: say so, compare nothing
            logging.getLogger("hqod").warning(f"Cannot compare with {saved}: {e}")
    identity = {k: v for k, v in diffs.items() if _is_identity_key(k)}
    if has_run and not resume:
        what = (
            f"a training run of a different config ({_describe(identity or diffs)})"
            if diffs
            else "a training run (it has checkpoints)"
        )
        raise UserError(
            f"Output directory {output_dir} already holds {what}. Add --resume to continue it, "
            "or choose another train.output_dir=... ."
        )
    if has_run and resume and identity:
        raise UserError(
            f"--resume: output directory {output_dir} holds a run of another model, quantization "
            f"or training data ({_describe(identity)}). Choose another train.output_dir=... for "
            "this config, or resume with the run's own config."
        )
    if has_run and resume and diffs:
        logging.getLogger("hqod").warning(
            f"Resuming {output_dir} with changed settings: {_describe(diffs, limit=20)}"
        )


def setup_determinism(cfg):
    """``train.deterministic=True``: deterministic algorithms (PyTorch, cuDNN, cuBLAS) so that a
    run, and a run resumed from any of its checkpoints, repeat bit for bit on the same machine
    and thread count. Needs ``train.seed >= 0``."""
    if not cfg.train.get("deterministic", False):
        return
    if cfg.train.get("seed", -1) < 0:
        raise UserError("train.deterministic=True needs a fixed seed: set train.seed=0 (or any seed >= 0).")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # TorchScript functions (detectron2's focal loss) switch to an optimized graph with its own
    # symbolic gradients after their first calls: a resumed process would take other code paths
    # than the uninterrupted one at the same iteration. Run them unoptimized, like every call.
    torch._C._set_graph_executor_optimize(False)
