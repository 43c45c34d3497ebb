"""
Grid occupancy (hqod.evaluation.grid_occupancy, tools/analyze_grids.py): levels used and
reachable, clipped and negative shares on hand-made inputs whose answers are in the test, the
table, and the tool on a small calibrated detector.
"""
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

from hqod.evaluation.grid_occupancy import grid_occupancy, occupancy_table
from hqod.quantization.quantizers import LQQuantizer, LSQQuantizer

from helpers import ROOT, calibrate_random_model, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")


class _Quantizes(nn.Module):
    """Quantizes its input with ``act`` and its weight with ``weight``."""

    def __init__(self, act, weight):
        super().__init__()
        self.act, self.weight_quant = act, weight
        self.weight = nn.Parameter(torch.tensor([-0.9, -0.1, 0.2, 0.6]))

    def forward(self, x):
        return self.act(x), self.weight_quant(self.weight)


def _with_param(quantizer, value):
    quantizer._param().data.fill_(value)
    quantizer.initialized.fill_(1)
    return quantizer.eval()


def test_lsq_signed_grid_and_lq_weights_by_hand():
    # LSQ, signed 4 bits, step 0.5: eta = clip(round(x / 0.5), -8, 7). Inputs over two calls:
    # -5.0 -> -10 (clipped low to -8), -0.2 -> round(-0.4) = 0, 0.3 -> 1, 1.1 -> 2, 2.6 -> 5, then
    # 5.0 -> 10 (clipped high to 7): levels used {-8, 0, 1, 2, 5, 7} = 6 of 16; the range
    # [-5, 5] reaches -8 .. 7 (16); 1/6 clipped at each end; 2 of 6 negative.
    act = _with_param(LSQQuantizer(bits=4, signed=True), 0.5)
    # LQ (AQD Eq. 3), signed 2 bits, nu = 1.5: step 2 nu / 3 = 1, eta = clip(round(w + 1.5), 0, 3)
    # (levels -1.5, -0.5, 0.5, 1.5); w = -0.9 -> round(0.6) = 1, -0.1 -> 1, 0.2 -> 2, 0.6 -> 2:
    # levels used {1, 2} = 2 of 4, reachable 1 .. 2 = 2, nothing clipped, half negative.
    weight = _with_param(LQQuantizer(bits=2, signed=True), 1.5)
    model = _Quantizes(act, weight)
    occupancy = grid_occupancy(model, [torch.tensor([-5.0, -0.2, 0.3, 1.1, 2.6]), torch.tensor([5.0])])

    assert list(occupancy) == ["act", "weight_quant"]
    a, w = occupancy["act"], occupancy["weight_quant"]
    assert (a["kind"], a["bits"], a["signed"], a["step"], a["levels"]) == ("activations", 4, True, 0.5, 16)
    assert (a["used"], a["reachable"], a["min"], a["max"]) == (6, 16, -5.0, 5.0)
    assert a["clipped_low"] == pytest.approx(1 / 6) and a["clipped_high"] == pytest.approx(1 / 6)
    assert a["negative"] == pytest.approx(2 / 6)
    assert (w["kind"], w["bits"], w["levels"], w["used"], w["reachable"]) == ("weights", 2, 4, 2, 2)
    assert w["step"] == pytest.approx(1.0) and w["negative"] == 0.5
    assert w["clipped_low"] == w["clipped_high"] == 0.0

    table = occupancy_table(occupancy).splitlines()
    assert table[2] == "| act | 4 | yes | 0.5 | 6 / 16 | 16 / 16 | 16.7 % | 16.7 % | 33.3 % |"
    assert table[3] == "| weight_quant | 2 | yes | 1 | 2 / 4 | 2 / 4 | 0.0 % | 0.0 % | 50.0 % |"
    assert table[4:] == [
        "| mean of 1 (activations) | 4 | | | 6.0 / 16 | 16.0 / 16 | 16.7 % | 16.7 % | 33.3 % |",
        "| mean of 1 (weights) | 2 | | | 2.0 / 4 | 2.0 / 4 | 0.0 % | 0.0 % | 50.0 % |",
    ]
    assert not act._forward_hooks and not weight._forward_hooks  # the hooks are removed


def test_a_silu_output_reaches_half_of_a_signed_grid():
    # SiLU >= -0.278: on a signed grid of step 0.5 no value rounds below level -1 (-0.278 / 0.5 =
    # -0.56) and the largest, silu(3.6) = 3.50, rounds to level 7: 9 of the 16 levels reachable.
    # Unsigned, step 0.2: 3.50 / 0.2 = 17.5 is clipped to 15, all 16 reachable, and every value
    # under half a step below zero (-0.1) is clipped to level 0.
    x = torch.nn.functional.silu(torch.linspace(-6, 3.6, 2000))
    signed = grid_occupancy(_Quantizes(_with_param(LSQQuantizer(bits=4, signed=True), 0.5), nn.Identity()), [x])
    assert (signed["act"]["reachable"], signed["act"]["used"], signed["act"]["clipped_low"]) == (9, 9, 0.0)
    unsigned = grid_occupancy(_Quantizes(_with_param(LSQQuantizer(bits=4, signed=False), 0.2), nn.Identity()), [x])
    assert unsigned["act"]["reachable"] == 16
    assert unsigned["act"]["clipped_low"] == pytest.approx(float((x < -0.1).double().mean()))


def test_analyze_grids_tool(tiny_digits, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = LazyConfig.load(f"{ROOT}/configs/retina_r18_lsq_w4.py")
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    model = calibrate_random_model(instantiate(cfg.model), cfg.quant)
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    tool = load_tool("analyze_grids")
    opts = [
        "model.num_classes=3", "model.backbone.out_channels=32", "dataloader.test.dataset.names=digits_tiny_val",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128", "dataloader.test.num_workers=0",
    ]  # fmt: skip
    occupancy = tool.main(tool.parse_args(["--config-file", "configs/retina_r18_lsq_w4.py", "--checkpoint",
                                           str(checkpoint), "--images", "2", *opts]))  # fmt: skip
    out = capsys.readouterr().out
    # per tensor: every conv's input quantizer and weight quantizer (weights are per tensor here)
    kinds = {(o["kind"], o["bits"]) for o in occupancy.values()}
    assert kinds == {("activations", 4), ("activations", 8), ("weights", 4), ("weights", 8)}
    assert all(1 <= o["used"] <= o["reachable"] <= o["levels"] == 2 ** o["bits"] for o in occupancy.values())
    assert "| mean of " in out and "(activations) | 4 |" in out

    fp32 = tool.parse_args(["--config-file", "configs/retina_r18_fp32.py"])
    with pytest.raises(SystemExit) as e:
        tool.run_tool(tool.main, fp32)
    assert e.value.code == 2 and "is not a quantized config" in capsys.readouterr().err
