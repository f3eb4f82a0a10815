"""Models by name: CIFAR-style ResNets (3x3 stem) and torchvision's ImageNet models.

CIFAR ResNets follow He et al. (2016), section 4.2: a 3x3 convolution with 16 channels,
three stages of ``n`` basic blocks with 16, 32 and 64 channels, global average pooling
and a linear classifier; ResNet-(6n+2). Shortcuts that change shape use a 1x1
convolution with BatchNorm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
TORCHVISION_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "wide_resnet50_2", "vgg16_bn", "vgg19_bn", "vit_b_16", "vit_b_32",
    "densenet121", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, found {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        in_channels = width
        for stage, channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def model_names() -> list[str]:
    return sorted(CIFAR_DEPTHS) + sorted(TORCHVISION_MODELS)


def check_model_name(name: str) -> None:
    if name not in CIFAR_DEPTHS and name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")


def build_model(name: str, num_classes: int, image_size: int = 224,
                weights_path: Optional[str] = None) -> nn.Module:
    """Build model ``name`` with freshly initialized weights, or weights from a local file.

    ``weights_path`` names a state dict saved with ``torch.save``; a classifier whose shape
    does not match ``num_classes`` is left at its fresh initialization, so that ImageNet
    weights can start a fine-tuning run on another number of classes.
    """
    check_model_name(name)
    if name in CIFAR_DEPTHS:
        model: nn.Module = CifarResNet(CIFAR_DEPTHS[name], num_classes)
    elif name.startswith("vit_"):
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, image_size=image_size)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if weights_path:
        load_weights(model, weights_path)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model``; keys of mismatched shape are skipped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.weights_path not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise ValueError(f"{file} shares no tensor of matching name and shape with the model")
    model.load_state_dict(compatible, strict=False)


def model_factory(name: str, num_classes: int, image_size: int,
                  weights_path: Optional[str] = None) -> Callable[[], nn.Module]:
    """A zero-argument builder, as :class:`lookaround_dist.api.Lookaround` expects."""
    check_model_name(name)
    return lambda: build_model(name, num_classes, image_size, weights_path)
