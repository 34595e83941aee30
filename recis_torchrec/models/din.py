# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""DIN: the Deep Interest Network (Zhou et al., KDD 2018) over TorchRec's ``EmbeddingCollection``."""

from typing import Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from recis_torchrec.models.sequence import SequenceRanker, mlp


class DIN(SequenceRanker):
    """Target attention over a behaviour sequence: each of the user's last ``max_length``
    behaviours h gets a weight ``a(h, t)`` from an MLP over ``[h, t, h - t, h * t]`` with the target
    t; the user's interest in t is ``sum a(h, t) h`` over the real (unpadded) behaviours, with no
    softmax (as in the paper: the weights keep the interest's intensity; ``softmax=True``
    normalises them). The interest, the target, the other pooled features (an optional EBC) and
    the dense input go through the top MLP (PReLU).

    The target and the history are two features of one EC table, so that they share ids and rows.

    Example::

        ec = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=16, num_embeddings=10**6,
                                                  feature_names=["target_item", "hist_items"])])
        model = DIN(ec, "target_item", "hist_items", max_length=50)
        logits = model(dense, kjt)  # (B, 1)
    """

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        target_feature: str,
        history_feature: str,
        max_length: int = 50,
        dense_in_features: int = 0,
        attention_arch: Sequence[int] = (64, 16),
        top_arch: Sequence[int] = (128, 64),
        num_tasks: int = 1,
        embedding_bag_collection: Optional[EmbeddingBagCollection] = None,
        softmax: bool = False,
        bf16: bool = False,
    ) -> None:
        super().__init__(embedding_collection, target_feature, history_feature, max_length, dense_in_features,
                         top_arch, num_tasks, embedding_bag_collection, bf16)
        self.softmax = softmax
        self.attention = mlp([4 * self.dim, *attention_arch, 1])

    def interest(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.unsqueeze(1).expand_as(history)
        scores = self.attention(torch.cat([history, t, history - t, history * t], dim=-1)).squeeze(-1)  # (B, L)
        if self.softmax:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            weights = torch.nan_to_num(weights, nan=0.0)  # a user without history
        else:
            weights = scores * mask
        return (weights.unsqueeze(-1) * history).sum(1)


__all__ = ["DIN"]
