"""The DeepSpeed config of the training job, built in Python with concrete values (no ``"auto"``)::

    train_batch_size = train.batch_size (micro) x train.grad_accum x world_size

plus the precision decision and the reference files in ``cluster/deepspeed/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deftrec.config.training import DistributedConfig, TrainConfig


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
