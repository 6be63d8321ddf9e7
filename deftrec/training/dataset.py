"""deftrec.training.dataset: the training samples as a Ray Dataset, their split over ranks, the step plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deftrec.config.model import DeftRecConfig
from deftrec.config.training import TrainConfig
from deftrec.core.config import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data



def samples_table(sequences: pa.Table, min_history: int, max_samples_per_user: int | None, max_history: int,
                  stride: int = 1, whole_prefix: bool = False) -> pa.Table:
    """Training samples of a batch of ``sequences.parquet`` rows (``user``, ``items``).

    The training sequence of a user is s[:-2] (validation and test targets never leak); its
    prefixes become samples exactly as in :func:`deftrec.data.samples.build_training_samples`.
    Output columns: ``user`` int64, ``target`` int64, ``history`` list<int64>.
    """
    import pyarrow as pa

    from deftrec.data.samples import Ragged, build_training_samples

    users = sequences.column("user").to_numpy().astype(np.int64)
    seqs = Ragged.from_arrow(sequences.column("items")).drop_last(2)
    s = build_training_samples(seqs, users, min_history, max_samples_per_user, max_history, stride, whole_prefix)
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

    from deftrec.data.samples import sample_options

    kwargs = sample_options(cfg)
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


def plan_steps(n_samples: int, train: TrainConfig, world_size: int, debug_steps: int | None = None
               ) -> tuple[int, int]:
    """(steps per epoch, total steps) of the training loop.

    ``n_samples`` are split equally over ``world_size`` ranks: each rank gets floor(n / world) (Ray's
    equal split), forms floor(. / micro) full micro-batches and floor(. / accum) optimizer steps of
    them. Total = min(epochs x per-epoch, max_steps, debug_steps).
    """
    per_rank = n_samples // world_size
    spe = (per_rank // train.batch_size) // train.grad_accum
    if spe < 1:
        raise ConfigError(f"{n_samples} samples over {world_size} workers give no full optimizer step of "
                          f"{train.batch_size} x {train.grad_accum} samples per worker")
    total = spe * train.epochs
    for cap in (train.max_steps, debug_steps):
        if cap is not None:
            total = min(total, cap)
    return spe, total
