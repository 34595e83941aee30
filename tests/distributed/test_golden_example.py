# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TorchRec's golden training example (``examples/golden_training/train_dlrm.py``), built as it is
built there (a meta-device EBC in ``DLRMTrain``, ``apply_optimizer_in_backward(RowWiseAdagrad)`` on
the sparse arch, ``in_backward_optimizer_filter`` for the dense optimizer,
``TrainPipelineSparseDist``), with ``sharders=rt.sharders(), plan=rt.plan(...)`` and no
``fused_params``: over 2 ranks its losses equal TorchRec's own sharding of the same model on
bounded ids, starting from the same table rows.
"""

import warnings
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec.datasets.criteo import DEFAULT_INT_NAMES
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import recis_torchrec as rt
from recis_torchrec.testing.multiprocess import run_ranks

KEYS = [f"cat_{i}" for i in range(6)]
NUM_EMBEDDINGS = 200
DIM = 16
LR = 0.1
STEPS = 20
BATCH = 32


def build(seed: int) -> DLRMTrain:
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=DIM, num_embeddings=NUM_EMBEDDINGS, feature_names=[k])
        for k in KEYS
    ]
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables=configs, device=torch.device("meta")),
            dense_in_features=len(DEFAULT_INT_NAMES),
            dense_arch_layer_sizes=[32, DIM],
            over_arch_layer_sizes=[32, 1],
            dense_device=torch.device("cpu"),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": LR})
    return model


def full_tables(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every table's full weight from a TorchRec-sharded model (collective)."""
    out = {}
    for key, value in model.state_dict().items():
        if "embedding_bags" not in key:
            continue
        shards = [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()]
        gathered: List = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, shards)
        full = torch.zeros(value.size())
        for rank_shards in gathered:
            for (r0, c0), t in rank_shards:
                full[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
        out[key] = full
    return out


def train(model: DistributedModelParallel, rank: int) -> List[float]:
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=LR),
    )
    pipeline = TrainPipelineSparseDist(model, dense_optimizer, torch.device("cpu"))
    data = iter(
        RandomRecDataset(
            keys=KEYS, batch_size=BATCH, hash_size=NUM_EMBEDDINGS, ids_per_feature=3,
            num_dense=len(DEFAULT_INT_NAMES), manual_seed=1000 + rank,
        )
    )
    losses = []
    for _ in range(STEPS):
        loss, _logits, _labels = pipeline.progress(data)  # DLRMTrain's (loss, logits, labels), detached
        losses.append(float(loss))
    return losses


def _worker(rank: int, world_size: int, mixed: bool) -> None:
    reference = DistributedModelParallel(build(0), device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
    start = full_tables(reference)
    ref_losses = train(reference, rank)

    model = build(0)
    # Mixed: half the tables on hash tables, the others on TorchRec's row-wise sharding in the same EBC.
    hash_tables = [f"t_{k}" for k in KEYS[:3]] if mixed else None
    ours = DistributedModelParallel(
        model, device=torch.device("cpu"), sharders=rt.sharders(), plan=rt.plan(model, world_size, tables=hash_tables)
    )
    sharded = [m for m in ours.modules() if type(m).__name__ == "ShardedHashEmbeddingBagCollection"]
    assert len(sharded) == 1
    config = sharded[0].hash_optimizer.config
    assert config.optimizer.name == "EXACT_ROWWISE_ADAGRAD" and config.learning_rate == LR, config
    # Start from TorchRec's initial rows (ids below num_embeddings; each rank keeps its own ids).
    ours.load_state_dict(start, strict=False)
    losses = train(ours, rank)
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(ref_losses), atol=5e-5, rtol=0, msg=lambda m: f"rank {rank}: {m}"
    )
    # The optimizer mattered: the losses moved over the run.
    assert abs(losses[-1] - losses[0]) > 1e-3


@pytest.mark.parametrize("mixed", [False, True], ids=["hash", "mixed-plan"])
def test_golden_example_construction_trains_as_torchrec_does(mixed):
    run_ranks(_worker, world_size=2, args=(mixed,), timeout=300)
