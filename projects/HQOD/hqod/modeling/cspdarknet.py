"""
CSPDarknet and YOLOX's PAFPN (Ge et al., "YOLOX", 2021) as detectron2 :class:`Backbone` s, the
backbone of the YOLOX-tiny detector of HQOD's Table II (../shared/notes/lightweight-detectors.md):
a Focus stem, four stages of a stride-2 conv and a CSP layer (the last with SPP), and a
top-down then bottom-up path aggregation network.

Every conv is a detectron2 :class:`~detectron2.layers.Conv2d` holding its BN and SiLU, so that
the quantization package converts them as it converts ResNet's.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.backbone import Backbone

__all__ = ["CSPDarknet", "CSPLayer", "DarknetBottleneck", "Focus", "SPPBottleneck", "YOLOXPAFPN", "conv_bn_silu"]


def conv_bn_silu(in_channels, out_channels, kernel_size=1, stride=1, *, norm="BN"):
    """A bias-free conv with its BN and SiLU (YOLOX's ConvModule)."""
    return Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False,
        norm=get_norm(norm, out_channels), activation=nn.SiLU(),
    )


class Focus(nn.Module):
    """YOLOX's stem: each 2 x 2 pixel block to 4 channels (space to depth), then a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, norm="BN"):
        super().__init__()
        self.conv = conv_bn_silu(in_channels * 4, out_channels, 3, norm=norm)

    def forward(self, x):
        # top-left, bottom-left, top-right, bottom-right pixels of each 2 x 2 block
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.conv(x)


class DarknetBottleneck(nn.Module):
    """1x1 conv then 3x3 conv, the input added back when ``add_identity`` (and shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, *, add_identity: bool = True, norm="BN"):
        super().__init__()
        self.conv1 = conv_bn_silu(in_channels, out_channels, 1, norm=norm)
        self.conv2 = conv_bn_silu(out_channels, out_channels, 3, norm=norm)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return x + out if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross Stage Partial layer: ``final(cat(blocks(main(x)), short(x)))``, main and short 1x1
    convs to half the output width."""

    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int, add_identity: bool = True, norm="BN"):
        super().__init__()
        mid = out_channels // 2
        self.main_conv = conv_bn_silu(in_channels, mid, norm=norm)
        self.short_conv = conv_bn_silu(in_channels, mid, norm=norm)
        self.final_conv = conv_bn_silu(2 * mid, out_channels, norm=norm)
        self.blocks = nn.Sequential(*(DarknetBottleneck(mid, mid, add_identity=add_identity, norm=norm) for _ in range(num_blocks)))

    def forward(self, x):
        return self.final_conv(torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1x1 conv to half width, max-pools of each kernel size (stride 1),
    concatenated with their input, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_sizes: Sequence[int] = (5, 9, 13), norm="BN"):
        super().__init__()
        mid = in_channels // 2
        self.conv1 = conv_bn_silu(in_channels, mid, norm=norm)
        self.kernel_sizes = tuple(kernel_sizes)
        self.conv2 = conv_bn_silu(mid * (len(self.kernel_sizes) + 1), out_channels, norm=norm)

    def forward(self, x):
        x = self.conv1(x)
        pools = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.kernel_sizes]
        return self.conv2(torch.cat([x] + pools, dim=1))


class CSPDarknet(Backbone):
    """
    CSPDarknet (P5): ``stem`` (Focus, stride 2) and ``stage1`` .. ``stage4`` (strides 4 .. 32),
    each a 3x3 stride-2 conv, SPP in the last, and a CSP layer. ``deepen_factor`` and
    ``widen_factor`` scale the blocks and channels (YOLOX-tiny: 0.33 and 0.375 -> stage
    widths 48, 96, 192, 384, CSP blocks 1, 3, 3, 1).
    """

    # (input channels, output channels, CSP blocks, identity in the blocks, SPP) at factor 1
    STAGES = ((64, 128, 3, True, False), (128, 256, 9, True, False), (256, 512, 9, True, False), (512, 1024, 3, False, True))

    def __init__(self, *, deepen_factor: float = 0.33, widen_factor: float = 0.375, out_features: Sequence[str] = ("stage2", "stage3", "stage4"),
                 spp_kernel_sizes: Sequence[int] = (5, 9, 13), norm="BN", in_channels: int = 3):
        super().__init__()
        width = lambda c: int(c * widen_factor)  # noqa: E731
        self.stem = Focus(in_channels, width(64), norm=norm)
        self._out_feature_channels, self._out_feature_strides = {"stem": width(64)}, {"stem": 2}
        self.stage_names = []
        for i, (c_in, c_out, blocks, add_identity, spp) in enumerate(self.STAGES, start=1):
            layers = [conv_bn_silu(width(c_in), width(c_out), 3, 2, norm=norm)]
            if spp:
                layers.append(SPPBottleneck(width(c_out), width(c_out), kernel_sizes=spp_kernel_sizes, norm=norm))
            num_blocks = max(round(blocks * deepen_factor), 1)
            layers.append(CSPLayer(width(c_out), width(c_out), num_blocks=num_blocks, add_identity=add_identity, norm=norm))
            name = f"stage{i}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
            self._out_feature_channels[name], self._out_feature_strides[name] = width(c_out), 2 ** (i + 1)
        unknown = [f for f in out_features if f not in self._out_feature_channels]
        if unknown:
            raise ValueError(f"CSPDarknet: unknown out_features {unknown}; choose among {list(self._out_feature_channels)}.")
        self._out_features = list(out_features)

    def forward(self, x) -> Dict[str, Tensor]:
        outputs = {}
        for name in ["stem"] + self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


class YOLOXPAFPN(Backbone):
    """
    YOLOX's path aggregation network on the bottom-up network's ``in_features`` (strides 8, 16,
    32): top-down, each level's 1x1-reduced upper level upsampled (nearest) and concatenated
    with it into a CSP layer; bottom-up, each output downsampled (3x3 stride 2) and concatenated
    with the next top-down output into a CSP layer; a 1x1 conv per level to ``out_channels``.
    Outputs ``p3``, ``p4``, ``p5``.
    """

    def __init__(self, *, bottom_up: Backbone, in_features: List[str], out_channels: int, num_csp_blocks: int = 1, norm="BN"):
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        shapes = bottom_up.output_shape()
        channels = [shapes[f].channels for f in self.in_features]
        strides = [shapes[f].stride for f in self.in_features]
        levels = len(channels)
        csp = lambda c_in, c_out: CSPLayer(c_in, c_out, num_blocks=num_csp_blocks, add_identity=False, norm=norm)  # noqa: E731
        # top-down, from the top level: reduce the upper level to this one's width, then fuse
        self.reduce_layers = nn.ModuleList(conv_bn_silu(channels[i], channels[i - 1], norm=norm) for i in range(levels - 1, 0, -1))
        self.top_down_blocks = nn.ModuleList(csp(channels[i - 1] * 2, channels[i - 1]) for i in range(levels - 1, 0, -1))
        # bottom-up, from the bottom level
        self.downsamples = nn.ModuleList(conv_bn_silu(channels[i], channels[i], 3, 2, norm=norm) for i in range(levels - 1))
        self.bottom_up_blocks = nn.ModuleList(csp(channels[i] * 2, channels[i + 1]) for i in range(levels - 1))
        self.out_convs = nn.ModuleList(conv_bn_silu(c, out_channels, norm=norm) for c in channels)
        self._out_features = [f"p{s.bit_length() - 1}" for s in strides]
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._out_feature_strides = dict(zip(self._out_features, strides))

    @property
    def size_divisibility(self) -> int:
        return self._out_feature_strides[self._out_features[-1]]

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        inputs = [bottom_up[f] for f in self.in_features]
        top_down = [inputs[-1]]
        for k, i in enumerate(range(len(inputs) - 1, 0, -1)):
            upper = self.reduce_layers[k](top_down[0])
            top_down[0] = upper
            fused = self.top_down_blocks[k](torch.cat([F.interpolate(upper, scale_factor=2, mode="nearest"), inputs[i - 1]], dim=1))
            top_down.insert(0, fused)
        outs = [top_down[0]]
        for i in range(len(inputs) - 1):
            outs.append(self.bottom_up_blocks[i](torch.cat([self.downsamples[i](outs[-1]), top_down[i + 1]], dim=1)))
        return {name: conv(out) for name, conv, out in zip(self._out_features, self.out_convs, outs)}
