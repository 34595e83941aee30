# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Plain-PyTorch references for the recis ops, written for clarity, not speed."""

import math
from typing import List, Optional, Sequence, Tuple

import torch


def reference_pooled(
    weights: Sequence[torch.Tensor],
    rows: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
    out_dim: int,
) -> torch.Tensor:
    """``pooled_forward`` over dense per-table matrices indexed by row (differentiable)."""
    num_features = len(feature_table)
    batch = (offsets.numel() - 1) // num_features
    lengths = offsets[1:] - offsets[:-1]
    out = torch.zeros(batch, out_dim, dtype=torch.float32)
    for f in range(num_features):
        t = feature_table[f]
        if t < 0:
            continue
        w = weights[t]
        s, e = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
        bag_lengths = lengths[f * batch : (f + 1) * batch]
        bag = torch.repeat_interleave(torch.arange(batch), bag_lengths)
        contrib = w[rows[s:e]]
        if per_sample_weights is not None:
            contrib = contrib * per_sample_weights[s:e, None]
        pooled = torch.zeros(batch, w.shape[1], dtype=torch.float32).index_add(0, bag, contrib)
        if feature_mode[f] == 1:
            pooled = pooled / bag_lengths.clamp(min=1)[:, None].to(torch.float32)
        col = feature_col[f]
        out = out + torch.nn.functional.pad(pooled, (col, out_dim - col - pooled.shape[1]))
    return out


def reference_pooled_backward(
    weights: Sequence[torch.Tensor],
    grad_output: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per table: the unique rows that got a gradient and their gradient, by autograd."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    out = reference_pooled(
        leaves, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, grad_output.shape[1]
    )
    out.backward(grad_output)
    unique_rows, grads = [], []
    for t, leaf in enumerate(leaves):
        touched = []
        for f, ft in enumerate(feature_table):
            if ft == t:
                batch = (offsets.numel() - 1) // len(feature_table)
                touched.append(rows[int(offsets[f * batch]) : int(offsets[(f + 1) * batch])])
        u = torch.unique(torch.cat(touched)) if touched else torch.empty(0, dtype=torch.int64)
        u = u[u >= 0]
        unique_rows.append(u)
        g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        grads.append(g[u])
    return unique_rows, grads


def reference_rowwise_adagrad_rows(
    w: torch.Tensor, m: torch.Tensor, g: torch.Tensor, lr: float, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM EXACT_ROWWISE_ADAGRAD on rows w (n, D) with state m (n,) and gradient g."""
    m_new = m + (g * g).mean(dim=1)
    w_new = w - (lr / (m_new.sqrt() + eps))[:, None] * g
    return w_new, m_new


def reference_adam_rows(
    w: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lazy Adam (torch.optim.SparseAdam's formula) on touched rows; with
    ``decoupled``, AdamW's decay ``w *= 1 - lr * wd`` first; otherwise L2."""
    if decoupled:
        w = w * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * w
    m = m + (g - m) * (1 - beta1)
    v = v + (g * g - v) * (1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    w = w - step_size * (m / (v.sqrt() + eps))
    return w, m, v
