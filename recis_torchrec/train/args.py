# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``TrainingArguments`` and ``Task``: how a :class:`Trainer` runs."""

import typing
from dataclasses import dataclass
from typing import Optional

from recis_torchrec._serial import DictConfig


MODEL_OUTPUTS = ("auto", "logits", "probabilities")


@dataclass(frozen=True)
class Task:
    """One prediction head: a column of the model's logits against a label column.

    Attributes:
        name: the task's name in logs (``"ctr"``, ``"cvr"``).
        label: the label column, by name (default: the data's label column at
            the task's position). In a batch, the task's position indexes
            ``batch.labels`` and the model's logits.
        weight: the task's weight in the summed loss.
    """

    name: str
    label: Optional[str] = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Task.name must not be empty")
        if not self.weight >= 0:
            raise ValueError(f"Task {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class TrainingArguments(DictConfig):
    """How a :class:`Trainer` trains.

    Attributes:
        output_dir: metrics (``metrics.jsonl``), checkpoints (``checkpoints/``)
            and TensorBoard logs go here.
        steps: optimizer steps to train; or
        epochs: passes over the training data (a dataset with a length).
        eval_every: evaluate every this many steps (0: at the end only).
        eval_batches: batches per evaluation (None: all of the eval data).
        log_every: log training metrics every this many steps.
        save_every: save a checkpoint every this many steps (0: at the end only).
        keep_last: checkpoints to keep.
        gradient_accumulation: micro-batches per dense optimizer step. The
            fused sparse optimizer still updates rows every micro-batch (on the
            loss divided by this), as TorchRec's fused tables do.
        bf16: run the dense part under bf16 autocast (tables stay fp32).
        seed: seeds torch, numpy and Python's random on every rank.
        pipeline: use TorchRec's TrainPipelineSparseDist when sharded.
        resume: continue from the newest checkpoint in ``output_dir``.
        progress: show a tqdm progress bar on rank 0.
        device: where the model trains: ``"auto"`` (``cuda:LOCAL_RANK`` when a GPU and a
            ``RECIS_CUDA=1`` build are there, else ``"cpu"``), ``"cpu"`` or ``"cuda"``. Under torchrun the
            process group's backend follows it (NCCL on CUDA, gloo on the CPU).
        save_delta: after each window (``fit_windows``), export a delta
            instead of a full checkpoint (a full one is still written first).
        model_output: what the model returns per task: ``"logits"``, ``"probabilities"`` (already
            through a sigmoid, as TorchRec's ``SimpleDeepFMNN``: the loss and the metrics then use
            them as they are, with no second sigmoid), or ``"auto"``: probabilities for a
            ``SimpleDeepFMNN`` or a model whose last module is an ``nn.Sigmoid``, else logits.
        import_weights: convert the model's ``EmbeddingBagCollection`` weights into the hash tables
            (row i becomes id i). Off by default: a freshly built EBC's rows are placeholders, and
            importing them would fill every table with ``num_embeddings`` rows no id has touched.
        async_save: write checkpoints in the background (``checkpoint.save(blocking=False)``): a
            save costs the step only its snapshot to host memory. A crash before the background write
            completes resumes from the checkpoint before it; False writes each one before training goes on.
        share_tables: tables of the same name in several collections are one hash table (see
            :func:`recis_torchrec.convert`), unsharded and under torchrun alike.
        version: schema version, for ``to_dict``/``from_dict``.
    """

    output_dir: str
    steps: Optional[int] = None
    epochs: Optional[int] = None
    eval_every: int = 0
    eval_batches: Optional[int] = None
    log_every: int = 50
    save_every: int = 0
    keep_last: int = 2
    gradient_accumulation: int = 1
    bf16: bool = False
    seed: int = 0
    pipeline: bool = True
    resume: bool = True
    progress: bool = True
    save_delta: bool = False
    device: str = "auto"
    model_output: str = "auto"
    import_weights: bool = False
    share_tables: bool = False
    async_save: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        # Every field has the type its annotation gives (TOML's "false" is a string, 2.5 a float):
        # checked here, once for all of them, before any value is used.
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            args = typing.get_args(hint)
            optional = type(None) in args
            want = next((a for a in args if a is not type(None)), hint) if args else hint
            if value is None and optional:
                continue
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if not ok:
                kind = {bool: "true or false", int: "an integer", str: "a string"}.get(want, want.__name__)
                raise ValueError(f"TrainingArguments.{name} must be {kind}{' (or unset)' if optional else ''}, "
                                 f"got {value!r}")
        if not self.output_dir:
            raise ValueError("TrainingArguments.output_dir must be set")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainingArguments: set exactly one of steps and epochs")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"TrainingArguments.steps must be > 0, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"TrainingArguments.epochs must be > 0, got {self.epochs}")
        for name in ("eval_every", "log_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainingArguments.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every == 0:
            raise ValueError("TrainingArguments.log_every must be > 0")
        if self.eval_batches is not None and self.eval_batches <= 0:
            raise ValueError(f"TrainingArguments.eval_batches must be > 0 or None, got {self.eval_batches}")
        if self.keep_last <= 0:
            raise ValueError(f"TrainingArguments.keep_last must be > 0, got {self.keep_last}")
        if self.gradient_accumulation <= 0:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation must be > 0, got {self.gradient_accumulation}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainingArguments.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.model_output not in MODEL_OUTPUTS:
            raise ValueError(
                f"TrainingArguments.model_output must be one of {MODEL_OUTPUTS}, got {self.model_output!r}"
            )
        for name in ("progress", "save_delta", "import_weights", "share_tables", "async_save"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainingArguments.{name} must be true or false, got {getattr(self, name)!r}")
        if self.version != 1:
            raise ValueError(f"TrainingArguments.version {self.version} is not supported")

