"""Shared by the tests that run tools/train_net.py or build detectors: the overrides of a tiny,
fast detector (FPN width 32, 128 px images, no data-loading workers); synthetic batches, a few SGD
steps, and small calibrated detectors."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_data_overrides(batch_size=2):
    """From scratch (tests do not depend on output/pretrained; a QAT test names its FP32
    checkpoint after these overrides), 128 px images, no data-loading workers."""
    return [
        'train.init_checkpoint=""',
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        f"dataloader.train.total_batch_size={batch_size}",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]


def tiny_overrides(batch_size=2):
    """:func:`tiny_data_overrides` and an FPN width of 32."""
    return tiny_data_overrides(batch_size) + ["model.backbone.out_channels=32"]


def tiny_training(cfg, output_dir, **train):
    """``cfg`` (a loaded config, its model already made small) with :func:`tiny_data_overrides`
    on the ``digits_tiny_*`` datasets of the ``tiny_digits`` fixture, in float32, writing to
    ``output_dir``, no evaluation or checkpoint before the end unless ``train`` says so."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.apply_overrides(cfg, tiny_data_overrides())
    cfg.dataloader.train.dataset.names = "digits_tiny_train"
    cfg.dataloader.test.dataset.names = "digits_tiny_val"
    cfg.train.update({"eval_period": 0, **train, "output_dir": str(output_dir)})
    cfg.train.checkpointer.period = 1000
    cfg.train.amp.enabled = False
    return cfg


def fp32_then_qat(fp32_cfg, qat_cfg, tmp_path):
    """Train the tiny ``fp32_cfg`` (4 iterations) to ``tmp_path/fp32``, then the tiny quantized
    ``qat_cfg`` from it (calibration on 4 images, 3 iterations, every score kept, evaluated at the
    end) to ``tmp_path/qat``: both through ``hqod.engine.do_train``, as train_net runs them.
    Returns the QAT model, its results and its metrics.json text."""
    import torch

    from hqod.engine import build_model, do_train

    torch.manual_seed(0)
    fp32_cfg = tiny_training(fp32_cfg, tmp_path / "fp32", max_iter=4)
    do_train(fp32_cfg, build_model(fp32_cfg))
    qat_cfg = tiny_training(qat_cfg, tmp_path / "qat", max_iter=3, eval_period=3,
                            init_checkpoint=str(tmp_path / "fp32" / "model_final.pth"))
    qat_cfg.quant.calib_images = 4
    qat_cfg.model.test_score_thresh = 0.0
    model = build_model(qat_cfg)
    results = do_train(qat_cfg, model)  # loads the FP32 detector, calibrates, trains, evaluates
    return model, results, (tmp_path / "qat" / "metrics.json").read_text()


def sgd_totals(model, batch, *, steps, lr, normalized=True):
    """The summed losses of ``steps`` SGD steps (momentum 0.9) of ``model`` on one ``batch``;
    ``normalized=False`` multiplies each by the model's ``loss_normalizer`` (the raw sums)."""
    import torch
    from detectron2.utils.events import EventStorage

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    totals = []
    model.train()
    with EventStorage():
        for _ in range(steps):
            losses = model(batch)
            total = sum(losses.values())
            totals.append(total.item() * (1.0 if normalized else model.loss_normalizer))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    return totals, losses


def calibrate_random_model(model, quant, size=96):
    """``model`` (random weights) with BN statistics from two float forwards on synthetic batches
    of ``size`` px, then quantized with ``quant`` (a ``quant`` node as a dict; None: FP32) and
    calibrated on two images; in eval mode."""
    import torch
    from detectron2.utils.events import EventStorage

    from hqod.quantization import calibrate, quantize_model

    model.train()
    with torch.no_grad(), EventStorage():
        for batch in synthetic_batches(2, seed=1, size=size):
            model(batch)
    if quant is not None:
        quantize_model(model, quant)
        calibrate(model, synthetic_batches(1, seed=2, size=size), num_images=2)
    return model.eval()


def tiny_config(config, batch_size=4):
    """``config`` (a path under the repository root) with :func:`tiny_overrides`, on the
    ``digits_tiny_*`` datasets of the ``tiny_digits`` fixture."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, config)), tiny_overrides(batch_size))
    cfg.dataloader.train.dataset.names = "digits_tiny_train"
    cfg.dataloader.test.dataset.names = "digits_tiny_val"
    return cfg


def synthetic_batches(n, size=96, seed=0, per_batch=2):
    """``n`` detectron2 batches of random images with one box each."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        inst = Instances((size, size), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]])),
                         gt_classes=torch.tensor([1]))
        yield [
            {"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst, "height": size, "width": size}
            for _ in range(per_batch)
        ]


def calibrated_detector(config, quant=None):
    """The detector of ``config`` (3 classes, FPN width 32, every score kept), through
    :func:`calibrate_random_model`."""
    import torch
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    cfg.model.test_score_thresh = 0.0
    return calibrate_random_model(instantiate(cfg.model), quant)
