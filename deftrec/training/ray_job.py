"""The one place the Ray Train jobs (LightGCN and DeftRec) are shaped from ``distributed:``.

:func:`worker_resources` is what a job asks Ray for (also printed by ``--dry-run`` plans);
:func:`torch_trainer` builds the ``TorchTrainer`` from it, so what a plan shows is what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deftrec.config.training import DistributedConfig


def worker_resources(dist: DistributedConfig) -> dict[str, Any]:
    """The worker group of a Ray Train job: workers, CPUs and GPUs per worker, placement, backend."""
    return {"workers": dist.num_workers, "cpus_per_worker": dist.cpus_per_worker,
            "gpus_per_worker": 1 if dist.use_gpu else 0, "placement_strategy": dist.placement_strategy,
            # NCCL between GPUs; gloo is the CPU collective backend
            "backend": "nccl" if dist.use_gpu else "gloo"}


def storage_path(dist: DistributedConfig, run_dir: str | Path) -> str:
    """Where Ray Train persists the run: ``distributed.storage_path``, else ``RUN_DIR/ray_results``."""
    return dist.storage_path or str((Path(run_dir) / "ray_results").resolve())


def torch_trainer(loop: Callable[[dict], None], loop_config: dict, dist: DistributedConfig, *, name: str,
                  storage: str, datasets: dict | None = None, checkpoint_config: Any = None,
                  callbacks: list | None = None) -> Any:
    """A ``TorchTrainer`` running ``loop`` on the worker group of :func:`worker_resources`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    res = worker_resources(dist)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=res["backend"]),
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=dist.use_gpu,
                                               resources_per_worker={"CPU": res["cpus_per_worker"]},
                                               placement_strategy=res["placement_strategy"]),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
            # ray.train.* below WARNING; the per-report "TrainingReport(...)" records are quieted in the
            # workers (deftrec.core.log.quiet_worker_logs): LoggingConfig does not reach them
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=checkpoint_config, callbacks=callbacks),
        datasets=datasets,
    )
