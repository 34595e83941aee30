# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``Trainer``: the training loop for TorchRec models on hash tables, sharded or not.

The Trainer wraps a TorchRec model (``model(dense_features, sparse_features) ->
logits``) with its tasks' losses, converts its EBCs to hash tables (or, under
``torchrun``, shards them with :func:`recis_torchrec.sharders`), and trains it
with ``TrainPipelineSparseDist`` when sharded (input dist overlapped with
compute) or a plain loop otherwise. It evaluates per-task AUC and log loss
across ranks (torchmetrics), logs JSON lines (and TensorBoard scalars when
tensorboard is installed), checkpoints through :mod:`recis_torchrec.checkpoint`
with the loader position and RNG state, and resumes exactly.
"""

import contextlib
import gc
import itertools
import json
import os
import random
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.classification import BinaryAUROC

import recis_torchrec as rt
from recis_torchrec import checkpoint
from recis_torchrec.checkpoint.files import hash_tables, rank_and_world
from recis_torchrec.datasets.synthetic import SyntheticClicks
from recis_torchrec.io.dataset import ColumnarDataset, Prefetcher, rank_batch_sizes
from recis_torchrec.modules.prefetch import TablePrefetcher
from recis_torchrec.ops.devices import cuda_tables_available, require_cuda
from recis_torchrec.train.args import Task, TrainingArguments


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_device(choice: str = "auto") -> torch.device:
    """The training device of ``TrainingArguments.device``: ``cuda:LOCAL_RANK`` for ``"cuda"``, and for
    ``"auto"`` when a GPU and a ``RECIS_CUDA=1`` build are there; else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "auto" and not (torch.cuda.is_available() and cuda_tables_available()):
        return torch.device("cpu")
    require_cuda("TrainingArguments(device='cuda')")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))


def backend_for(device: torch.device) -> str:
    """The process-group backend for training on ``device``: NCCL on GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(backend: str = "gloo", device: Optional[torch.device] = None) -> bool:
    """Joins the process group torchrun describes (``WORLD_SIZE`` > 1); False when alone. On a CUDA
    ``device`` the process first selects it.

    After ``torchrun --max-restarts`` restarts the workers, the store the
    agent shares with them still holds the previous attempt's rendezvous keys
    (the gloo peers' old addresses). Each attempt therefore rendezvouses under
    its own prefix, ``attempt_<TORCHELASTIC_RESTART_COUNT>/``.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend)
        return True
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"attempt_{attempt}/", store), rank=rank, world_size=world_size
    )
    return True


def _per_task(logits: torch.Tensor, labels: torch.Tensor, names: List[str]):
    """(B, tasks) float logits and labels, or an error naming the tasks.

    A leaf for TorchRec's pipeline tracer (see ``torch.fx.wrap`` below): it
    checks shapes, which a symbolic trace cannot.
    """
    b = labels.shape[0]
    logits = logits.float().reshape(b, -1)
    labels = labels.reshape(b, -1).float()
    if logits.shape[1] != len(names) or labels.shape[1] != len(names):
        raise ValueError(
            f"{len(names)} tasks ({names}) but the model gives {logits.shape[1]} "
            f"logits and the batch {labels.shape[1]} labels per sample"
        )
    return logits, labels


torch.fx.wrap("_per_task")


def _logits_model(model: nn.Module) -> Optional[str]:
    """The class whose forward ``model`` runs when that is known to return logits (TorchRec's DLRMs,
    our sequence rankers), else None: a subclass with its own forward may apply a sigmoid."""
    from torchrec.models.dlrm import DLRM

    from recis_torchrec.models.sequence import SequenceRanker

    for base in (DLRM, SequenceRanker):
        if isinstance(model, base) and type(model).forward is base.forward:
            return f"{base.__module__}.{base.__name__}"
    return None


def outputs_probabilities(model: nn.Module, choice: str = "auto") -> bool:
    """Whether ``model`` returns probabilities (``TrainingArguments.model_output``): for ``"auto"``,
    a TorchRec ``SimpleDeepFMNN`` (its over arch ends in a sigmoid) or a model whose last module is
    an ``nn.Sigmoid``."""
    if choice == "probabilities":
        known = _logits_model(model)
        if known is not None:
            raise ValueError(
                f"TrainingArguments.model_output is 'probabilities' but {type(model).__name__} returns logits (the "
                f"forward of {known}, whose last layer is a Linear); set model_output = 'logits' (or 'auto')"
            )
    if choice != "auto":
        return choice == "probabilities"
    from torchrec.models.deepfm import SimpleDeepFMNN

    if isinstance(model, SimpleDeepFMNN):
        return True
    last = None
    for m in model.modules():
        if not list(m.children()):
            last = m
    return isinstance(last, nn.Sigmoid)


# Probabilities are clamped to [eps, 1 - eps] before their logit is taken: the float32 logit of
# 1 - 1e-7 is about 16, so the loss of a saturated wrong prediction stays finite (about 16).
_PROB_EPS = 1e-7


def _logits_of_probabilities(p: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))``: binary cross-entropy with logits of it is the cross-entropy of p."""
    p = p.clamp(_PROB_EPS, 1 - _PROB_EPS)
    return torch.log(p) - torch.log1p(-p)


def drop_table_weights(model: nn.Module) -> None:
    """Moves the weights of the model's TorchRec EBCs and ECs to the meta device: the hash tables
    then start empty (rows are made as ids arrive) instead of importing a fresh module's placeholder
    rows 0..num_embeddings-1."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    for m in model.modules():
        if type(m) in (EmbeddingBagCollection, EmbeddingCollection):
            m.to_empty(device=torch.device("meta"))


def refuse_converted_modules(model: nn.Module, world_size: int) -> None:
    """Under a process group, hash modules that are already converted (``rt.convert``) would train
    their ids separately on every rank; only TorchRec's EBCs and ECs are sharded."""
    from recis_torchrec.modules.hash_module import HashTablesMixin

    converted = [n for n, m in model.named_modules() if isinstance(m, HashTablesMixin)]
    if converted:
        raise ValueError(
            f"Trainer: the model holds hash modules that are already converted ({converted}); under {world_size} "
            "ranks they would not be sharded and each rank would train its own copy of every id. Give the Trainer "
            "the TorchRec model (with its EmbeddingBagCollections / EmbeddingCollections) and set "
            "TrainingArguments(share_tables=True) where tables are shared"
        )


class TaskModel(nn.Module):
    """``batch -> (loss, (loss detached, logits, labels))`` for a TorchRec model with one output per task.

    The loss is the weighted sum of each task's binary cross-entropy (mean
    over the batch). This is the shape TorchRec's train pipelines expect. A
    model that outputs probabilities (``probabilities=True``) has them turned
    into logits first, so the loss is their cross-entropy, not that of a
    second sigmoid.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], bf16: bool = False,
                 probabilities: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.bf16 = bf16
        self.probabilities = probabilities
        # A model declared to return probabilities that returns logits trained on without a word (the
        # clamp in _logits_of_probabilities hid it): its first batches' outputs are checked (a host
        # sync each, so not every step).
        self._checks_left = 8
        self.register_buffer("_weights", torch.tensor([t.weight for t in self.tasks]), persistent=False)

    def _check_probabilities(self, p: torch.Tensor) -> None:
        self._checks_left -= 1
        lo, hi = float(p.detach().min()), float(p.detach().max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"TrainingArguments.model_output is 'probabilities' but {type(self.model).__name__} returned "
                f"{lo if lo < 0.0 else hi:g}, outside [0, 1]: it returns logits; set model_output = 'logits' "
                "(or 'auto', which reads a final nn.Sigmoid as probabilities)"
            )

    def forward(self, batch):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            logits = self.model(batch.dense_features, batch.sparse_features)
        logits, labels = _per_task(logits, batch.labels, [t.name for t in self.tasks])
        if self.probabilities:
            if self._checks_left > 0:
                self._check_probabilities(logits)
            logits = _logits_of_probabilities(logits)
        per_task = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        loss = (per_task * self._weights).sum()
        # The output repeats the loss (detached): TorchRec's pipelines hand back only the output.
        return loss, (loss.detach(), logits.detach(), labels)


class BatchStream:
    """Training batches by global index k = 0, 1, 2, ... over epochs of a source.

    Sources that can seek (a ``ColumnarDataset``, a ``SyntheticClicks``
    stream) restart at batch k directly; other iterables are replayed and
    skipped, so exact resume holds for them too, at a cost.
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def has_length(self) -> bool:
        try:
            len(self.source)
            return True
        except TypeError:
            return False

    def iter_from(self, k: int) -> Iterator[Any]:
        src = self.source
        if isinstance(src, SyntheticClicks):
            # Generated in a background thread (numpy releases the GIL), like the loader's batches.
            return Prefetcher((src.batch(i) for i in itertools.count(k)), depth=4)
        if isinstance(src, ColumnarDataset):
            n = len(src)
            src.seek(k // n, k % n)

            def epochs():
                while True:
                    yield from src

            return epochs()

        def replay():
            skipped = 0
            while True:
                for b in src:
                    if skipped < k:
                        skipped += 1
                        continue
                    yield b

        return replay()


class _Timed:
    """An iterator that adds the time spent waiting in next() to a counter."""

    def __init__(self, it: Iterator, counter: Dict[str, float]) -> None:
        self.it, self.counter = it, counter

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.counter["wait"] += time.perf_counter() - t0

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()


class _RankState:
    """What a rank saves beside the model: the training position and the RNG states."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def state_dict(self) -> Dict[str, Any]:
        t = self.trainer
        return {
            "step": t.step,
            "batches": t.batches_done,
            "examples": t.examples,
            "windows": t.windows_done,
            "torch_rng": torch.get_rng_state().tolist(),
            "numpy_rng": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python_rng": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        }

    def load_resharded(self, states: List[Dict[str, Any]], rank: int, world_size: int) -> None:
        """The position of a checkpoint saved at another world size, re-derived from the rows consumed:
        every rank read the same number of batches, so this rank resumes at the saved ranks' batches
        over the new world size (rounded down: at most ``world_size - 1`` batches' rows are read
        again). The step counter carries over; the RNG states are those of saved rank
        ``rank % saved ranks``."""
        self.load_state_dict(states[rank % len(states)])
        t = self.trainer
        t.batches_done = sum(int(s["batches"]) for s in states) // world_size
        t.examples = sum(int(s["examples"]) for s in states) // world_size
        if rank == 0:
            print(f"the checkpoint was saved by {len(states)} rank(s); this run has {world_size}: each resumes at "
                  f"batch {t.batches_done} (the rows consumed so far)", flush=True)

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        t = self.trainer
        t.step, t.batches_done, t.examples = int(s["step"]), int(s["batches"]), int(s["examples"])
        t.windows_done = int(s.get("windows", 0))
        torch.set_rng_state(torch.tensor(s["torch_rng"], dtype=torch.uint8))
        np.random.set_state(("MT19937", np.array(s["numpy_rng"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
        version_and_state = s["python_rng"]
        random.setstate((version_and_state[1], tuple(version_and_state[0]), version_and_state[2]))


class Trainer:
    """Trains a TorchRec model on hash tables.

    Args:
        model: a TorchRec model, ``model(dense_features, sparse_features) -> logits (B, len(tasks))``,
            with ``torchrec.EmbeddingBagCollection``s (on the meta device or the CPU). Under a process
            group of more than one rank it is sharded with our sharders; otherwise converted.
        args: the run's settings.
        train_data: a ``ColumnarDataset``, a ``SyntheticClicks`` stream, or any iterable of
            ``torchrec.datasets.utils.Batch``.
        eval_data: the same kinds, for evaluation (equal batch counts on every rank).
        tasks: the heads; default one task "ctr" on the first label.
        dense_optimizer: ``params -> torch.optim.Optimizer`` (default Adam, lr 1e-3).
        fused_params: the tables' fused sparse optimizer (TorchRec keys).
        table_options: ``HashTableOptions`` for every table, or by table name.
        callbacks: ``fn(trainer, step, logits, labels)`` called after every step.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_data: Any,
        eval_data: Any = None,
        tasks: Optional[Sequence[Task]] = None,
        dense_optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        table_options: Any = None,
        callbacks: Sequence[Callable] = (),
    ) -> None:
        self.args = args
        self.rank, self.world_size = rank_and_world()
        self.device = resolve_device(args.device)
        seed_all(args.seed)
        self.tasks = list(tasks or [Task("ctr")])
        self.probabilities = outputs_probabilities(model, args.model_output)
        # JSON kept in every checkpoint's index (the CLI stores the config that built the run, which
        # `python -m recis_torchrec.inference export` rebuilds the model from).
        self.checkpoint_extra: Optional[Dict[str, Any]] = None
        task_model = TaskModel(model, self.tasks, args.bf16, self.probabilities)
        if not args.import_weights:
            drop_table_weights(task_model)
        if self.world_size > 1:
            from torchrec.distributed.model_parallel import DistributedModelParallel

            refuse_converted_modules(task_model, self.world_size)
            self.model: nn.Module = DistributedModelParallel(
                task_model,
                sharders=rt.sharders(fused_params, table_options),
                plan=rt.plan(task_model, self.world_size, device_type=self.device.type,
                             share_tables=args.share_tables),
                device=self.device,
            )
        else:
            rt.convert(task_model, fused_params=fused_params, options=table_options, device=self.device,
                       import_weights=args.import_weights, share_tables=args.share_tables)
            self.model = task_model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = dense_optimizer(params) if dense_optimizer else torch.optim.Adam(params, lr=1e-3)
        self.pipeline = None
        self._pipeline_traced = False
        if self.world_size > 1 and args.pipeline and args.gradient_accumulation == 1:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.device, execute_all_batches=True)
        # Tables with rows on disk (storage="ssd") in an unsharded model: the next batch's rows come in on a
        # worker thread while the current step runs (a sharded model's lookups read their own).
        self.prefetcher: Optional[TablePrefetcher] = None
        if self.pipeline is None and args.gradient_accumulation == 1:
            prefetcher = TablePrefetcher(self.model, features_of=lambda batch: batch.sparse_features)
            self.prefetcher = prefetcher if prefetcher.tables else None
        self.train_stream = BatchStream(train_data)
        self.eval_data = eval_data
        self.callbacks = list(callbacks)
        self.step = 0
        self.batches_done = 0
        self.windows_done = 0
        self.examples = 0
        self.data_wait = {"wait": 0.0}
        self._it: Optional[_Timed] = None
        self._eval_step = -1
        self.checkpoint_dir = os.path.join(args.output_dir, "checkpoints")
        self.last_eval: Dict[str, Dict[str, float]] = {}
        self._metrics_file = None
        self._tb = None
        if self.rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            self._metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
            except ImportError:
                self._tb = None

    # -- logging ---------------------------------------------------------------

    def log(self, record: Dict[str, Any]) -> None:
        """Appends a JSON line to ``metrics.jsonl`` (rank 0) and writes TensorBoard scalars."""
        if self._metrics_file is None:
            return
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record.get("step", self.step))

    def table_stats(self) -> Dict[str, int]:
        """Rows, admitted, evicted, rejected, and bytes reserved (memory_bytes) and used of every hash table,
        summed over ranks."""
        keys = ("rows", "admitted", "evicted", "rejected", "memory_bytes", "used_bytes")
        totals = torch.zeros(len(keys), dtype=torch.float64, device=self._collective_device())
        for ref in hash_tables(self.model):
            info = ref.table.info()
            totals += torch.tensor([float(info[k]) for k in keys], dtype=torch.float64, device=totals.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        return {k: int(v) for k, v in zip(keys, totals.tolist())}

    # -- checkpoints -----------------------------------------------------------

    def save(self, blocking: Optional[bool] = None) -> str:
        """A full checkpoint of the model, both optimizers, the position and the RNG states; in the
        background (``TrainingArguments.async_save``, training goes on while it writes) unless
        ``blocking``. The directory is complete once the next save, or :meth:`wait_for_save`, returns."""
        if self.prefetcher is not None:
            self.prefetcher.wait()  # no rows move between a table's cache and its disk while it is written
        return checkpoint.save(
            self.checkpoint_dir,
            self.model,
            self.optimizer,
            _RankState(self),
            step=self.step,
            keep_last=self.args.keep_last,
            blocking=not self.args.async_save if blocking is None else blocking,
            extra=self.checkpoint_extra,
        )

    def wait_for_save(self) -> None:
        """Joins the background save in progress, if any (raising its error)."""
        checkpoint.wait()

    def resume(self) -> bool:
        """Loads the newest checkpoint in ``output_dir``, if there is one."""
        checkpoint.wait()
        self._drain_pipeline()
        if not checkpoint.checkpoints(self.checkpoint_dir):
            return False
        checkpoint.load(self.checkpoint_dir, self.model, self.optimizer, _RankState(self))
        return True

    # -- evaluation --------------------------------------------------------------

    def evaluate(self, data: Any = None, max_batches: Optional[int] = None) -> Dict[str, Dict[str, float]]:
        """Per-task AUC and log loss over every rank's batches of `data` (the eval data by default)."""
        data = self.eval_data if data is None else data
        if data is None:
            return {}
        max_batches = max_batches if max_batches is not None else self.args.eval_batches
        self._drain_pipeline()
        self.model.eval()
        aucs = [BinaryAUROC().to(self.device) for _ in self.tasks]
        sums = torch.zeros(len(self.tasks) + 1, dtype=torch.float64, device=self._collective_device())
        source = data if not hasattr(data, "batch") else (data.batch(i) for i in itertools.count())
        if max_batches is None and hasattr(data, "batch"):
            raise ValueError("evaluating on an endless stream needs eval_batches")
        with torch.no_grad():
            for batch in itertools.islice(iter(source), max_batches):
                _, (_, logits, labels) = self.model(self._on_device(batch))
                for k, auc in enumerate(aucs):
                    auc.update(torch.sigmoid(logits[:, k]), labels[:, k].long())
                losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
                sums[:-1] += losses.sum(0).double()
                sums[-1] += labels.shape[0]
        if self.world_size > 1:
            dist.all_reduce(sums)
        self.model.train()
        self._eval_step = self.step
        out = {}
        for k, task in enumerate(self.tasks):
            out[task.name] = {
                "auc": _safe_auc(aucs[k]),
                "logloss": float(sums[k] / max(sums[-1], 1)),
                "examples": int(sums[-1]),
            }
        return out

    # -- training ------------------------------------------------------------------

    def _batches(self) -> "_Timed":
        """The training batches from the next untrained one (``batches_done``) on."""
        if self._it is None:
            self._it = _Timed(self.train_stream.iter_from(self.batches_done), self.data_wait)
        return self._it

    def _drain_pipeline(self) -> None:
        """Restores the model's own forward and drops the pipeline's in-flight batches.

        Nothing is lost: the dropped batches were not trained on yet (their
        input dist has completed and left no state), and ``_batches`` reads them
        again from ``batches_done``. TorchRec's ``detach``/``attach`` keeps them
        instead, but re-attaching restarts the input dist of a batch whose
        input dist already ran, which the sharded modules cannot take twice.
        """
        if self.pipeline is not None:
            self.pipeline.detach()
            self.pipeline.reset()
        if self.prefetcher is not None:
            self.prefetcher.drop_ahead()  # not trained on: read again from batches_done
        if self._it is not None:
            self._it.close()
            self._it = None

    def _collective_device(self) -> torch.device:
        """Where tensors for collectives live: NCCL reduces CUDA tensors only."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _on_device(self, batch: Any) -> Any:
        """The batch on the training device (pinned and copied without blocking on GPUs; the
        pipeline moves its own)."""
        if self.device.type == "cpu" or not hasattr(batch, "to"):
            return batch
        if hasattr(batch, "pin_memory"):
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _total_steps(self) -> int:
        if self.args.steps is not None:
            return self.args.steps
        if not self.train_stream.has_length():
            raise ValueError("TrainingArguments.epochs needs training data with a length")
        return self.args.epochs * len(self.train_stream) // self.args.gradient_accumulation

    def _pipeline_progress(self, it: Iterator) -> Any:
        """One step of TorchRec's pipeline. Its first step traces the model with ``torch.fx`` (to
        find the sharded modules' inputs); a model that cannot be traced gets an error saying so."""
        if self._pipeline_traced:
            return self.pipeline.progress(it)
        try:
            out = self.pipeline.progress(it)
        except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as e:
            if "trac" not in str(e).lower() and "proxy" not in str(e).lower() and "symbolic" not in str(e).lower():
                raise
            raise RuntimeError(
                f"Trainer: TorchRec's TrainPipelineSparseDist traces the model with torch.fx, and tracing "
                f"{type(self.model.module.model).__name__ if hasattr(self.model, 'module') else 'the model'} "
                f"failed ({type(e).__name__}: {e}). Make its forward fx-traceable (no Python control flow on "
                "tensor values; wrap such helpers with torch.fx.wrap), or train without the pipeline: "
                "TrainingArguments(pipeline=False) / [trainer].pipeline = false"
            ) from e
        self._pipeline_traced = True
        return out

    def _one_step(self, it: Iterator) -> Any:
        acc = self.args.gradient_accumulation
        if self.pipeline is not None:
            loss, logits, labels = self._pipeline_progress(it)
            self.batches_done += 1
            self.examples += labels.shape[0]
            return float(loss), logits, labels
        self.optimizer.zero_grad()
        total, last = 0.0, None
        for _ in range(acc):
            batch = self._on_device(self._next_batch(it))
            loss, (_, logits, labels) = self.model(batch)
            (loss / acc).backward()
            total += float(loss.detach()) / acc
            self.batches_done += 1
            self.examples += labels.shape[0]
            last = (logits, labels)
        self.optimizer.step()
        return total, last[0], last[1]

    def _next_batch(self, it: Iterator) -> Any:
        """The next batch; with a prefetcher, its table rows are in the caches, and the following batch's
        are coming in while it trains."""
        return next(it) if self.prefetcher is None else self.prefetcher.next_from(it)

    def fit(self) -> Dict[str, Any]:
        """Trains to ``args.steps`` (or ``args.epochs``), evaluating, logging and saving on the way.

        Returns the summary: steps, seconds, examples/s, data wait, final eval, checkpoint.
        """
        args = self.args
        if args.resume and self.resume() and self.rank == 0:
            print(f"resumed from {checkpoint.resolve(self.checkpoint_dir)} at step {self.step}", flush=True)
        total = self._total_steps()
        if self.step >= total:
            path = checkpoint.resolve(self.checkpoint_dir)
            if self.rank == 0:
                print(
                    f"{args.output_dir} already holds a run trained to step {self.step} of {total} ({path}); "
                    "nothing to train (raise the steps, or use another output_dir)",
                    flush=True,
                )
            return {"steps": self.step, "seconds": 0.0, "examples_per_s": 0.0, "data_wait_fraction": 0.0,
                    "eval": self.last_eval, "checkpoint": path, "tables": self.table_stats()}
        path = None
        bar = None
        if self.rank == 0 and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True, leave=False)
        t0, ex0, wait0, step0 = time.perf_counter(), self.examples, self.data_wait["wait"], self.step
        aside = {"eval": 0.0, "save": 0.0}  # seconds spent evaluating and saving inside the loop
        window_loss: List[float] = []
        window_t, window_ex = time.perf_counter(), self.examples
        train_auc = [BinaryAUROC().to(self.device) for _ in self.tasks]  # progressive: each batch is scored before its update
        while self.step < total:
            try:
                loss, logits, labels = self._one_step(self._batches())
            except StopIteration:
                break
            self.step += 1
            window_loss.append(loss)
            for k, auc in enumerate(train_auc):
                auc.update(torch.sigmoid(logits[:, k]), labels[:, k].long())
            for cb in self.callbacks:
                cb(self, self.step, logits, labels)
            if bar is not None:
                bar.update(1)
            if self.step % args.log_every == 0 or self.step == total:
                now = time.perf_counter()
                rate = (self.examples - window_ex) * self.world_size / max(now - window_t, 1e-9)
                record = {
                    "step": self.step,
                    "loss": sum(window_loss) / len(window_loss),
                    "train_auc": {t.name: _safe_auc(a) for t, a in zip(self.tasks, train_auc)},
                    "examples_per_s": rate,
                    "tables": self.table_stats(),
                }
                self.log(record)
                if bar is not None:
                    post = {"loss": f"{record['loss']:.4f}", "ex/s": f"{rate:,.0f}"}
                    auc_now = (
                        {n: m["auc"] for n, m in self.last_eval.items()} if self.last_eval else record["train_auc"]
                    )
                    post["auc"] = "/".join(f"{v:.4f}" for v in auc_now.values())
                    bar.set_postfix(post)
                window_loss, window_t, window_ex = [], now, self.examples
                for auc in train_auc:
                    auc.reset()
            if args.eval_every and self.step % args.eval_every == 0 and self.eval_data is not None:
                te = time.perf_counter()
                self.last_eval = self.evaluate()
                self.log({"step": self.step, "eval": self.last_eval})
                aside["eval"] += time.perf_counter() - te
                window_t += time.perf_counter() - te
            if args.save_every and self.step % args.save_every == 0:
                ts = time.perf_counter()
                path = self.save()
                aside["save"] += time.perf_counter() - ts
                window_t += time.perf_counter() - ts
        # Training time: the loop's, less the evaluations and saves inside it (reported apart).
        seconds = time.perf_counter() - t0 - aside["eval"] - aside["save"]
        if bar is not None:
            bar.close()
        te = time.perf_counter()
        if self.eval_data is not None and self._eval_step != self.step:
            self.last_eval = self.evaluate()
            self.log({"step": self.step, "eval": self.last_eval})
        aside["eval"] += time.perf_counter() - te
        ts = time.perf_counter()
        if not args.save_every or self.step % args.save_every:
            path = self.save()
        checkpoint.wait()  # the summary names a complete checkpoint
        aside["save"] += time.perf_counter() - ts
        self._drain_pipeline()
        wait = self.data_wait["wait"] - wait0
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - step0,
            "seconds": seconds,
            "eval_seconds": aside["eval"],
            "save_seconds": aside["save"],
            "examples_per_s": (self.examples - ex0) * self.world_size / max(seconds, 1e-9),
            "data_wait_fraction": wait / max(seconds, 1e-9),
            "eval": self.last_eval,
            "checkpoint": path,
            "tables": self.table_stats(),
        }
        src = self.train_stream.source
        if isinstance(src, ColumnarDataset):  # how much of the data an epoch trains (every rank's batches)
            summary["epoch_rows"] = sum(map(sum, rank_batch_sizes(src.num_rows, src.world_size, src.batch_size,
                                                                  src.drop_last)))
            summary["data_rows"] = src.num_rows
        self.log({"step": self.step, "summary": summary})
        if self.rank == 0:
            print(summary_line(summary, self.world_size), flush=True)
        return summary

    def fit_windows(self, windows: Sequence[Any], names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """Online learning over time windows (for example one dataset per dated directory).

        Each window is first evaluated with the model trained on the windows
        before it (test-then-train; ``eval_batches`` caps it), then trained on
        for one pass, then saved: a full checkpoint, and with ``save_delta``
        also a delta of the rows that window changed, under
        ``output_dir/deltas/<name>``. A restarted run resumes after the last
        saved window. Returns one record per window trained now.
        """
        args = self.args
        names = list(names) if names is not None else [f"window_{i:04d}" for i in range(len(windows))]
        if len(names) != len(windows):
            raise ValueError(f"fit_windows: {len(windows)} windows but {len(names)} names")
        if args.resume and self.resume() and self.rank == 0:
            print(f"resumed from {checkpoint.resolve(self.checkpoint_dir)} after window {self.windows_done}", flush=True)
        results = []
        for i, window in enumerate(windows):
            if i < self.windows_done:
                continue
            record: Dict[str, Any] = {"window": i, "name": names[i], "step": self.step}
            if self.step > 0:
                record["eval_before_training"] = self.evaluate(window)
            self._drain_pipeline()
            stream = BatchStream(window)
            it = _Timed(stream.iter_from(0), self.data_wait)
            steps = len(stream) // args.gradient_accumulation if stream.has_length() else args.steps
            t0, ex0, loss_sum, trained = time.perf_counter(), self.examples, 0.0, 0
            for _ in range(steps):
                try:
                    loss, _, _ = self._one_step(it)
                except StopIteration:
                    break
                self.step += 1
                trained += 1
                loss_sum += loss
            it.close()
            self._drain_pipeline()
            seconds = time.perf_counter() - t0
            record.update(
                steps=trained,
                loss=loss_sum / max(trained, 1),
                seconds=seconds,
                examples_per_s=(self.examples - ex0) * self.world_size / max(seconds, 1e-9),
            )
            if args.save_delta and self.windows_done > 0:
                # Before the new checkpoint is saved: keep_last may prune the one the delta starts from.
                delta = os.path.join(args.output_dir, "deltas", names[i])
                checkpoint.wait()  # the checkpoint the delta starts from is complete
                checkpoint.export_delta(delta, self.model, since_step=checkpoint.resolve(self.checkpoint_dir))
                record["delta"] = delta
            self.windows_done = i + 1
            record["checkpoint"] = self.save()
            checkpoint.wait()
            record["tables"] = self.table_stats()
            self.log(record)
            if self.rank == 0:
                before = record.get("eval_before_training")
                shown = (
                    "before training " + ", ".join(f"{n} AUC {m['auc']:.4f}" for n, m in before.items()) + "; "
                    if before
                    else ""
                )
                print(
                    f"window {i} ({names[i]}): {shown}trained {trained} steps, loss {record['loss']:.4f}, "
                    f"{record['examples_per_s']:,.0f} examples/s; checkpoint {record['checkpoint']}",
                    flush=True,
                )
            results.append(record)
        if self.eval_data is not None and results:
            self.last_eval = self.evaluate()
            self.log({"step": self.step, "eval": self.last_eval})
            if self.rank == 0:
                print(
                    f"done: {len(windows)} windows, {self.step} steps; eval "
                    + ", ".join(f"{n} AUC {m['auc']:.4f} (log loss {m['logloss']:.4f})" for n, m in self.last_eval.items()),
                    flush=True,
                )
        return results

    def close(self) -> None:
        """Ends the run: stops the data threads, closes the logs, and frees the distributed
        objects (DMP, DDP's reducer, the pipeline) while the process group is alive. Freed only at
        interpreter exit, after the group is destroyed, gloo's objects can be destroyed after the
        runtime they need and the process aborts ("terminate called without an active exception")."""
        checkpoint.wait()
        self._drain_pipeline()
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.pipeline = None
        self.optimizer = None
        self.model = None
        gc.collect()


def summary_line(summary: Dict[str, Any], world_size: int = 1) -> str:
    """The one-line end-of-run summary."""
    evals = ", ".join(
        f"{name} AUC {m['auc']:.4f} (log loss {m['logloss']:.4f})" for name, m in (summary.get("eval") or {}).items()
    )
    run = summary.get("steps_this_run", summary["steps"])
    steps = f"{summary['steps']} steps" + (f" ({run} this run)" if run != summary["steps"] else "")
    aside = ""
    if summary.get("eval_seconds") or summary.get("save_seconds"):
        aside = f" (+{summary.get('eval_seconds', 0.0):.1f} s eval, +{summary.get('save_seconds', 0.0):.1f} s saving)"
    return (
        f"done: {steps} in {summary['seconds']:.1f} s of training{aside} on {world_size} rank(s), "
        f"{summary['examples_per_s']:,.0f} examples/s, data wait {100 * summary['data_wait_fraction']:.1f}%"
        + (f"; eval {evals}" if evals else "")
        + (f"; an epoch trains {summary['epoch_rows']:,} of {summary['data_rows']:,} rows" if "epoch_rows" in summary
           else "")
        + f"; {summary['tables']['rows']:,} table rows; checkpoint {summary['checkpoint']}"
    )


def _safe_auc(auc: BinaryAUROC) -> float:
    """The AUC so far, or NaN while only one class has been seen."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(auc.compute())
        except (RuntimeError, ValueError):
            return float("nan")


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


__all__ = ["BatchStream", "TaskModel", "Trainer", "init_distributed", "seed_all", "summary_line"]
