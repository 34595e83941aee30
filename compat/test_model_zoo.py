# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TorchRec's own models, unmodified, on hash tables: built from ``torchrec.models``, sharded with
``rt.sharders()``/``rt.plan()`` over 2 ranks (gloo), checked for forward parity against the same
model on TorchRec's own tables (ids below ``num_embeddings``), and trained for a few steps.

The reference is the unsharded TorchRec model on the union of the ranks' batches, trained with
plain SGD on every parameter (embedding tables included) and the loss averaged over ranks; the
sharded model uses fused exact SGD with the same learning rate. DDP averages the dense gradients
and the hash all-to-all divides the embedding gradients by the world size, so the two runs take
the same steps.

``torchrec.models`` has no model built on an ``EmbeddingCollection``; the sharded EC is checked in
``tests/distributed/test_sharded_ec.py``.
"""

import copy
from typing import Callable, Dict, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.models.experimental.transformerdlrm import DLRM_Transformer

import recis_torchrec as rt
from recis_torchrec.testing.multiprocess import run_ranks

DIM = 8
DENSE = 4
ROWS = 50
KEYS = ["f0", "f1", "f2", "f3"]
BATCH = [4, 6]
LR = 0.05
STEPS = 3


def make_ebc() -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f0", "f1"]),
            EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f2"]),
            EmbeddingBagConfig(name="t2", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f3"]),
        ]
    )


# name -> (builder, deterministic in training mode)
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], bool]] = {
    "DLRM": (lambda: DLRM(make_ebc(), DENSE, [16, DIM], [16, 1]), True),
    "DLRM_DCN": (
        lambda: DLRM_DCN(make_ebc(), DENSE, [16, DIM], [16, 1], dcn_num_layers=2, dcn_low_rank_dim=4),
        True,
    ),
    "DLRM_Projection": (
        lambda: DLRM_Projection(make_ebc(), DENSE, [16, DIM], [16, 1], [16, 3 * DIM], [16, 2 * DIM]),
        True,
    ),
    "SimpleDeepFMNN": (
        lambda: SimpleDeepFMNN(DENSE, make_ebc(), hidden_layer_size=16, deep_fm_dimension=4),
        True,
    ),
    # Its transformer uses dropout, and attends across the batch (the samples are its sequence):
    # forward parity in eval mode, training checked for finite losses.
    "DLRM_Transformer": (
        lambda: DLRM_Transformer(make_ebc(), DENSE, [16, DIM], [16, 1], nhead=2, ntransformer_layers=1),
        False,
    ),
}


def rank_batch(step: int, rank: int) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    b = BATCH[rank]
    lengths = torch.randint(0, 4, (len(KEYS), b), generator=g)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    dense = torch.rand(b, DENSE, generator=g)
    labels = torch.randint(0, 2, (b,), generator=g).float()
    return dense, KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1)), labels


def union_batch(step: int, world_size: int):
    parts = [rank_batch(step, r) for r in range(world_size)]
    dicts = [p[1].to_dict() for p in parts]
    kjt = KeyedJaggedTensor(
        keys=KEYS,
        values=torch.cat([d[k].values() for k in KEYS for d in dicts]),
        lengths=torch.cat([d[k].lengths() for k in KEYS for d in dicts]),
    )
    return torch.cat([p[0] for p in parts]), kjt, [p[2] for p in parts]


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.view(-1), labels)


def check_model(rank: int, world_size: int, name: str) -> None:
    build, deterministic = MODELS[name]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)  # TorchRec's own tables, unsharded
    dmp = DistributedModelParallel(
        model,
        sharders=rt.sharders({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}),
        plan=rt.plan(model, world_size),
    )
    sparse = [m for m in dmp.modules() if type(m).__name__ == "ShardedHashEmbeddingBagCollection"]
    assert len(sparse) == 1, name
    dense_params = [p for n, p in dmp.named_parameters() if "embedding_bag" not in n]
    assert dense_params, name
    opt = torch.optim.SGD(dense_params, lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    offset = sum(BATCH[:rank])

    # Forward parity on this rank's batch, in eval mode (no dropout anywhere).
    dmp.eval()
    reference.eval()
    dense, kjt, _ = rank_batch(99, rank)
    with torch.no_grad():
        torch.testing.assert_close(
            dmp(dense, kjt),
            reference(dense, kjt),
            atol=1e-5,
            rtol=1e-5,
            msg=lambda m: f"{name} forward: {m}",
        )
    dmp.train()
    reference.train()

    for step in range(STEPS):
        dense, kjt, labels = rank_batch(step, rank)
        logits = dmp(dense, kjt)
        loss = bce(logits, labels)
        assert torch.isfinite(loss), name
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not deterministic:
            continue
        u_dense, u_kjt, u_labels = union_batch(step, world_size)
        ref_logits = reference(u_dense, u_kjt)
        torch.testing.assert_close(
            logits, ref_logits[offset : offset + BATCH[rank]], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} step {step}: {m}"
        )
        ref_opt.zero_grad()
        parts = ref_logits.split(BATCH)
        (sum(bce(p, lab) for p, lab in zip(parts, u_labels)) / world_size).backward()
        ref_opt.step()
    assert sparse[0].fused_optimizer.steps() == {"t0": STEPS, "t1": STEPS, "t2": STEPS}, name
    if deterministic:
        # Each row this rank owns equals the trained TorchRec table's row.
        ref_ebc = next(m for m in reference.modules() if isinstance(m, EmbeddingBagCollection))
        for table_name, table in sparse[0].tables().items():
            ids, weights, _ = table.export()
            assert ids.numel() > 0, name
            torch.testing.assert_close(
                weights,
                ref_ebc.embedding_bags[table_name].weight.detach()[ids],
                atol=1e-6,
                rtol=1e-5,
                msg=lambda m: f"{name} table {table_name}: {m}",
            )


def _zoo_worker(rank: int, world_size: int) -> None:
    for name in MODELS:
        check_model(rank, world_size, name)


def test_torchrec_model_zoo_sharded_on_hash_tables():
    run_ranks(_zoo_worker, world_size=2, timeout=400)
