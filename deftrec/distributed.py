"""Distributed DeftRec fine-tuning: Ray Train (TorchTrainer) + DeepSpeed ZeRO.

One training job scales from one CPU process to multi-node GPU clusters with the same code:

- :class:`DistributedConfig`: workers, devices, ZeRO stage / offload, precision, checkpointing
  and fault tolerance (the ``distributed`` section of a preset).
- :func:`build_deepspeed_config`: the DeepSpeed config with concrete values (no ``"auto"``)::

      train_batch_size = train.batch_size (micro) x train.grad_accum x world_size

- :func:`build_train_dataset`: the training samples as a Ray Dataset, derived from the
  preprocessed ``sequences.parquet`` by :func:`samples_table` (every prefix of s[:-2], method.md)
  and streamed to the workers through ``get_dataset_shard("train")`` (equal split; an all-reduced
  "every rank still has a batch" flag keeps the ranks in lockstep). No worker reads the files.
- :func:`train_loop_per_worker`: the per-worker loop (restore first, stream batches, DeepSpeed
  step, validation on an equal slice per rank with all-reduced metrics, checkpoint + report on
  every rank), and :func:`train_distributed`, the driver (Ray Data, TorchTrainer, export of the
  best checkpoint to ``DIR/model``).

Checkpoint layout (one directory per report, merged across ranks by Ray Train)::

    trainer_state.json        rank 0: step, epoch, samples consumed in the epoch, best score,
                              world size, ZeRO stage, validation history, config
    model.safetensors         rank 0: consolidated trainable weights + E/U buffers + the rows of
                              the placeholder tokens in frozen embedding matrices (gathered with
                              deepspeed.zero.GatheredParameters under ZeRO-3)
    deepspeed/state/...       every rank: DeepSpeed's sharded model/optimizer states

Resume. The same world size and ZeRO stage restore the DeepSpeed states (optimizer moments
included). A different worker count (or stage) loads the consolidated weights *before*
``deepspeed.initialize`` (so ZeRO partitions them, and ZeRO-2's fp32 master copy starts from
them), keeps the step counter and the learning-rate schedule, and resets the Adam moments (it is
logged). That works for ZeRO-0/2/3 alike; ZeRO-3 moments can only be carried over to another
world size through DeepSpeed's universal checkpoint (``python -m deepspeed.checkpoint.ds_to_universal``
on ``deepspeed/`` and ``checkpoint: {load_universal: true}``), which this job does not automate.
Within an epoch, the data position is restored by skipping the number of batches already
consumed (Ray Data's streaming split does not replay the exact same rows per rank). Re-running
a finished run (same storage and name, same step budget) starts no worker and only re-exports.
Ray's controller collects reports by polling the workers (every 2 s): a worker lost within that
window after a report can lose that checkpoint, and the run resumes from the one before.

Everything that needs Ray or DeepSpeed is imported inside functions: importing this module is
cheap, and serving code never imports them (see :mod:`deftrec.export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import resource
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from deftrec.config import DeftRecConfig, TrainConfig
from deftrec.config_utils import to_dict

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from deftrec.collab import CollabArtifact
    from deftrec.data.samples import Catalog, EvalSet
    from deftrec.model.deftrec import DeftRec

__all__ = [
    "DS_TAG",
    "DistributedConfig",
    "DistributedResult",
    "REFERENCE_CONFIGS",
    "TrainerState",
    "build_deepspeed_config",
    "build_train_dataset",
    "config_fingerprint",
    "consolidated_state",
    "load_consolidated",
    "plan_steps",
    "read_trainer_state",
    "reference_deepspeed_config",
    "resolve_precision",
    "samples_table",
    "shard_bounds",
    "train_distributed",
    "train_loop_per_worker",
    "write_reference_configs",
]

Log = Callable[[str], None]

#: Tag of the DeepSpeed checkpoint inside every Ray checkpoint directory.
DS_TAG = "state"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
DS_DIR = "deepspeed"
#: Metric the checkpoint manager ranks checkpoints by: validation NDCG@10 (primary protocol) on
#: checkpoints taken right after a validation, -1 on the others (so they are dropped first; Ray
#: always keeps the latest one for resume).
SCORE_KEY = "checkpoint_score"
_ROWS_PREFIX = "_added_rows."
_BUFFERS = ("item_emb", "x0_scale", "user_emb", "user_scale")


# --------------------------------------------------------------------------------------------- config


@dataclass
class DistributedConfig:
    """How the training job is distributed, checkpointed and recovered.

    ``num_workers`` Ray Train workers (one process each; one GPU each with ``use_gpu``), each
    reserving ``cpus_per_worker`` logical CPUs and running ``threads_per_worker`` torch threads
    (default: ``cpus_per_worker`` rounded down, at least 1). ``zero_stage`` 0 (plain data
    parallel), 2 (optimizer states + gradients partitioned) or 3 (parameters too);
    ``offload_optimizer`` moves optimizer states to CPU memory (stage 2 or 3),
    ``offload_params`` parameters too (stage 3 only). ``precision``: ``auto`` is bf16 on GPUs that
    support it and fp32 otherwise (decided on the worker, whose hardware counts).
    ``torch_adam``: keep torch's AdamW (the optimizer of :func:`deftrec.train_local.build_optimizer`)
    even with optimizer offload; False uses DeepSpeedCPUAdam when offloading (faster host step,
    but a ~50 s C++ build on first use) and FusedAdam on GPUs otherwise.
    ``checkpoint_every``: optimizer steps between checkpoints (also taken after every validation
    and at every epoch end); ``num_to_keep`` checkpoints are kept by validation NDCG@10, plus
    always the latest. ``max_failures``: worker-group restarts from the latest checkpoint.
    ``storage_path`` / ``name``: where Ray Train persists checkpoints (default ``RUN_DIR/ray_results``
    and the preset name); re-running with the same pair resumes. ``debug_steps``: stop after
    that many optimizer steps (smoke runs, benchmarks). ``samples``: ``driver`` computes the
    training samples once on the driver from the preprocessed Parquet and hands them to Ray Data as
    blocks the driver owns: Ray Data needs no CPU while the workers hold them all, and losing a
    worker node loses no data (memory: samples x history x 8 bytes in the head's object store);
    ``stream`` reads ``sequences.parquet`` and derives the samples in Ray Data tasks every epoch
    (for data larger than the driver's memory; needs CPUs beyond the workers' reservation).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    torch_adam: bool = True
    checkpoint_every: int | None = None
    num_to_keep: int = 2
    max_failures: int = 0
    storage_path: str | None = None
    name: str | None = None
    debug_steps: int | None = None
    samples: Literal["driver", "stream"] = "driver"
    shuffle_buffer: int = 4096  # rows of Ray Data's local shuffle buffer per worker

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"distributed.{name} must be a positive int{' or null' if allow_none else ''}, "
                                 f"got {v!r}")

        for name in ("num_workers", "num_to_keep", "shuffle_buffer"):
            pos_int(name)
        for name in ("threads_per_worker", "checkpoint_every", "debug_steps"):
            pos_int(name, allow_none=True)
        c = self.cpus_per_worker
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"distributed.cpus_per_worker must be a number > 0, got {c!r}")
        self.cpus_per_worker = float(c)
        if self.zero_stage not in (0, 2, 3):
            raise ValueError(f"distributed.zero_stage must be 0, 2 or 3, got {self.zero_stage!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs zero_stage 2 or 3 (ZeRO owns the optimizer states)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs zero_stage 3 (only stage 3 partitions parameters)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"distributed.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("distributed.precision=bf16 needs use_gpu: CPU training runs in fp32 (use 'auto')")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"distributed.max_failures must be an int >= -1 (-1: retry forever), got "
                             f"{self.max_failures!r}")
        if self.samples not in ("driver", "stream"):
            raise ValueError(f"distributed.samples must be 'driver' or 'stream', got {self.samples!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"distributed.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        for name in ("storage_path", "name"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"distributed.{name} must be a non-empty string or null, got {v!r}")
        if self.name is not None and ("/" in self.name or self.name in (".", "..")):
            raise ValueError(f"distributed.name must be a plain directory name, got {self.name!r}")

    @property
    def threads(self) -> int:
        """torch threads per worker."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto`` -> ``bf16`` when CUDA is used and supports bf16, else ``fp32``; others unchanged."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# DeepSpeed's own defaults, written out so the config is complete and reviewable.
_BUCKET = 500_000_000
_PREFETCH = 50_000_000
_PERSISTENCE = 100_000
_MAX_LIVE = 1_000_000_000


def build_deepspeed_config(train: TrainConfig, dist: DistributedConfig, world_size: int,
                           precision: str) -> dict[str, Any]:
    """DeepSpeed config dict with concrete values.

    ``train_batch_size = train.batch_size x train.grad_accum x world_size``; gradient clipping
    from ``train.grad_clip`` (0 disables); ``precision`` must already be resolved (``bf16`` or
    ``fp32``, see :func:`resolve_precision`). The optimizer and the scheduler are not in it: the
    client AdamW (two parameter groups) and LambdaLR are passed to ``deepspeed.initialize``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be resolved to 'bf16' or 'fp32', got {precision!r}")
    stage = dist.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=dist.use_gpu,  # overlapping needs a separate stream; nothing to gain on CPU
            reduce_scatter=True,
            reduce_bucket_size=_BUCKET,
        )
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=_BUCKET)
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=_PREFETCH,
            stage3_param_persistence_threshold=_PERSISTENCE,
            stage3_max_live_parameters=_MAX_LIVE,
            stage3_max_reuse_distance=_MAX_LIVE,
            # Weights are consolidated by our own gather (checkpoint model.safetensors).
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    micro, accum = train.batch_size, train.grad_accum
    return {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(train.grad_clip) if train.grad_clip is not None else 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # torch's AdamW is not on ZeRO's list of tested optimizers, and with offload DeepSpeed
        # would insist on its CPU Adam unless told otherwise.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": not dist.torch_adam,
        "steps_per_print": 1_000_000_000,  # progress lines are ours (rank 0, one per log interval)
        "wall_clock_breakdown": False,
    }


#: The reference files in ``cluster/deepspeed/``: the authors' batch (9 per GPU, no accumulation,
#: clipping 1.0: ``TrainConfig()`` defaults) on one node of 8 GPUs in bf16.
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "zero2.json": {"dist": {"num_workers": 8, "use_gpu": True, "zero_stage": 2}, "world_size": 8,
                   "precision": "bf16"},
    "zero3_offload.json": {"dist": {"num_workers": 8, "use_gpu": True, "zero_stage": 3, "offload_optimizer": True,
                                    "offload_params": True, "torch_adam": False},
                           "world_size": 8, "precision": "bf16"},
}


def reference_deepspeed_config(name: str) -> dict[str, Any]:
    """The DeepSpeed config of ``cluster/deepspeed/<name>`` as :func:`build_deepspeed_config` makes it."""
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown reference config {name!r}; known: {sorted(REFERENCE_CONFIGS)}")
    spec = REFERENCE_CONFIGS[name]
    return build_deepspeed_config(TrainConfig(), DistributedConfig(**spec["dist"]), spec["world_size"],
                                  spec["precision"])


def write_reference_configs(directory: str | Path) -> list[Path]:
    """(Re)generate the reference JSON files (``cluster/deepspeed/``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in REFERENCE_CONFIGS:
        p = out / name
        p.write_text(json.dumps(reference_deepspeed_config(name), indent=2) + "\n")
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------- data


def samples_table(sequences: pa.Table, min_history: int, max_samples_per_user: int, max_history: int) -> pa.Table:
    """Training samples of a batch of ``sequences.parquet`` rows (``user``, ``items``).

    The training sequence of a user is s[:-2] (validation and test targets never leak); its
    prefixes become samples exactly as in :func:`deftrec.data.samples.build_training_samples`.
    Output columns: ``user`` int64, ``target`` int64, ``history`` list<int64>.
    """
    import pyarrow as pa

    from deftrec.data.samples import Ragged, build_training_samples

    users = sequences.column("user").to_numpy().astype(np.int64)
    seqs = Ragged.from_arrow(sequences.column("items")).drop_last(2)
    s = build_training_samples(seqs, users, min_history, max_samples_per_user, max_history)
    _, flat = s.histories.flat()
    offsets = np.concatenate([[0], np.cumsum(s.histories.lengths)]).astype(np.int64)
    history = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int64()))
    return pa.table({"user": pa.array(s.users, pa.int64()), "target": pa.array(s.targets, pa.int64()),
                     "history": history})


def build_train_dataset(data_dir: str | Path, cfg: DeftRecConfig, source: str = "driver",
                        num_blocks: int = 16) -> ray.data.Dataset:
    """Ray Dataset of training samples (columns of :func:`samples_table`) from ``sequences.parquet``.

    ``source="driver"``: one vectorised :func:`samples_table` pass on the driver, split into
    ``num_blocks`` blocks owned by the driver (see :class:`DistributedConfig`). ``"stream"``:
    ``read_parquet`` -> ``map_batches(samples_table)``, executed lazily by Ray Data every epoch.
    """
    import ray.data

    t = cfg.train
    kwargs = {"min_history": t.min_history, "max_samples_per_user": t.max_samples_per_user,
              "max_history": cfg.prompt.max_history}
    path = Path(data_dir) / "sequences.parquet"
    if source == "driver":
        import pyarrow.parquet as pq

        table = samples_table(pq.read_table(path, columns=["user", "items"]), **kwargs)
        size = max(1, -(-table.num_rows // num_blocks))
        return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
    if source != "stream":
        raise ValueError(f"source must be 'driver' or 'stream', got {source!r}")
    ds = ray.data.read_parquet(str(path)).select_columns(["user", "items"])
    return ds.map_batches(samples_table, batch_format="pyarrow", batch_size=4096, zero_copy_batch=True,
                          fn_kwargs=kwargs)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous slice of ``n`` rows (sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# --------------------------------------------------------------------------------------------- state


def config_fingerprint(cfg: DeftRecConfig) -> str:
    """Hash of what a resumed run must share with the one that wrote the checkpoint.

    Run-length and bookkeeping fields (epochs, max_steps, patience, log/validation intervals,
    device) and the eval section may change between attempts; the model, the data sampling and the
    optimisation may not.
    """
    d = to_dict(cfg)
    d.pop("eval", None)
    d.pop("d_llm", None)
    for k in ("epochs", "max_steps", "patience", "log_every", "validate_every", "device"):
        d["train"].pop(k, None)
    for sec in ("collab", "llm"):
        d[sec].pop("device", None)
        d[sec].pop("cache_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainerState:
    """What rank 0 writes next to the DeepSpeed states (``trainer_state.json``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    samples_in_epoch: int = 0  # samples consumed in the current epoch, all ranks together
    best_score: float = -1.0
    best_step: int | None = None
    bad_validations: int = 0
    world_size: int = 1
    zero_stage: int = 2
    precision: str = "fp32"
    fingerprint: str = ""
    done: bool = False  # reached its step budget or stopped early (a larger budget continues it)
    stopped_early: bool = False  # patience ran out: never continued
    attempts: int = 1
    validations: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_trainer_state(checkpoint_dir: str | Path) -> TrainerState:
    p = Path(checkpoint_dir) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {STATE_FILE}; not a DeftRec training checkpoint")
    return TrainerState.from_json(json.loads(p.read_text()))


# --------------------------------------------------------------------------------------------- weights


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned ``params`` inside the block (collective); no-op otherwise."""
    part = [p for p in params if _is_zero3(p)]
    if not part:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=None):
        yield


def _frozen_embedding_weights(model: DeftRec) -> dict[str, torch.nn.Parameter]:
    """Frozen input/output embedding matrices: their placeholder rows are randomly initialised
    (mean resizing) and are not reproducible from the base model, so checkpoints carry them."""
    out = {}
    for kind, module in (("input", model.llm.get_input_embeddings()), ("output", model.llm.get_output_embeddings())):
        if module is not None and not module.weight.requires_grad:
            out[kind] = module.weight
    return out


def consolidated_state(model: DeftRec, rank: int = 0, chunk_numel: int = 1 << 27) -> dict[str, torch.Tensor]:
    """Full trainable weights, the E/U buffers and the placeholder rows of frozen embeddings, on CPU.

    Under ZeRO-3 parameters are gathered ``chunk_numel`` elements at a time (bounded memory): this
    is collective, every rank must call it; only rank ``0`` gets the tensors (others get {}).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        with _gathered([p for _, p in chunk]):
            if rank == 0:
                for n, p in chunk:
                    out[n] = p.detach().cpu().clone()
        chunk, size = [], 0

    for n, p in named:
        chunk.append((n, p))
        size += p.ds_numel if _is_zero3(p) else p.numel()
        if size >= chunk_numel:
            flush()
    if chunk:
        flush()
    ids = torch.tensor(sorted(model.placeholders.all_ids()), dtype=torch.long)
    for kind, w in _frozen_embedding_weights(model).items():
        with _gathered([w]):
            if rank == 0:
                out[f"{_ROWS_PREFIX}{kind}"] = w.detach()[ids.to(w.device)].cpu().clone()
    if rank == 0:
        out[f"{_ROWS_PREFIX}ids"] = ids
        for name in _BUFFERS:
            buf = getattr(model, name)
            if buf is not None:
                out[name] = buf.detach().cpu().clone()
    return out


def load_consolidated(model: DeftRec, weights: dict[str, torch.Tensor], trainable: bool = True) -> None:
    """Load :func:`consolidated_state` output into a (not yet DeepSpeed-wrapped) model.

    Always restores the placeholder rows of frozen embeddings; ``trainable=False`` skips the
    trainable weights (when DeepSpeed's own checkpoint restores them). Raises on unknown names.
    """
    ids = weights.get(f"{_ROWS_PREFIX}ids")
    frozen = _frozen_embedding_weights(model)
    with torch.no_grad():
        for kind, w in frozen.items():
            rows = weights.get(f"{_ROWS_PREFIX}{kind}")
            if rows is not None and ids is not None:
                w[ids.to(w.device)] = rows.to(device=w.device, dtype=w.dtype)
    if not trainable:
        return
    state = {k: v for k, v in weights.items() if not k.startswith(_ROWS_PREFIX) and k not in _BUFFERS}
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"checkpoint weights do not match the model: unknown {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            p = params[k]
            if p.shape != v.shape:
                raise ValueError(f"checkpoint weight {k} has shape {tuple(v.shape)}, the model {tuple(p.shape)}")
            p.copy_(v.to(device=p.device, dtype=p.dtype))


# --------------------------------------------------------------------------------------------- worker


@dataclass
class _WorkerContext:
    """Everything the workers need besides the sample stream (shipped once via the object store)."""

    cfg: DeftRecConfig
    dist: DistributedConfig
    catalog: Catalog
    item_emb: np.ndarray
    user_emb: np.ndarray | None
    valid: EvalSet
    n_samples: int
    fingerprint: str


def plan_steps(n_samples: int, train: TrainConfig, world_size: int, debug_steps: int | None = None
               ) -> tuple[int, int]:
    """(steps per epoch, total steps) for ``n_samples`` split equally over ``world_size`` ranks.

    Each rank gets floor(n / world) samples (Ray's equal split), forms floor(. / micro) micro-batches
    (drop_last) and floor(. / accum) optimizer steps; total = min(epochs x per-epoch, max_steps,
    debug_steps).
    """
    per_rank = n_samples // world_size
    spe = (per_rank // train.batch_size) // train.grad_accum
    if spe < 1:
        raise ValueError(f"{n_samples} samples over {world_size} workers give no full optimizer step of "
                         f"{train.batch_size} x {train.grad_accum} samples per worker")
    total = spe * train.epochs
    for cap in (train.max_steps, debug_steps):
        if cap is not None:
            total = min(total, cap)
    return spe, total


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _flatten_valid(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for protocol, values in metrics.items():
        tag = "valid" if protocol == "history_excluded" else "valid_kept"
        for k, v in values.items():
            out[f"{tag}_{k}"] = float(v)
    return out


def _client_optimizer(model: DeftRec, cfg: DeftRecConfig, dist: DistributedConfig) -> torch.optim.Optimizer:
    """train_local's AdamW (two groups), or DeepSpeed's CPU/fused Adam on the same groups."""
    from deftrec.train_local import build_optimizer

    opt = build_optimizer(model, cfg)
    if dist.torch_adam or not (dist.offload_optimizer or dist.use_gpu):
        return opt
    groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in opt.param_groups]
    wd = cfg.train.weight_decay
    if dist.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.train.lr, weight_decay=wd, adamw_mode=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=cfg.train.lr, weight_decay=wd, adam_w_mode=True)


def _set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at optimizer step ``step`` (lr = peak x f(step)), e.g. after a resume."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        scheduler.step()


class _Validator:
    """Validation on this rank's slice of the fixed subset; metrics all-reduced (same on all ranks)."""

    def __init__(self, model: DeftRec, valid: EvalSet, rank: int, world: int, zero3: bool, precision: str,
                 device: torch.device) -> None:
        self.model, self.zero3, self.device = model, zero3, device
        self.bf16 = precision == "bf16" and device.type == "cuda"
        start, stop = shard_bounds(len(valid), rank, world)
        self.slice = valid.subset(np.arange(start, stop))
        bs = model.cfg.eval.batch_size
        # Under ZeRO-3 every forward gathers parameters collectively: all ranks must run the same
        # number of batches, so shorter slices run dummy batches to match the longest.
        longest = -(-len(valid) // world)
        self.extra = -(-longest // bs) - -(-len(self.slice) // bs) if zero3 else 0
        self.valid = valid

    def __call__(self) -> dict[str, dict[str, float]]:
        import torch.distributed as tdist

        from deftrec.model.deftrec import DeftRecRecommender
        from deftrec.train_local import evaluate

        m = self.model
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            local = evaluate(m, self.slice, seed=m.cfg.eval.seed)
            for _ in range(self.extra):
                DeftRecRecommender(m).score_users(self.valid.histories[:1], self.valid.users[:1], seed=0)
        m.train()
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return local
        # Every slice is non-empty (the driver checks len(valid) >= world): same keys on every rank.
        keys = [(p, k) for p, vals in sorted(local.items()) for k in sorted(vals)]
        n = len(self.slice)
        vec = torch.tensor([n] + [local[p][k] * n for p, k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(vec)
        total = float(vec[0])
        out: dict[str, dict[str, float]] = {}
        for (p, k), v in zip(keys, vec[1:].tolist()):
            out.setdefault(p, {})[k] = v / total
        return out


def _stdout_line(line: str) -> None:
    # Not print(): Ray Train patches print in workers and may emit each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _primary(metrics: dict[str, dict[str, float]], exclude_history: bool) -> float:
    return metrics["history_excluded" if exclude_history else "history_kept"]["ndcg@10"]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore, train with DeepSpeed, validate, checkpoint, report.

    ``config``: ``{"context": ObjectRef[_WorkerContext] | _WorkerContext, "step_callback": callable | None}``.
    ``step_callback(step, rank)`` runs after every optimizer step (monitoring, fault injection).
    """
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as tdist

    from deftrec.data.samples import Ragged, TrainingSamples
    from deftrec.model.deftrec import DeftRec, DeftRecTask
    from deftrec.train_local import build_scheduler, make_batch

    ctx = config["context"]
    if isinstance(ctx, ray.ObjectRef):
        ctx = ray.get(ctx)
    callback = config.get("step_callback")
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    dcfg: DistributedConfig = ctx.dist
    torch.set_num_threads(dcfg.threads)
    if dcfg.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cfg = dataclasses.replace(ctx.cfg, train=dataclasses.replace(ctx.cfg.train, device=str(device)))
    t = cfg.train
    precision = resolve_precision(dcfg.precision, dcfg.use_gpu)
    say = _stdout_line if rank == 0 else (lambda s: None)
    spe_est, total = plan_steps(ctx.n_samples, t, world, dcfg.debug_steps)

    with contextlib.ExitStack() as stack:
        # -- restore first: the state decides how the model is built and what is loaded
        state = TrainerState(world_size=world, zero_stage=dcfg.zero_stage, precision=precision,
                             fingerprint=ctx.fingerprint, config=to_dict(cfg))
        ckpt = ray.train.get_checkpoint()
        ckpt_dir: Path | None = None
        weights: dict[str, torch.Tensor] = {}
        same_layout = False
        if ckpt is not None:
            ckpt_dir = Path(stack.enter_context(ckpt.as_directory()))
            old = read_trainer_state(ckpt_dir)
            if old.fingerprint != ctx.fingerprint:
                raise ValueError(f"checkpoint {ckpt_dir} was written with a different configuration "
                                 f"(fingerprint {old.fingerprint} != {ctx.fingerprint}); use another run name")
            from safetensors.torch import load_file

            weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
            same_layout = (old.world_size == world and old.zero_stage == dcfg.zero_stage
                           and old.precision == precision and (ckpt_dir / DS_DIR).is_dir())
            state = dataclasses.replace(old, world_size=world, zero_stage=dcfg.zero_stage, precision=precision,
                                        attempts=old.attempts + 1, config=to_dict(cfg))

        torch.manual_seed(t.seed)  # identical initialisation on every rank
        model = DeftRec.from_config(cfg, ctx.item_emb, ctx.user_emb, ctx.catalog)
        cfg = model.cfg
        if weights:
            load_consolidated(model, weights, trainable=not same_layout)
        n_llm = sum(p.numel() for p in model.param_groups()["llm"])  # before ZeRO-3 partitions them
        n_heads = sum(p.numel() for p in model.param_groups()["heads"])
        model.to(device)
        task = DeftRecTask(model)
        optimizer = _client_optimizer(model, cfg, dcfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        ds_config = build_deepspeed_config(t, dcfg, world, precision)
        engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
        if ckpt_dir is not None:
            if same_layout:
                engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False)
                say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from {ckpt_dir}")
            else:
                say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from consolidated weights "
                    f"in {ckpt_dir}: layout changed (world {old.world_size}->{world}, ZeRO "
                    f"{old.zero_stage}->{dcfg.zero_stage}, {old.precision}->{precision}); optimizer moments reset")
            _set_schedule_step(scheduler, state.step)
        del weights
        stack.close()  # release the restored checkpoint: Ray may delete it once newer ones exist

        zero3 = dcfg.zero_stage == 3
        validator = _Validator(model, ctx.valid, rank, world, zero3, precision, device)
        micro, accum = t.batch_size, t.grad_accum
        per_step = micro * accum * world
        gen = torch.Generator(device=device).manual_seed(_mix_seed(t.seed, rank, state.step, state.attempts))
        shard = ray.train.get_dataset_shard("train")
        say(f"[deftrec] {ctx.n_samples:,} samples, {len(ctx.valid):,} validation users, {total:,} steps "
            f"(~{spe_est:,}/epoch, {per_step} samples/step = {micro} x {accum} x {world} workers), ZeRO-"
            f"{dcfg.zero_stage}, {precision}; trainable: llm {n_llm:,}, heads {n_heads:,}")

        def all_ranks(flag: bool) -> bool:
            v = torch.tensor([1 if flag else 0], device=device)
            if world > 1:
                tdist.all_reduce(v, op=tdist.ReduceOp.MIN)
            return bool(v.item())

        def mean_over_ranks(values: list[float]) -> list[float]:
            v = torch.tensor(values, dtype=torch.float64, device=device)
            if world > 1:
                tdist.all_reduce(v)
                v /= world
            return v.tolist()

        def peak_mb() -> float:
            v = torch.tensor([_peak_memory_mb(device)], dtype=torch.float64, device=device)
            if world > 1:
                tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
            return float(v.item())

        def checkpoint_and_report(metrics: dict[str, Any]) -> None:
            with tempfile.TemporaryDirectory(prefix="deftrec-ckpt-") as tmp_name:
                tmp = Path(tmp_name)
                engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
                w = consolidated_state(model, rank)  # collective under ZeRO-3
                if rank == 0:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in w.items()}, str(tmp / WEIGHTS_FILE))
                    (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2, default=str))
                name = f"checkpoint_{state.step:08d}_{uuid.uuid4().hex[:6]}"  # rank 0's name is used by all
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                                 checkpoint_dir_name=name)

        def validate() -> dict[str, Any]:
            tv = time.perf_counter()
            metrics = validator()
            score = _primary(metrics, cfg.eval.exclude_history)
            state.validations.append({"step": state.step, "epoch": state.epoch + 1, **metrics,
                                      "seconds": time.perf_counter() - tv})
            ex, kept = metrics["history_excluded"], metrics["history_kept"]
            say(f"[deftrec] valid step {state.step}: HR@10 {ex['hr@10']:.4f} NDCG@10 {ex['ndcg@10']:.4f} (history "
                f"excluded) | HR@10 {kept['hr@10']:.4f} NDCG@10 {kept['ndcg@10']:.4f} (kept)")
            if score > state.best_score:
                state.best_score, state.best_step, state.bad_validations = score, state.step, 0
            else:
                state.bad_validations += 1
            return {**_flatten_valid(metrics), SCORE_KEY: score}

        def early_stop() -> bool:
            if t.patience is not None and state.bad_validations >= t.patience:
                say(f"[deftrec] early stop at step {state.step}: best NDCG@10 {state.best_score:.4f} "
                    f"at step {state.best_step}")
                state.stopped_early = True
                return True
            return False

        # Training-time window for samples/s: data loading and steps only, not validation/checkpoints.
        win = {"sums": [0.0, 0.0, 0.0, 0.0], "n": 0, "samples": 0, "seconds": 0.0}
        last_ckpt_step = state.step if ckpt_dir is not None else -1
        last_valid_step = state.validations[-1]["step"] if state.validations else -1
        stop = state.stopped_early or state.step >= total
        model.train()
        while not stop and state.epoch < t.epochs:
            epoch_seed = _mix_seed(t.seed, state.epoch, rank)
            batches = iter(shard.iter_batches(batch_size=micro, batch_format="pyarrow", drop_last=True,
                                              local_shuffle_buffer_size=dcfg.shuffle_buffer,
                                              local_shuffle_seed=epoch_seed))
            skip = state.samples_in_epoch // per_step
            for _ in islice(batches, skip * accum):  # resume inside an epoch: skip what was consumed
                pass
            state.samples_in_epoch = skip * per_step
            while not stop:
                t0 = time.perf_counter()
                tables = list(islice(batches, accum))
                if not all_ranks(len(tables) == accum):  # some rank ran out: the epoch ends for all
                    break
                sums = [0.0, 0.0, 0.0, 0.0]
                for tb in tables:
                    samples = TrainingSamples(tb.column("user").to_numpy().astype(np.int64),
                                              Ragged.from_arrow(tb.column("history")),
                                              tb.column("target").to_numpy().astype(np.int64))
                    batch = make_batch(model, samples, slice(None))
                    parts = engine(batch, generator=gen)
                    engine.backward(parts["total"])
                    engine.step()  # DeepSpeed steps optimizer + scheduler at the accumulation boundary
                    for i, key in enumerate(("lm", "pos", "neg", "total")):
                        sums[i] += float(parts[key].detach()) / accum
                state.step += 1
                state.samples_in_epoch += per_step
                win["sums"] = [a + b for a, b in zip(win["sums"], sums)]
                win["n"] += 1
                win["samples"] += per_step
                win["seconds"] += time.perf_counter() - t0
                if callback is not None:
                    callback(state.step, rank)
                final = state.step >= total
                metrics: dict[str, Any] = {}
                if state.step % t.log_every == 0 or final:
                    lm, pos, neg, tot = mean_over_ranks([s / win["n"] for s in win["sums"]])
                    metrics = {"step": state.step, "epoch": state.epoch + 1, "loss": tot, "lm": lm, "pos": pos,
                               "neg": neg, "lr": scheduler.get_last_lr()[0],
                               "samples_per_s": win["samples"] / max(win["seconds"], 1e-9),
                               "peak_memory_mb": peak_mb(), "world_size": world}
                    say(f"[deftrec] step {state.step}/{total} epoch {state.epoch + 1} loss {tot:.4f} (lm {lm:.3f} "
                        f"pos {pos:.4f} neg {neg:.4f}) lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} "
                        f"samples/s")
                    win.update(sums=[0.0, 0.0, 0.0, 0.0], n=0, samples=0, seconds=0.0)
                validated = final or (t.validate_every is not None and state.step % t.validate_every == 0)
                if validated:
                    metrics.update(validate())
                    last_valid_step = state.step
                    final = early_stop() or final
                stop = state.done = final
                periodic = dcfg.checkpoint_every is not None and state.step % dcfg.checkpoint_every == 0
                if validated or periodic or final:
                    metrics.setdefault(SCORE_KEY, -1.0)
                    metrics.update(step=state.step, epoch=state.epoch + 1)
                    checkpoint_and_report(metrics)
                    last_ckpt_step = state.step
                elif metrics:
                    ray.train.report(metrics)
            if stop:
                break
            # Epoch end: every rank got here after the same all-reduced "out of data" decision.
            state.epoch += 1
            state.samples_in_epoch = 0
            last_epoch = state.epoch >= t.epochs
            metrics = {"step": state.step, "epoch": state.epoch}
            if (t.validate_every is None or last_epoch) and last_valid_step != state.step:
                metrics.update(validate())
                last_valid_step = state.step
                stop = early_stop()
            stop = state.done = stop or last_epoch
            if state.step != last_ckpt_step or SCORE_KEY in metrics:
                metrics.setdefault(SCORE_KEY, -1.0)
                checkpoint_and_report(metrics)
                last_ckpt_step = state.step


# --------------------------------------------------------------------------------------------- driver


@dataclass
class DistributedResult:
    """What :func:`train_distributed` returns."""

    model_dir: Path | None  # DIR/model (None when export=False)
    best_checkpoint: str | None  # path (or URI) of the exported checkpoint
    latest_checkpoint: str | None
    state: TrainerState | None  # trainer state of the best checkpoint
    metrics: dict  # metrics reported with the latest checkpoint
    storage: str  # storage_path/name of the Ray Train run


def _storage(run_dir: Path, cfg_name: str, dist: DistributedConfig, suffix: str = "") -> tuple[str, str]:
    storage = dist.storage_path or str((run_dir / "ray_results").resolve())
    name = (dist.name or cfg_name) + suffix
    return storage, name


def _previous_run(storage: str, name: str) -> tuple[Any, TrainerState] | None:
    """(Result, trainer state of its latest checkpoint) of an earlier run with this storage/name, if any."""
    try:
        from ray.train import Result

        res = Result.from_path(f"{storage.rstrip('/')}/{name}")
    except Exception:  # noqa: BLE001 - no earlier run (or no snapshot yet): nothing to resume
        return None
    if res.checkpoint is None:
        return None
    try:
        with res.checkpoint.as_directory() as d:
            return res, read_trainer_state(d)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def train_distributed(
    cfg: DeftRecConfig,
    dist: DistributedConfig,
    run_dir: str | Path,
    *,
    run_name: str = "deftrec",
    data_dir: str | Path | None = None,
    collab_dir: str | Path | None = None,
    export: bool = True,
    step_callback: Callable[[int, int], None] | None = None,
    log: Log | None = print,
) -> DistributedResult:
    """Train DeftRec on Ray Train with DeepSpeed and export the best checkpoint to ``RUN_DIR/model``.

    Args:
        cfg: the model/training config (``train`` drives the loop, ``eval`` the validations).
        dist: scaling, ZeRO, checkpointing and fault tolerance.
        run_dir: the run directory (``data/`` and ``collab/`` inside unless given explicitly).
        run_name: Ray Train run name unless ``dist.name`` is set (resume = same storage and name).
        export: write ``RUN_DIR/model`` (atomic, with manifest) from the best checkpoint.
        step_callback: ``f(step, rank)`` run on every worker after each optimizer step.

    Raises:
        deftrec.io.ArtifactError when the data or the collaborative embeddings are missing;
        ValueError when an earlier run with the same storage/name used another configuration.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from deftrec.collab import load_collab
    from deftrec.data.samples import build_training_samples, load_dataset
    from deftrec.ray_utils import ensure_ray

    say = log if log is not None else (lambda s: None)
    run_dir = Path(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else run_dir / "data"
    collab = load_collab(collab_dir if collab_dir is not None else run_dir / "collab")
    if cfg.tokenizer.user_tokens and collab.user_emb is None:
        raise ValueError("tokenizer.user_tokens needs the LightGCN user matrix in the collab artifact")
    if dist.zero_stage == 3 and cfg.needs_generation:
        # Greedy decoding stops at data-dependent lengths; under ZeRO-3 every forward is a
        # collective, so ranks would fall out of lockstep during validation.
        raise ValueError(f"condition={cfg.condition!r} generates text during validation, which ZeRO-3 cannot "
                         "run in lockstep; use zero_stage 0/2 or condition=prompt_state")
    if collab.item_emb.shape[1] != cfg.d_c:
        raise ValueError(f"the collab artifact has d_c={collab.item_emb.shape[1]}, the config collab.dim={cfg.d_c}")
    data = load_dataset(data_dir)
    if collab.item_emb.shape[0] != data.n_items:
        raise ValueError(f"the collab artifact has {collab.item_emb.shape[0]} items, the data {data.n_items}")
    t = cfg.train
    n_samples = len(build_training_samples(data.train_sequences, data.users, t.min_history, t.max_samples_per_user,
                                           cfg.prompt.max_history))
    valid = data.valid.sample(t.valid_users, t.seed)
    if len(valid) < dist.num_workers:
        raise ValueError(f"{len(valid)} validation users cannot be split over {dist.num_workers} workers")
    fp = config_fingerprint(cfg)
    storage, name = _storage(run_dir, run_name, dist)
    prev = _previous_run(storage, name)
    if prev is not None and prev[1].fingerprint != fp:
        raise ValueError(f"{storage}/{name} holds a run with a different configuration (fingerprint "
                         f"{prev[1].fingerprint} != {fp}): pass another run name (--name) or remove it")
    _, total = plan_steps(n_samples, t, dist.num_workers, dist.debug_steps)
    if prev is not None and (prev[1].stopped_early or prev[1].step >= total or prev[1].epoch >= t.epochs):
        # Finished under this budget: nothing to train (no workers started), export its best checkpoint.
        say(f"[deftrec] {storage}/{name} already finished at step {prev[1].step}; nothing to train")
        return _finish(prev[0], data.catalog, collab, run_dir, storage, name, export, say)

    ensure_ray()
    ds = build_train_dataset(data_dir, cfg, source=dist.samples, num_blocks=max(16, 4 * dist.num_workers))
    context = _WorkerContext(cfg=cfg, dist=dist, catalog=data.catalog, item_emb=collab.item_emb,
                             user_emb=collab.user_emb if cfg.tokenizer.user_tokens else None,
                             valid=valid, n_samples=n_samples, fingerprint=fp)
    ref = ray.put(context)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"context": ref, "step_callback": step_callback},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker={"CPU": dist.cpus_per_worker},
                                               placement_strategy=dist.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # no line per report
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.num_to_keep,
                                                         checkpoint_score_attribute=SCORE_KEY,
                                                         checkpoint_score_order="max")),
        datasets={"train": ds},
    )
    say(f"[deftrec] training on {dist.num_workers} worker(s) (ZeRO-{dist.zero_stage}); checkpoints in {storage}/{name}")
    result = trainer.fit()
    return _finish(result, data.catalog, collab, run_dir, storage, name, export, say)


def _finish(result: Any, catalog: Catalog, collab: CollabArtifact, run_dir: Path, storage: str, name: str,
            export: bool, say: Log) -> DistributedResult:
    """Pick the best checkpoint (validation NDCG@10) of a Ray Train result and export it."""
    latest = result.checkpoint
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(SCORE_KEY, -1.0))[0]
    best = best or latest
    if best is None:
        raise RuntimeError(f"the run {storage}/{name} finished without a checkpoint")
    model_dir = None
    with best.as_directory() as d:
        state = read_trainer_state(d)
        if export:
            from deftrec.export import export_checkpoint

            model_dir = run_dir / "model"
            export_checkpoint(d, model_dir, catalog, item_emb=collab.item_emb, user_emb=collab.user_emb, extra={
                "run": f"{storage}/{name}", "checkpoint": best.path, "best_step": state.best_step,
                "step": state.step, "valid_ndcg@10": state.best_score})
            say(f"[deftrec] exported step {state.step} (valid NDCG@10 {state.best_score:.4f}) to {model_dir}")
    return DistributedResult(model_dir=model_dir, best_checkpoint=best.path,
                             latest_checkpoint=latest.path if latest is not None else None, state=state,
                             metrics=dict(result.metrics or {}), storage=f"{storage}/{name}")
