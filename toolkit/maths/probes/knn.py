"""The kNN probe: cosine nearest neighbours on L2-normalised raw features, each neighbour voting
exp(sim / T) (InstDisc, Wu et al. 2018).

It fits nothing, so it measures the feature geometry itself; k comes from ``probe.knn_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit.config import ProbeConfig
from toolkit.maths.probes.features import _check_feats_labels


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = ProbeConfig.knn_k,  # the probe protocol's k lives in the config (probe.knn_k)
    temperature: float = 0.07,
    num_classes: int = 10,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Weighted cosine kNN (Wu et al. 2018): each of the k nearest neighbours votes exp(sim / T).

    Features are L2-normalised (not standardised). ``k`` is clipped to the number of training
    points. Queries are processed ``chunk_size`` at a time, so peak extra memory is about
    ``chunk_size x N_train`` floats (512 x 60,000 x 4 B = 123 MB). Returns (N_query,) int64
    predictions on the query features' device; ties go to the lowest class index.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if query_feats.ndim != 2 or query_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"query_feats must be 2-D with {train_feats.shape[1]} columns, got shape {tuple(query_feats.shape)}"
        )
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    votes = knn_votes(train_feats, F.one_hot(labels, num_classes).float(), query_feats, k, temperature, chunk_size)
    return votes.argmax(1).to(query_feats.device)


@torch.no_grad()
def knn_votes(bank_feats: torch.Tensor, bank_probs: torch.Tensor, query_feats: torch.Tensor, k: int,
              temperature: float = 0.07, chunk_size: int = 512) -> torch.Tensor:
    """(N_query, C) votes: each query's k nearest bank rows (cosine on L2-normalised features)
    add their (N_bank, C) class probabilities, weighted exp(sim / T) (up to one common factor).
    Not normalised.

    The kNN probe votes one-hot labels; the student's label smoothing votes soft labels with
    the pool as both bank and queries. ``k`` is clipped to the bank's size; on the bank's device.
    """
    k = min(k, bank_feats.shape[0])
    device = bank_feats.device
    bank = F.normalize(bank_feats.float(), dim=1)  # (N, D)
    probs = bank_probs.float().to(device)
    votes = torch.zeros(query_feats.shape[0], probs.shape[1], device=device)
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].to(device).float(), dim=1)  # (B, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
        # exp((sim - 1) / T): every weight divided by the same exp(1 / T), so a small T never overflows
        votes[start : start + chunk_size] = (((sim - 1.0) / temperature).exp().unsqueeze(-1) * probs[idx]).sum(1)
    return votes
