# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The main job: TorchRec's DLRM on hash-backed tables, trained on synthetic clicks.

The model is built exactly as a TorchRec user builds it (an
``EmbeddingBagCollection`` on the meta device inside ``torchrec.models.dlrm.DLRM``);
``recis_torchrec.convert`` then swaps in dynamic tables, so the raw 64-bit ids
of the data need no ``num_embeddings`` bound or modulo.

    python -m recis_torchrec.examples.train_dlrm --steps 300
"""

import argparse
import math
import sys
import time
from typing import List, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

import recis_torchrec as rt
from recis_torchrec.datasets import SyntheticClicks, SyntheticConfig


def build_model(data: SyntheticConfig, dim: int, fused_params) -> DLRM:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=data.vocab_size, feature_names=[f])
        for f in data.feature_names()
    ]
    model = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")),
        dense_in_features=data.num_dense,
        dense_arch_layer_sizes=[64, dim],
        over_arch_layer_sizes=[64, 32, 1],
    )
    return rt.convert(model, fused_params=fused_params, import_weights=False)


def evaluate(model, stream, batches: int) -> tuple:
    model.eval()
    auc = BinaryAUROC()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            b = stream.next_batch()
            logits = model(b.dense_features, b.sparse_features).squeeze(-1)
            loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels, reduction="sum").item()
            n += b.labels.numel()
            auc.update(torch.sigmoid(logits), b.labels.long())
    model.train()
    return loss_sum / n, float(auc.compute())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--num-sparse", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=20_000)
    p.add_argument("--lr", type=float, default=0.01, help="dense Adam learning rate")
    p.add_argument("--sparse-lr", type=float, default=0.05, help="fused row-wise Adagrad learning rate")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = SyntheticConfig(num_sparse=args.num_sparse, vocab_size=args.vocab_size, seed=args.seed)
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": args.sparse_lr}
    model = build_model(data, args.dim, fused)
    dense_opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train, held_out = SyntheticClicks(data, args.batch_size, 0), SyntheticClicks(data, args.batch_size, 1)

    ebc = model.sparse_arch.embedding_bag_collection
    print(
        f"DLRM on {len(ebc.embedding_bag_configs())} hash tables (dim {args.dim}), "
        f"fused {fused['optimizer'].name}, batch {args.batch_size}, {args.steps} steps",
        flush=True,
    )
    loss0, auc0 = evaluate(model, held_out, args.eval_batches)
    print(f"step     0  eval log loss {loss0:.4f}  AUC {auc0:.4f}", flush=True)

    window, t0, examples = [], time.perf_counter(), 0
    first_window = None
    for step in range(1, args.steps + 1):
        batch = train.next_batch()
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        dense_opt.zero_grad()
        loss.backward()  # the fused sparse update runs here
        dense_opt.step()
        window.append(loss.item())
        examples += batch.labels.numel()
        if step % args.log_every == 0 or step == args.steps:
            avg = sum(window) / len(window)
            first_window = avg if first_window is None else first_window
            rate = examples / (time.perf_counter() - t0)
            rows = sum(t.info()["rows"] for t in ebc.tables().values())
            print(f"step {step:5d}  train loss {avg:.4f}  {rate:,.0f} examples/s  table rows {rows:,}", flush=True)
            window = []

    loss1, auc1 = evaluate(model, held_out, args.eval_batches)
    print(f"final      eval log loss {loss1:.4f}  AUC {auc1:.4f}  (start {loss0:.4f} / {auc0:.4f})", flush=True)
    mem = sum(t.memory_bytes() for t in ebc.tables().values())
    print(f"tables hold {sum(len(t) for t in ebc.tables().values()):,} rows in {mem / 2**20:.1f} MiB", flush=True)
    if not (math.isfinite(loss1) and loss1 < loss0 - 0.02 and auc1 > auc0 + 0.05):
        print("FAILED: the held-out loss did not clearly fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
