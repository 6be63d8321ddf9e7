"""Training settings: the optimisation of DeftRec (``train:``) and how the Ray Train jobs are
distributed, checkpointed and recovered (``distributed:``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deftrec.core.config import _nonneg_float, _pos_int


@dataclass
class TrainConfig:
    """Optimisation of DeftRec (the LightGCN stage has its own settings in ``collab``).

    Loss: L = lambda_lm * L_lm + L_pos + diffusion.lambda_neg * L_neg. Optimiser: AdamW with two
    parameter groups (LLM at ``llm_lr``; tokenizers and diffusion head at ``lr``), linear warm-up
    over ``warmup_steps`` then cosine decay to ``min_lr_ratio`` x peak at the last step. One
    optimiser step = ``grad_accum`` micro-batches of ``batch_size`` samples.
    """

    lr: float = 1e-3  # tokenizers + diffusion head
    llm_lr: float = 1e-3  # LLM parameters (LoRA adapters or all weights); authors: 1e-3 for all
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    epochs: int = 10
    max_steps: int | None = None  # cap on optimiser steps (whichever comes first with epochs)
    batch_size: int = 9  # micro-batch size (authors: 9)
    grad_accum: int = 1
    grad_clip: float | None = 1.0  # max global grad norm; null disables clipping
    lambda_lm: float = 0.1
    min_history: int = 3  # shortest prefix that becomes a training sample
    max_samples_per_user: int | None = 20  # newest prefixes (or windows) first; null: all of them
    # "last": one sample = one prefix, its condition predicts the next item (method.md section 4).
    # "all": one sample = a window of prompt.max_history items; the condition after every item of the
    # window predicts the item that follows it (one LLM pass, every prefix; needs condition=item_states).
    positions: Literal["last", "all"] = "last"
    seed: int = 42
    validate_every: int | None = None  # optimiser steps between validations; null: every epoch end
    valid_users: int | None = 1000  # validation subset size (fixed, seeded); null: all users
    patience: int | None = None  # validations without NDCG@10 gain before stopping; null: never
    # every validation without an NDCG@10 gain multiplies the learning rate by this from then on
    # (reduce on plateau: validation, not a per-dataset setting, decides when to anneal); 1: off
    plateau_decay: float = 1.0
    # validations in a row without a gain before each decay: > 1 keeps one noisy validation from annealing
    plateau_patience: int = 1
    log_every: int = 50  # optimiser steps between progress lines

    def __post_init__(self) -> None:
        for name in ("lr", "llm_lr", "weight_decay", "lambda_lm"):
            _nonneg_float("train", name, getattr(self, name))
        if self.lr == 0:
            raise ValueError("train.lr must be > 0 (the tokenizers and the diffusion head are always trained)")
        _nonneg_float("train", "min_lr_ratio", self.min_lr_ratio)
        _nonneg_float("train", "plateau_decay", self.plateau_decay)
        if not 0 < self.plateau_decay <= 1:
            raise ValueError(f"train.plateau_decay must be in (0, 1] (1: off), got {self.plateau_decay}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("epochs", "batch_size", "grad_accum", "min_history", "log_every", "plateau_patience"):
            _pos_int("train", name, getattr(self, name))
        if self.positions not in ("last", "all"):
            raise ValueError(f"train.positions must be 'last' or 'all', got {self.positions!r}")
        for name in ("max_steps", "validate_every", "valid_users", "patience", "max_samples_per_user"):
            _pos_int("train", name, getattr(self, name), allow_none=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be < train.max_steps "
                             f"({self.max_steps}): the learning rate would never reach its peak")
        if self.grad_clip is not None:
            _nonneg_float("train", "grad_clip", self.grad_clip)
            if self.grad_clip == 0:
                raise ValueError("train.grad_clip must be > 0 or null (disabled)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"train.seed must be an int >= 0, got {self.seed!r}")


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
    ``torch_adam``: keep torch's AdamW (the optimizer of :func:`deftrec.training.optim.build_optimizer`)
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
