"""Contrastive losses. Pure tensor maths; the only distributed call is the gather."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.maths.distributed import gather_with_grad, rank, world_size

__all__ = ["nt_xent_loss"]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, eq. 1) for two views of a batch.

    Shapes: ``z1``, ``z2``: (n, d), the projections of two augmentations of the
    same n images on this rank; row i of ``z1`` and row i of ``z2`` form the
    positive pair. Returns a float32 scalar (float64 if the inputs are float64).

    With the 2N embeddings of the global batch, s(u, v) = u.v / (|u| |v|) and
    temperature t, each anchor i with positive j(i) contributes

        l(i) = -log( exp(s_i,j(i) / t) / sum_{k != i} exp(s_i,k / t) )

    where k runs over all 2N embeddings except i itself (the positive is in the
    denominator). The loss is the mean of l(i) over the anchors.

    Distributed: with ``gather=True`` and a process group of W ranks (equal n per
    rank, N = W * n), every rank's 2n anchors are contrasted against all 2N
    embeddings gathered with gradients, and the mean is over this rank's 2n
    anchors. DDP's gradient averaging then makes the update equal to the
    single-process loss on the global batch. With ``gather=False``, or without a
    process group, negatives come from the local batch only (N = n).
    """
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both have shape (n, d) and match; got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n == 0:
        raise ValueError("nt_xent_loss needs at least one pair; got an empty batch")

    # Work in at least float32: under bf16 autocast the logits exp(s/t) lose
    # most of their precision and the softmax over 2N candidates is badly off.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    local = F.normalize(torch.cat([z1, z2], dim=0).to(dtype), dim=1)  # (2n, d)

    # Candidate layout: ranks in order, each contributing [its z1 ; its z2],
    # i.e. rank r's rows live at [r*2n, (r+1)*2n). One gather moves both views.
    if gather and world_size() > 1:
        candidates = gather_with_grad(local)  # (W * 2n, d)
        offset = rank() * 2 * n
    else:
        candidates = local
        offset = 0

    # Anchors are the local rows; their gradient flows directly, and the
    # gathered copy carries the other ranks' contributions back (see maths/distributed.py).
    logits = local @ candidates.T / temperature  # (2n, 2N)

    idx = torch.arange(2 * n, device=local.device)
    self_col = offset + idx
    # Anchor i in z1 pairs with row i of z2 (n rows further on), and vice versa.
    positive_col = offset + (idx + n) % (2 * n)

    # Drop k == i from the denominator. -inf gives exp() = 0 and zero gradient;
    # every row still has its positive, so no row is all -inf.
    logits = logits.index_put((idx, self_col), torch.tensor(-math.inf, dtype=dtype, device=local.device))
    return F.cross_entropy(logits, positive_col)
