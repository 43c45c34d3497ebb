"""
How much of each quantizer's integer grid a quantized detector uses (``tools/analyze_grids.py``).
A b-bit grid has ``2^b`` levels; a tensor whose values never come near some of them pays the
rounding error of a coarser grid. Per per-tensor quantizer, over the images it sees: the levels
used, the levels the observed range ``[min, max]`` can reach (those from the level ``min`` rounds
to up to the level ``max`` rounds to, after clipping), the shares of values clipped below the
lowest and above the highest level, and the share of negative values.

The case it was written for: YOLOX-tiny's activations are SiLU outputs (>= -0.278), quantized on
signed grids as the HQOD authors' setting asks (signed wherever no ReLU precedes). With steps of
0.3-1.4 the negative half of a 4-bit grid (-8 .. -1 steps) lies below that minimum: about 8 of the
16 levels are reachable, though half of the values are negative (BENCHMARKS.md, issue 18).
"""
from typing import Dict, Iterable, List

import torch
from torch import Tensor, nn

from hqod.quantization import IntegerGrid
from hqod.quantization.quantizers import Quantizer

__all__ = ["grid_occupancy", "occupancy_table"]


def _unclipped_level(grid: IntegerGrid, x: Tensor) -> Tensor:
    """The level each value of ``x`` rounds to before clipping: ``round(x / step + offset)``
    (:class:`~hqod.quantization.IntegerGrid`)."""
    return torch.round(x / grid.step + grid.offset2 / 2)


class _Tally:
    """Counts per level of one quantizer's grid, accumulated over its calls."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer
        self.counts = None
        self.clipped_low = self.clipped_high = self.negative = self.total = 0
        self.min, self.max = float("inf"), float("-inf")
        self.kind = None

    def __call__(self, module, inputs, output):
        if not module.fake_quant_enabled or not module.is_initialized:
            return
        grid = module.integer_grid()
        self.kind = "weights" if isinstance(inputs[0], nn.Parameter) else "activations"
        x = inputs[0].detach().double()
        unclipped = _unclipped_level(grid, x)
        eta = unclipped.clamp(grid.eta_min, grid.eta_max).long() - grid.eta_min
        levels = grid.eta_max - grid.eta_min + 1
        counts = torch.bincount(eta.flatten(), minlength=levels)
        self.counts = counts if self.counts is None else self.counts + counts
        self.clipped_low += int((unclipped < grid.eta_min).sum())
        self.clipped_high += int((unclipped > grid.eta_max).sum())
        self.negative += int((x < 0).sum())
        self.total += x.numel()
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def summary(self) -> dict:
        grid = self.quantizer.integer_grid()
        reach = _unclipped_level(grid, torch.tensor([self.min, self.max], dtype=torch.float64))
        low, high = reach.clamp(grid.eta_min, grid.eta_max).long().tolist()
        return dict(
            kind=self.kind,
            bits=self.quantizer.bits,
            signed=self.quantizer.signed,
            step=float(grid.step),
            levels=len(self.counts),
            used=int((self.counts > 0).sum()),
            reachable=high - low + 1,
            clipped_low=self.clipped_low / self.total,
            clipped_high=self.clipped_high / self.total,
            negative=self.negative / self.total,
            min=self.min,
            max=self.max,
        )


def grid_occupancy(model: nn.Module, batches: Iterable[List[dict]]) -> Dict[str, dict]:
    """Run ``model`` (put in eval mode by the caller) over ``batches`` and return, per
    per-tensor quantizer that quantized something, in the model's order: ``kind`` ("weights"
    when its input is a parameter, else "activations"), ``bits``, ``signed``,
    ``step``, ``levels`` (2^b), ``used``, ``reachable`` (see the module docstring),
    ``clipped_low`` / ``clipped_high`` / ``negative`` (shares of its input values) and the
    input's ``min`` / ``max``. Per-channel (weight) quantizers are left out."""
    tallies = {
        name: _Tally(m) for name, m in model.named_modules() if isinstance(m, Quantizer) and not m.per_channel
    }
    handles = [tallies[name].quantizer.register_forward_hook(tally) for name, tally in tallies.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: t.summary() for name, t in tallies.items() if t.total}


def occupancy_table(occupancy: Dict[str, dict]) -> str:
    """A markdown table of :func:`grid_occupancy`, one row per quantizer, then one per kind and
    bit width (the means over those quantizers)."""
    lines = [
        "| quantizer | bits | signed | step | levels used | levels reachable | clipped low | clipped high | negative |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, o in occupancy.items():
        lines.append(
            f"| {name} | {o['bits']} | {'yes' if o['signed'] else 'no'} | {o['step']:.4g} | {o['used']} / {o['levels']} "
            f"| {o['reachable']} / {o['levels']} | {100 * o['clipped_low']:.1f} % | {100 * o['clipped_high']:.1f} % "
            f"| {100 * o['negative']:.1f} % |"
        )
    for kind, bits in sorted({(o["kind"], o["bits"]) for o in occupancy.values()}):
        rows = [o for o in occupancy.values() if (o["kind"], o["bits"]) == (kind, bits)]
        mean = lambda key: sum(o[key] for o in rows) / len(rows)  # noqa: E731
        lines.append(
            f"| mean of {len(rows)} ({kind}) | {bits} | | | {mean('used'):.1f} / {2 ** bits} | {mean('reachable'):.1f} / {2 ** bits} "
            f"| {100 * mean('clipped_low'):.1f} % | {100 * mean('clipped_high'):.1f} % | {100 * mean('negative'):.1f} % |"
        )
    return "\n".join(lines)
