"""The small-image ResNet-18 encoder: shapes per stem and pool, torchvision's body at width 64,
weights-only state_dict and its round trip, gradients. CPU only, small widths where the width does not matter.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from toolkit.datasets.spec import MNIST_SPEC, ImageSpec
from toolkit.maths.resnet import ResNet18Encoder

RGB32 = ImageSpec(channels=3, image_size=32, num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
RGB96 = ImageSpec(channels=3, image_size=96, num_classes=10, mean=(0.45, 0.44, 0.41), std=(0.26, 0.26, 0.27))
SPECS = {"mnist28": MNIST_SPEC, "rgb32": RGB32, "rgb96": RGB96}


def _x(spec: ImageSpec, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *spec.input_shape(), generator=torch.Generator().manual_seed(seed))


def _params(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))


def _body_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Shapes of everything after conv1 that torchvision's resnet18 and the encoder share by name."""
    return {k: v.shape for k, v in module.state_dict().items() if k.startswith(("bn1.", "layer"))}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("name", list(SPECS))
def test_shapes(name, pool):
    spec = SPECS[name]
    enc = ResNet18Encoder(width=8, pool=pool, spec=spec)
    assert enc.feature_dim == 8 * 8 * pool * pool
    with torch.no_grad():
        out = enc(_x(spec))
    assert out.shape == (2, enc.feature_dim)
    assert torch.isfinite(out).all()


def test_full_width_shape_and_default_spec():
    enc = ResNet18Encoder()  # width 64, pool 1, MNIST
    assert enc.feature_dim == 512
    with torch.no_grad():
        assert enc.eval()(_x(MNIST_SPEC, n=1)).shape == (1, 512)


def test_stems():
    small, large = ResNet18Encoder(width=8, spec=RGB32), ResNet18Encoder(width=8, spec=RGB96)
    # CIFAR stem up to 64 px: 3x3 stride 1 and no max-pool, so layer1 sees the full 32x32
    assert (small.conv1.kernel_size, small.conv1.stride, small.conv1.in_channels) == ((3, 3), (1, 1), 3)
    assert isinstance(small.maxpool, nn.Identity)
    # torchvision's stem above 64 px
    assert (large.conv1.kernel_size, large.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(large.maxpool, nn.MaxPool2d)
    mnist = ResNet18Encoder(width=8)
    assert mnist.conv1.in_channels == 1
    assert not hasattr(mnist, "fc")  # features, not logits


@pytest.mark.parametrize("spec", [RGB32, RGB96], ids=["rgb32", "rgb96"])
def test_width64_body_is_torchvision_resnet18(spec):
    ours = ResNet18Encoder(width=64, spec=spec)
    ref = torchvision.models.resnet18(weights=None)
    assert _params(ours, skip=("conv1.",)) == _params(ref, skip=("conv1.", "fc."))
    # same modules under the same names, not just the same count
    assert _body_shapes(ours) == _body_shapes(ref)


def test_width_scales_every_stage():
    enc = ResNet18Encoder(width=16, spec=RGB32)
    assert [getattr(enc, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [16, 32, 64, 128]
    assert enc.bn1.num_features == 16


def test_standardisation_is_not_in_state_dict():
    enc = ResNet18Encoder(width=8, spec=RGB32)
    buffers = dict(enc.named_buffers())
    assert buffers["mean"].shape == buffers["std"].shape == (1, 3, 1, 1)
    torch.testing.assert_close(buffers["mean"].flatten(), torch.tensor(RGB32.mean))
    torch.testing.assert_close(buffers["std"].flatten(), torch.tensor(RGB32.std))
    assert not {"mean", "std"} & set(enc.state_dict())


def test_bad_spec_or_knobs_rejected():
    with pytest.raises(ValueError, match="channels"):
        ResNet18Encoder(width=8, spec=ImageSpec(channels=3, image_size=32, mean=(0.5,), std=(0.5,)))
    with pytest.raises(ValueError, match="positive"):
        ResNet18Encoder(width=0)


def test_state_dict_round_trip():
    a = ResNet18Encoder(width=8, pool=2, spec=RGB32)
    with torch.no_grad():
        a.train()(_x(RGB32, n=4, seed=1))  # move BatchNorm running stats off their defaults
    b = ResNet18Encoder(width=8, pool=2, spec=RGB32)
    b.load_state_dict(a.state_dict())
    x = _x(RGB32, n=3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=1e-5, atol=1e-6)


def test_gradients_flow():
    enc = ResNet18Encoder(width=8, spec=MNIST_SPEC)
    enc(_x(MNIST_SPEC)).sum().backward()
    assert enc.conv1.weight.grad is not None
    assert enc.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())
