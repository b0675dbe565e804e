"""Backbones: CIFAR-stem ResNets, torchvision ResNets and a small convnet for fast tests.

Every backbone maps ``[B, 3, H, W]`` images to ``[B, F]`` pooled features; ``build_backbone``
returns it together with ``F``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# Feature width of the torchvision ResNets after global pooling.
_RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def _torchvision_resnet(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        # 32x32 inputs: a 7x7/2 conv and a max-pool would shrink the map to 8x8 before the
        # first block. SimCLR/MoCo CIFAR experiments use a 3x3/1 conv and no max-pool.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, _RESNET_DIMS[arch]


class ConvNet(nn.Module):
    """A small VGG-style convnet: 4 conv-BN-ReLU stages, global average pooling.

    Fast enough to train SSL on CPU in tests and on the built-in digits data.

    Args:
        width: channels of the first stage; stages use width x (1, 2, 4, 4).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
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
        # x: [B, 3, H, W] -> [B, 4*width]
        return self.pool(self.features(x)).flatten(1)


def build_backbone(name: str, width: int = 32) -> tuple[nn.Module, int]:
    """Build a backbone by config name; returns ``(module, feature_dim)``.

    Names: ``convnet``, ``cifar_resnet{18,34,50}`` (3x3 stem, no max-pool, for 32-96 px),
    ``resnet{18,34,50}`` (torchvision's ImageNet stem, random init: nothing is downloaded).
    """
    if name == "convnet":
        net = ConvNet(width)
        return net, net.out_dim
    if name.startswith("cifar_") and name[6:] in _RESNET_DIMS:
        return _torchvision_resnet(name[6:], cifar_stem=True)
    if name in _RESNET_DIMS:
        return _torchvision_resnet(name, cifar_stem=False)
    allowed = ["convnet"] + [f"cifar_{a}" for a in _RESNET_DIMS] + list(_RESNET_DIMS)
    raise ValueError(f"model.backbone: unknown backbone {name!r}; allowed: {allowed}")
