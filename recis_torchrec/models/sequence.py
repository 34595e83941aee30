# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Padded sequences from an ``EmbeddingCollection``'s jagged output, and the transformer ranker."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor


def padded_sequence(jt: JaggedTensor, max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values (B, L, D), mask (B, L))`` of each bag's last ``max_length`` embeddings, in order,
    left-aligned and zero-padded. Torch ops only (no FBGEMM op: it runs wherever the embeddings
    are) and no data-dependent Python branch (it traces with ``torch.fx``)."""
    values = jt.values()
    lengths = jt.lengths().to(torch.int64)
    b = lengths.shape[0]
    offsets = torch.cumsum(lengths, 0) - lengths
    kept = torch.clamp(lengths, max=max_length)
    start = offsets + (lengths - kept)
    pos = torch.arange(max_length, device=values.device)
    mask = pos.unsqueeze(0) < kept.unsqueeze(1)
    # Padding positions read one zero row appended after the values.
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    index = torch.where(mask, start.unsqueeze(1) + pos.unsqueeze(0), torch.full_like(mask, values.shape[0], dtype=torch.int64))
    return padded[index.reshape(-1)].reshape(b, max_length, values.shape[1]), mask


torch.fx.wrap("padded_sequence")


def mlp(sizes: Sequence[int], activation=nn.PReLU) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class SequenceRanker(nn.Module):
    """What the sequence rankers share: the tables (an EC for the target and its history, sharing
    one table; optionally an EBC for the other sparse features), the dense input, and the top MLP."""

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        target_feature: str,
        history_feature: str,
        max_length: int,
        dense_in_features: int,
        top_arch: Sequence[int],
        num_tasks: int,
        embedding_bag_collection: Optional[EmbeddingBagCollection] = None,
        bf16: bool = False,
    ) -> None:
        super().__init__()
        configs = {f: c for c in embedding_collection.embedding_configs() for f in c.feature_names}
        for f in (target_feature, history_feature):
            if f not in configs:
                raise ValueError(f"{type(self).__name__}: feature {f!r} is not in the EmbeddingCollection "
                                 f"(features {sorted(configs)})")
        if configs[target_feature].name != configs[history_feature].name:
            raise ValueError(
                f"{type(self).__name__}: the target {target_feature!r} and the history {history_feature!r} must share "
                f"one table (they use {configs[target_feature].name!r} and {configs[history_feature].name!r}): an "
                "attention compares their embeddings"
            )
        if max_length < 1:
            raise ValueError(f"{type(self).__name__}: max_length must be >= 1, got {max_length}")
        self.ec = embedding_collection
        self.ebc = embedding_bag_collection
        self.target_feature, self.history_feature = target_feature, history_feature
        self.max_length = max_length
        self.dim = configs[target_feature].embedding_dim
        self.bf16 = bf16
        self.num_dense = dense_in_features
        pooled = 0
        if embedding_bag_collection is not None:
            pooled = sum(c.embedding_dim * len(c.feature_names) for c in embedding_bag_collection.embedding_bag_configs())
        self._top_in = self.interest_dim() + self.dim + pooled + dense_in_features
        self.top = mlp([self._top_in, *top_arch, num_tasks])

    def interest_dim(self) -> int:
        return self.dim

    def interest(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        seq: Dict[str, JaggedTensor] = self.ec(sparse_features)
        target, _ = padded_sequence(seq[self.target_feature], 1)
        history, mask = padded_sequence(seq[self.history_feature], self.max_length)
        parts = [target.reshape(target.shape[0], self.dim)]
        if self.ebc is not None:
            parts.append(self.ebc(sparse_features).values())
        return _dense_part(self, history, mask, parts, dense_features)


def _dense_part(model: "SequenceRanker", history: torch.Tensor, mask: torch.Tensor, parts: List[torch.Tensor],
                dense: torch.Tensor) -> torch.Tensor:
    """The interest and the top MLP, under bf16 autocast on the inputs' device when ``model.bf16``
    (one leaf for ``torch.fx``: the autocast device is the tensors')."""
    with torch.autocast(device_type=dense.device.type, dtype=torch.bfloat16, enabled=model.bf16):
        user = model.interest(parts[0], history, mask)
        x = torch.cat([user.float(), *parts, dense.float()], dim=1)
        return model.top(x).float()


torch.fx.wrap("_dense_part")


class SequenceTransformer(SequenceRanker):
    """A transformer ranker: the user's last ``max_length`` behaviours and the target, as tokens
    with learned positions, through ``num_layers`` of self-attention
    (``torch.nn.functional.scaled_dot_product_attention``); the target token's output is the
    user's interest in it (``pooling="mean"``: the mean of every real token's output). ``causal``: each behaviour attends to the earlier ones only (the target,
    last, still sees them all); otherwise every token sees every real one. Padding is masked.
    ``bf16`` runs the attention and the MLPs under bf16 autocast (the tables stay fp32)."""

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        target_feature: str,
        history_feature: str,
        max_length: int = 50,
        dense_in_features: int = 0,
        num_heads: int = 2,
        num_layers: int = 1,
        causal: bool = True,
        top_arch: Sequence[int] = (64, 32),
        num_tasks: int = 1,
        embedding_bag_collection: Optional[EmbeddingBagCollection] = None,
        bf16: bool = False,
        dropout: float = 0.0,
        pooling: str = "target",
    ) -> None:
        super().__init__(embedding_collection, target_feature, history_feature, max_length, dense_in_features,
                         top_arch, num_tasks, embedding_bag_collection, bf16)
        if pooling not in ("target", "mean"):
            raise ValueError(f"SequenceTransformer: pooling must be 'target' or 'mean', got {pooling!r}")
        self.pooling = pooling
        if self.dim % num_heads:
            raise ValueError(f"SequenceTransformer: the embedding dim {self.dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.causal, self.dropout = num_heads, causal, dropout
        self.position = nn.Parameter(torch.randn(max_length + 1, self.dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "qkv": nn.Linear(self.dim, 3 * self.dim), "out": nn.Linear(self.dim, self.dim),
                "norm1": nn.LayerNorm(self.dim), "norm2": nn.LayerNorm(self.dim),
                "ffn": nn.Sequential(nn.Linear(self.dim, 4 * self.dim), nn.GELU(), nn.Linear(4 * self.dim, self.dim)),
            })
            for _ in range(num_layers)
        )

    def interest(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = history.shape
        tokens = torch.cat([history, target.unsqueeze(1)], dim=1) + self.position
        valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T)
        allowed = valid.unsqueeze(1) & valid.unsqueeze(2)  # (B, T, T): query i, key j
        if self.causal:
            t = length + 1
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        # A padding query attends to itself only (never to nothing: that would be NaN).
        allowed = allowed | torch.eye(length + 1, dtype=torch.bool, device=tokens.device)
        heads, hd = self.num_heads, d // self.num_heads
        x = tokens
        for layer in self.layers:
            h = layer["norm1"](x)
            q, k, v = layer["qkv"](h).reshape(b, length + 1, 3, heads, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1),
                                               dropout_p=self.dropout if self.training else 0.0)
            x = x + layer["out"](a.transpose(1, 2).reshape(b, length + 1, d))
            x = x + layer["ffn"](layer["norm2"](x))
        if self.pooling == "mean":  # over the real tokens (the behaviours and the target)
            w = valid.unsqueeze(-1).to(x.dtype)
            return (x * w).sum(1) / w.sum(1)
        return x[:, -1]


__all__ = ["SequenceRanker", "SequenceTransformer", "mlp", "padded_sequence"]
