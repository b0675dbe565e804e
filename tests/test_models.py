"""Backbones and heads: output widths, the CIFAR stem, parameter counts."""

import pytest
import torch

from contrastlab.models import build_backbone, build_head


@pytest.mark.parametrize(
    "name, dim",
    [
        ("convnet", 128),
        ("cifar_resnet18", 512),
        ("cifar_resnet34", 512),
        ("cifar_resnet50", 2048),
        ("resnet18", 512),
        ("resnet34", 512),
        ("resnet50", 2048),
    ],
)
def test_backbone_output_width(name, dim):
    net, out = build_backbone(name, width=32)
    assert out == dim
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, dim)


def test_cifar_stem_keeps_resolution():
    cifar, _ = build_backbone("cifar_resnet18")
    imagenet, _ = build_backbone("resnet18")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7)
    # the CIFAR stem keeps 32x32 through the first stage; the ImageNet stem divides it by 4
    x = torch.zeros(1, 3, 32, 32)
    assert cifar.layer1(cifar.relu(cifar.bn1(cifar.conv1(x)))).shape[-1] == 32
    assert (
        imagenet.layer1(imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(x))))).shape[-1]
        == 8
    )
    n = sum(p.numel() for p in cifar.parameters())
    assert 11.0e6 < n < 11.3e6  # ResNet-18 without its fc layer


def test_unknown_backbone_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="cifar_resnet18"):
        build_backbone("vit_b16")


@pytest.mark.parametrize(
    "kind, layers, bn, n_linear",
    [("mlp", 2, True, 2), ("mlp", 3, False, 3), ("linear", 2, True, 1)],
)
def test_heads(kind, layers, bn, n_linear):
    head, out = build_head(kind, 64, 32, 16, layers, bn)
    assert out == 16
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == n_linear
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == (bn and n_linear > 1)
    assert head(torch.randn(4, 64)).shape == (4, 16)
    ident, dim = build_head("none", 64, 32, 16, 2, True)
    assert dim == 64 and isinstance(ident, torch.nn.Identity)
