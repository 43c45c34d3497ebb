"""
MobileNetV2 (Sandler et al., CVPR 2018) as a detectron2 :class:`Backbone`, and SSD-lite's extra
levels on top of it (:class:`SSDLiteNeck`), the backbone of the SSD-lite detector of HQOD's
Table II (../shared/notes/lightweight-detectors.md).

Every conv is a detectron2 :class:`~detectron2.layers.Conv2d` holding its BN and ReLU6, so that
the quantization package converts them as it converts ResNet's (depthwise convs included: the
quantized conv keeps ``groups``).
"""
from typing import Dict, List, Sequence

from torch import Tensor, nn

from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.backbone import Backbone

__all__ = ["InvertedResidual", "MobileNetV2", "SSDLiteNeck", "conv_bn_relu6"]


def conv_bn_relu6(in_channels, out_channels, kernel_size=1, stride=1, *, groups=1, norm="BN", activation=True):
    """A bias-free conv with its BN and (unless ``activation=False``) ReLU6."""
    return Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups,
        bias=False, norm=get_norm(norm, out_channels), activation=nn.ReLU6() if activation else None,
    )


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNetV2's channel rounding: the nearest multiple of ``divisor``, never more than 10 %
    below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2's block (its Fig. 2d): 1x1 expansion (skipped at ratio 1), 3x3 depthwise conv,
    linear 1x1 projection; the input added back when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, expand_ratio: int, norm="BN"):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = [conv_bn_relu6(in_channels, hidden, norm=norm)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden, norm=norm),
            conv_bn_relu6(hidden, out_channels, norm=norm, activation=False),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(Backbone):
    """
    MobileNetV2: the stem (3x3 conv, stride 2), seven stages ``layer1`` .. ``layer7`` of
    inverted residual blocks (the paper's Table 2) and ``conv_last`` (1x1 to 1280 channels).
    SSD-lite reads ``layer5`` (96 channels, stride 16) and ``conv_last`` (1280, stride 32).
    """

    # (expansion t, output channels c, blocks n, stride of the first block s): Table 2
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, *, out_features: Sequence[str] = ("layer5", "conv_last"), width_mult: float = 1.0, norm="BN", in_channels: int = 3):
        """
        Args:
            out_features: among ``stem``, ``layer1`` .. ``layer7``, ``conv_last``.
            width_mult: the paper's width multiplier (channels rounded to multiples of 8;
                ``conv_last`` keeps 1280 below 1.0).
            norm: detectron2 norm name of every conv's norm.
        """
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        self.stem = conv_bn_relu6(in_channels, channels, 3, 2, norm=norm)
        self._out_feature_channels = {"stem": channels}
        self._out_feature_strides = {"stem": 2}
        self.stage_names = []
        stride = 2
        for i, (t, c, n, s) in enumerate(self.STAGES, start=1):
            out = _make_divisible(c * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(channels, out, stride=s if j == 0 else 1, expand_ratio=t, norm=norm))
                channels = out
            stride *= s
            name = f"layer{i}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._out_feature_channels[name], self._out_feature_strides[name] = channels, stride
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.conv_last = conv_bn_relu6(channels, last, norm=norm)
        self._out_feature_channels["conv_last"], self._out_feature_strides["conv_last"] = last, stride
        unknown = [f for f in out_features if f not in self._out_feature_channels]
        if unknown:
            raise ValueError(f"MobileNetV2: unknown out_features {unknown}; choose among {list(self._out_feature_channels)}.")
        self._out_features = list(out_features)
        self._layers = ["stem"] + self.stage_names + ["conv_last"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x) -> Dict[str, Tensor]:
        outputs = {}
        for name in self._layers:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


class SSDLiteNeck(Backbone):
    """
    SSD-lite's feature pyramid: the bottom-up network's ``in_features`` followed by extra levels,
    each a 1x1 conv to half its width then a depthwise-separable 3x3 stride-2 conv (depthwise
    conv, then 1x1 conv to its width), BN and ReLU6 everywhere (MobileNetV2 paper, Sec. 6.2).
    Outputs ``in_features`` and ``extra1`` .. ``extraN``, in order of stride.
    """

    def __init__(self, *, bottom_up: Backbone, in_features: List[str], extra_channels: Sequence[int] = (512, 256, 256, 128), norm="BN"):
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        shapes = bottom_up.output_shape()
        self._out_feature_channels = {f: shapes[f].channels for f in self.in_features}
        self._out_feature_strides = {f: shapes[f].stride for f in self.in_features}
        channels, stride = shapes[self.in_features[-1]].channels, shapes[self.in_features[-1]].stride
        self.extras = nn.ModuleList()
        for i, out in enumerate(extra_channels, start=1):
            mid = out // 2
            self.extras.append(nn.Sequential(
                conv_bn_relu6(channels, mid, norm=norm),
                conv_bn_relu6(mid, mid, 3, 2, groups=mid, norm=norm),
                conv_bn_relu6(mid, out, norm=norm),
            ))
            channels, stride = out, stride * 2
            self._out_feature_channels[f"extra{i}"], self._out_feature_strides[f"extra{i}"] = channels, stride
        self._out_features = list(self._out_feature_channels)

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        outputs = {f: bottom_up[f] for f in self.in_features}
        x = outputs[self.in_features[-1]]
        for i, extra in enumerate(self.extras, start=1):
            x = extra(x)
            outputs[f"extra{i}"] = x
        return outputs
