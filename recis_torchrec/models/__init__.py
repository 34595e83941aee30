# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Sequence rankers over TorchRec's ``EmbeddingCollection`` (TorchRec's own model zoo has none):
:class:`DIN` (target attention over a behaviour sequence) and :class:`SequenceTransformer`
(self-attention over the user's sequence and the target). Both are ordinary PyTorch modules of
TorchRec modules, so ``rt.convert`` and the sharders apply, and both trace with ``torch.fx`` (for
TorchRec's train pipelines). ``model(dense_features, sparse_features) -> logits (B, num_tasks)``.
"""

from recis_torchrec.models.din import DIN
from recis_torchrec.models.sequence import SequenceTransformer, padded_sequence

__all__ = ["DIN", "SequenceTransformer", "padded_sequence"]
