"""Batched image augmentation on the device, with per-sample random parameters.

Every function takes a float batch (B, 1, H, W) in [0, 1] on any device and a
``torch.Generator`` on that device, and draws one set of parameters *per image*
(torchvision's v2 transforms draw one per batch, which makes SimCLR's two views
nearly identical). No PIL, no per-sample Python: the whole batch is a handful of
tensor ops, so it runs at tens of thousands of images/s on a CPU and far more on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolkit.config import AugmentConfig


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _bernoulli(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def random_affine_grid(n: int, size: tuple[int, int], cfg: AugmentConfig, g: torch.Generator, device) -> torch.Tensor:
    """Sampling grid (n, size, size, 2) of a per-image affine map: rotation, shear, zoom, translation.

    Zoom > 1 magnifies (crop-and-resize); the grid maps output pixels to input
    coordinates in [-1, 1], so the matrix below is the inverse transform.
    """
    s = cfg.strength
    rot = _uniform(n, -1, 1, g, device) * math.radians(cfg.rotate_deg * s)
    shear = _uniform(n, -1, 1, g, device) * math.radians(cfg.shear_deg * s)
    lo = 1 + (cfg.scale_min - 1) * s
    hi = 1 + (cfg.scale_max - 1) * s
    # log-uniform zoom so that 0.8 and 1.25 are equally likely
    zoom = torch.exp(_uniform(n, math.log(lo), math.log(hi), g, device))
    shift = _uniform(2 * n, -1, 1, g, device).view(n, 2) * (2 * cfg.translate * s)
    cos, sin = torch.cos(rot), torch.sin(rot)
    tan = torch.tan(shear)
    # inverse of (rotate @ shear) scaled by 1/zoom: output -> input coordinates
    a = torch.stack([cos, -sin + cos * tan, sin, cos + sin * tan], dim=1).view(n, 2, 2) / zoom.view(n, 1, 1)
    theta = torch.cat([a, shift.view(n, 2, 1)], dim=2)
    return F.affine_grid(theta, (n, 1, *size), align_corners=False)


def random_elastic_offsets(n: int, size: tuple[int, int], alpha_px: float, prob: float, g: torch.Generator, device) -> torch.Tensor:
    """Smooth random displacement field (n, size, size, 2) in grid units, zero for images not drawn.

    A coarse 4x4 field of random offsets upsampled bicubically is a cheap stand-in for
    Simard et al.'s Gaussian-smoothed field: both give locally coherent warps.
    """
    coarse = torch.randn(n, 2, 4, 4, generator=g, device=device)
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    on = _bernoulli(n, prob, g, device).float().view(n, 1, 1, 1)
    # pixels -> grid units ([-1, 1] spans the side in pixels): x offsets by width, y by height
    scale = torch.tensor([2.0 * alpha_px / size[1], 2.0 * alpha_px / size[0]], device=device).view(1, 2, 1, 1)
    return (field * on * scale).permute(0, 2, 3, 1)


def random_blur(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur (3x3, sigma drawn in [0.5, 1.0]) on a random subset of images."""
    n, c, h, w = x.shape
    sigma = _uniform(n, 0.5, 1.0, g, x.device).view(n, 1, 1)
    r = torch.arange(-1, 2, device=x.device, dtype=x.dtype).view(1, 3, 1)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))  # (n, 3, 1)
    k1 = k1 / k1.sum(1, keepdim=True)
    kernels = (k1 @ k1.transpose(1, 2)).unsqueeze(1)  # (n, 1, 3, 3): one kernel per image
    # every (image, channel) plane is a group of its own: (1, n*c, h, w) with each image's kernel c times
    planes = x.reshape(1, n * c, h, w)
    blurred = F.conv2d(planes, kernels.repeat_interleave(c, 0), padding=1, groups=n * c).view(n, c, h, w)
    on = _bernoulli(n, prob, g, x.device).view(n, 1, 1, 1)
    return torch.where(on, blurred, x)


def random_erase(x: torch.Tensor, prob: float, g: torch.Generator, max_frac: float = 0.4) -> torch.Tensor:
    """Zero one random rectangle (side up to ``max_frac`` of the image) in a random subset of images."""
    n, _, h, w = x.shape
    dev = x.device
    eh = (_uniform(n, 0.1, max_frac, g, dev) * h).ceil()
    ew = (_uniform(n, 0.1, max_frac, g, dev) * w).ceil()
    top = (_uniform(n, 0, 1, g, dev) * (h - eh + 1)).floor()
    left = (_uniform(n, 0, 1, g, dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
    )
    on = _bernoulli(n, prob, g, dev).view(n, 1, 1)
    return x.masked_fill((inside & on).unsqueeze(1), 0.0)


def random_hflip(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """Mirror a random subset of images left to right (only for data whose classes survive it)."""
    on = _bernoulli(x.shape[0], prob, g, x.device).view(-1, 1, 1, 1)
    return torch.where(on, x.flip(3), x)


def random_colour(x: torch.Tensor, jitter: float, gray_prob: float, g: torch.Generator) -> torch.Tensor:
    """SimCLR's colour distortion on (B, 3, H, W): brightness, contrast and saturation each scaled by a
    factor drawn in [1 - jitter, 1 + jitter] per image, then grayscale with probability ``gray_prob``."""
    n, dev = x.shape[0], x.device
    if jitter > 0:
        lo, hi = max(0.0, 1.0 - jitter), 1.0 + jitter
        x = x * _uniform(n, lo, hi, g, dev).view(n, 1, 1, 1)  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, lo, hi, g, dev).view(n, 1, 1, 1) + mean  # contrast
        gray = (x * _LUMA.to(dev, x.dtype)).sum(1, keepdim=True)
        x = (x - gray) * _uniform(n, lo, hi, g, dev).view(n, 1, 1, 1) + gray  # saturation
        x = x.clamp(0.0, 1.0)
    if gray_prob > 0:
        gray = (x * _LUMA.to(dev, x.dtype)).sum(1, keepdim=True).expand_as(x)
        x = torch.where(_bernoulli(n, gray_prob, g, dev).view(n, 1, 1, 1), gray, x)
    return x


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as Pillow's convert("L")


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch: (B, C, H, W) float in [0, 1] -> same shape, new random draw per image.

    Colour distortion runs on colour batches only and flips only when ``hflip_prob`` > 0, so a
    grayscale batch draws exactly the random numbers it always did."""
    if cfg.strength == 0:
        return x
    n, c, h, w = x.shape
    if cfg.hflip_prob > 0:
        x = random_hflip(x, cfg.hflip_prob, g)
    if c == 3 and (cfg.colour_jitter > 0 or cfg.grayscale_prob > 0):
        x = random_colour(x, cfg.colour_jitter * min(cfg.strength, 1.0), cfg.grayscale_prob, g)
    grid = random_affine_grid(n, (h, w), cfg, g, x.device)
    if cfg.elastic_alpha > 0 and cfg.elastic_prob > 0:
        grid = grid + random_elastic_offsets(n, (h, w), cfg.elastic_alpha * cfg.strength, cfg.elastic_prob, g, x.device)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.blur_prob > 0:
        out = random_blur(out, cfg.blur_prob, g)
    if cfg.erase_prob > 0:
        out = random_erase(out, cfg.erase_prob * min(cfg.strength, 1.0), g)
    if cfg.noise_std > 0:
        out = out + torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype) * (cfg.noise_std * cfg.strength)
    return out.clamp_(0.0, 1.0)


def two_views(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's two independent views of the same batch."""
    return augment(x, cfg, g), augment(x, cfg, g)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
