# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A plain sharded training script (not the Trainer), for the clean-exit tests: TorchRec's DLRM
with our tables over the ranks with ``rt.sharders()``/``rt.plan()``, a few steps (forward,
backward, dense optimizer step), an all-reduced scalar, then exit. ``EXIT_MODE``:

- ``destroy``: ``dist.destroy_process_group()`` then ``sys.exit(0)``;
- ``no-destroy``: ``sys.exit(0)`` with the process group alive;
- ``background-save``: a ``checkpoint.save(..., blocking=False)`` to ``EXIT_CKPT``, then exit while it runs.
"""

import os
import sys

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import recis_torchrec as rt

KEYS = [f"cat_{i}" for i in range(8)]
STEPS = 6
BATCH = 64


def build() -> DLRM:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=16, num_embeddings=1000, feature_names=[k]) for k in KEYS]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
        dense_in_features=4, dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 1],
    )


def main() -> int:
    mode = os.environ["EXIT_MODE"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    model = DistributedModelParallel(model, device=torch.device("cpu"), sharders=rt.sharders(), plan=rt.plan(model, world))
    opt = torch.optim.Adagrad([p for n, p in model.named_parameters() if "embedding_bags" not in n], lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        lengths = torch.randint(0, 4, (len(KEYS) * BATCH,), generator=g)
        values = torch.randint(0, 1 << 40, (int(lengths.sum()),), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)
        loss = model(torch.randn(BATCH, 4, generator=g), kjt).sigmoid().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if mode == "background-save":
        rt.checkpoint.save(os.environ["EXIT_CKPT"], model, opt, step=STEPS, blocking=False)
    total = torch.tensor([loss.item()])
    dist.all_reduce(total)
    print(f"rank {rank} result {total.item():.6f}", flush=True)
    if mode == "destroy":
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
