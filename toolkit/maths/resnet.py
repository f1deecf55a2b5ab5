"""A torchvision ResNet-18 adapted to small images, as a toolkit encoder (its 7x7 stride-2 stem + max-pool leaves 32 px images 8 px).

The adaptation is the one of the SimCLR paper's CIFAR-10 experiments: a 3x3 stride-1 first conv and no
stem max-pool for images of at most 64 px; above 64 px torchvision's 7x7 stride-2 conv and max-pool stay.
The classifier ``fc`` is dropped, and the last stage is average-pooled to ``pool x pool`` cells and
flattened, so the encoder gives features, not logits. Inputs arrive in [0, 1] and are standardised
inside with the spec's per-channel mean and std, like every toolkit encoder.

Bringing your own backbone: any ``nn.Module`` whose constructor takes
``(width: int, pool: int, spec: ImageSpec)`` (with defaults), which sets an int attribute
``feature_dim``, and whose ``forward`` maps floats ``(B, spec.channels, S, S)`` in [0, 1] to
``(B, feature_dim)``, can be registered by name in ``toolkit.maths.models.ENCODERS`` (a dict
name -> class) and used wherever this encoder is. Keep standardisation inside ``forward`` and keep
the statistics out of ``state_dict`` (non-persistent buffers), so checkpoints hold only weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from toolkit.datasets.spec import MNIST_SPEC, ImageSpec

# torchvision's stage widths are 64, 128, 256, 512; ``width`` replaces the 64 and the rest scale with it.
TORCHVISION_WIDTH = 64
# Up to this side the CIFAR stem is used; above it torchvision's ImageNet stem downsamples by 4 first.
SMALL_IMAGE_MAX = 64


def _init_like_torchvision(module: nn.Module) -> None:
    """The initialisation torchvision's ResNet gives its own layers, for the layers replaced here."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _stage(cin: int, planes: int, stride: int) -> nn.Sequential:
    """Two BasicBlocks as torchvision's ``ResNet._make_layer`` builds them.

    (B, cin, H, W) -> (B, planes, H/stride, W/stride).
    Built here because torchvision's ResNet only lets bottleneck blocks change width.
    """
    downsample = None
    if stride != 1 or cin != planes:
        # the shortcut must match the block's output shape: 1x1 conv with the block's stride
        downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(cin, planes, stride, downsample), BasicBlock(planes, planes))


class ResNet18Encoder(nn.Module):
    """(B, spec.channels, S, S) in [0, 1] -> features (B, feature_dim), feature_dim = 8 * width * pool**2.

    Shapes for S <= 64 (CIFAR stem), w = width: conv1 (B, w, S, S) -> layer1 (B, w, S, S)
    -> layer2 (B, 2w, S/2) -> layer3 (B, 4w, S/4) -> layer4 (B, 8w, S/8) -> pool (B, 8w, pool, pool);
    halvings round up (28 -> 14 -> 7 -> 4).
    Above 64 px the ImageNet stem first takes S to S/4 (e.g. 96 -> 24, and layer4 is 3x3).
    Module names follow torchvision's (conv1, bn1, layer1..layer4), so at width 64 the body's
    state_dict keys are torchvision's.
    """

    def __init__(self, width: int = 64, pool: int = 1, spec: ImageSpec = MNIST_SPEC):
        super().__init__()
        if width < 1 or pool < 1:
            raise ValueError(f"width and pool must be positive, got width={width}, pool={pool}")
        if not (len(spec.mean) == len(spec.std) == spec.channels):
            raise ValueError(f"spec has {spec.channels} channels but {len(spec.mean)} means and {len(spec.std)} stds")
        # fc is dropped below; num_classes only keeps the throwaway Linear small
        net = resnet18(weights=None, num_classes=spec.num_classes)

        if spec.image_size <= SMALL_IMAGE_MAX:
            # CIFAR stem: keep full resolution into layer1 (32 px stays 32 px, not 8 px)
            self.conv1 = nn.Conv2d(spec.channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            # ImageNet stem, only re-made for the input channels and width: (B, C, S, S) -> (B, w, S/2, S/2) -> /4
            self.conv1 = nn.Conv2d(spec.channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = net.maxpool
        _init_like_torchvision(self.conv1)
        self.relu = net.relu

        if width == TORCHVISION_WIDTH:
            # torchvision's own body, untouched
            self.bn1 = net.bn1
            self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        else:
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = _stage(width, width, 1)
            self.layer2 = _stage(width, 2 * width, 2)
            self.layer3 = _stage(2 * width, 4 * width, 2)
            self.layer4 = _stage(4 * width, 8 * width, 2)
            for m in (self.bn1, self.layer1, self.layer2, self.layer3, self.layer4):
                _init_like_torchvision(m)

        # pool > 1 keeps a coarse layout (pool x pool cells) instead of one global average
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.feature_dim = 8 * width * pool * pool

        # (1, C, 1, 1) so they broadcast over (B, C, S, S); non-persistent: state_dict holds only weights,
        # and the statistics always come from the spec the encoder was built with
        shape = (1, spec.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # (B, C, S, S)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, S, S), or (B, w, S/4, S/4) above 64 px
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, S/8, S/8)
        return self.pool(x).flatten(1)  # (B, 8w * pool * pool)
