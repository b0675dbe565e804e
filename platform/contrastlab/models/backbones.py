"""Backbones: CIFAR-stem ResNets, torchvision ResNets and a small convnet for fast tests.

Every backbone maps ``[B, C, H, W]`` images (``C = in_channels``, 3 unless asked otherwise) to
``[B, F]`` pooled features; ``build_backbone`` returns it together with ``F``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# Feature width of the torchvision ResNets after global pooling.
_RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


# Block type and blocks per stage of each torchvision ResNet.
_RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
}


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, round(channels * width_mult))


class _WidthResNet(torchvision.models.ResNet):
    """torchvision's ResNet whose four stages are ``width_mult`` times as wide.

    The 64-channel stem is kept, as in CMC's half-width ResNets (``is_half``); with
    ``width_mult=1`` this is exactly ``torchvision.models.resnet{18,34,50}(weights=None)``.
    """

    def __init__(self, arch: str, width_mult: float) -> None:
        self.width_mult = width_mult  # read by _make_layer, which super().__init__ calls
        block, layers = _RESNET_LAYOUTS[arch]
        super().__init__(block, layers)  # type: ignore[arg-type]

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
        return super()._make_layer(block, _scaled(planes, self.width_mult), blocks, stride, dilate)


def _torchvision_resnet(
    arch: str, cifar_stem: bool, in_channels: int = 3, width_mult: float = 1.0
) -> tuple[nn.Module, int]:
    net = _WidthResNet(arch, width_mult)
    if cifar_stem:
        # 32x32 inputs: a 7x7/2 conv and a max-pool would shrink the map to 8x8 before the
        # first block. SimCLR/MoCo CIFAR experiments use a 3x3/1 conv and no max-pool.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as tv
    net.fc = nn.Identity()
    expansion = _RESNET_DIMS[arch] // 512  # 4 for the Bottleneck of resnet50, else 1
    return net, _scaled(512, width_mult) * expansion


class ConvNet(nn.Module):
    """A small VGG-style convnet: 4 conv-BN-ReLU stages, global average pooling.

    Fast enough to train SSL on CPU in tests and on the built-in digits data.

    Args:
        width: channels of the first stage; stages use width x (1, 2, 4, 4).
        in_channels: input channels (3 for RGB; CMC's per-view encoders take 1 or 2).
    """

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:  # downsample between stages; the last stage is pooled globally
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_channels, H, W] -> [B, 4*width]
        return self.pool(self.features(x)).flatten(1)


def build_backbone(
    name: str, width: int = 32, in_channels: int = 3, width_mult: float = 1.0
) -> tuple[nn.Module, int]:
    """Build a backbone by config name; returns ``(module, feature_dim)``.

    Names: ``convnet``, ``cifar_resnet{18,34,50}`` (3x3 stem, no max-pool, for 32-96 px),
    ``resnet{18,34,50}`` (torchvision's ImageNet stem, random init: nothing is downloaded).

    Args:
        name: backbone name.
        width: base channel count of ``convnet``.
        in_channels: input channels of the first convolution (3 for RGB images).
        width_mult: channel multiplier (CMC's half-width encoders use 0.5): every stage of
            ``convnet``, the four stages of a ResNet (its 64-channel stem is kept).
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    if name == "convnet":
        net = ConvNet(_scaled(width, width_mult), in_channels)
        return net, net.out_dim
    if name.startswith("cifar_") and name[6:] in _RESNET_DIMS:
        return _torchvision_resnet(name[6:], True, in_channels, width_mult)
    if name in _RESNET_DIMS:
        return _torchvision_resnet(name, False, in_channels, width_mult)
    allowed = ["convnet"] + [f"cifar_{a}" for a in _RESNET_DIMS] + list(_RESNET_DIMS)
    raise ValueError(f"model.backbone: unknown backbone {name!r}; allowed: {allowed}")
