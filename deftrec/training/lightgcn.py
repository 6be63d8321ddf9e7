"""Training of the LightGCN collaborative embeddings (method.md section 1): BPR with uniform
negatives, optional DDP, HR@10 early stopping.

:func:`train_lightgcn` runs single-process or inside a Ray Train / torchrun worker: when a
``torch.distributed`` process group is initialised, the objective is wrapped in DDP and each rank
trains on its own shard of the (user, item) pairs. The model itself (graph, propagation, BPR
loss) is :class:`deftrec.model.lightgcn.LightGCN`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deftrec.config.components import LightGCNConfig
from deftrec.data.readers import InputError
from deftrec.model.lightgcn import LightGCN, check_pairs, unique_pairs
from deftrec.retrieval.metrics import evaluate_in_chunks

__all__ = ["epoch_shard", "hit_rate_at_k", "sample_negatives", "train_lightgcn"]

# (users, exclusions, targets). Exclusions: each user's whole sequence before the target
# (``EvalSet.exclusions``), not the prompt's window: the protocol every model is measured with.
Valid = tuple[np.ndarray, Sequence[np.ndarray], np.ndarray]


class _BPRObjective(nn.Module):
    """Routes the BPR loss through forward() so DDP's gradient hooks see the call."""

    def __init__(self, model: LightGCN) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return self.model.bpr_loss(users, pos, neg)


class _InteractionSet:
    """Membership test for (user, item) pairs via binary search on sorted int64 keys."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int) -> None:
        self.n_items = n_items
        self.keys = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, self.keys.size - 1)
        return self.keys[pos] == q


def sample_negatives(
    users: np.ndarray,
    seen: _InteractionSet,
    n_items: int,
    rng: np.random.Generator,
    max_rounds: int = 10_000,
) -> np.ndarray:
    """One uniform negative per entry of `users`, among items the user has not seen.

    Vectorised rejection sampling: draw for everyone, then redraw only the rejected entries.
    The expected number of rounds is 1 / (1 - max density); callers must drop users who have
    seen every item (no negative exists), otherwise this raises after `max_rounds`.
    """
    neg = rng.integers(0, n_items, size=users.shape[0], dtype=np.int64)
    bad = np.flatnonzero(seen.contains(users, neg))
    rounds = 0
    while bad.size:
        if rounds >= max_rounds:
            raise RuntimeError(f"negative sampling did not converge for {bad.size} entries")
        neg[bad] = rng.integers(0, n_items, size=bad.size, dtype=np.int64)
        bad = bad[seen.contains(users[bad], neg[bad])]
        rounds += 1
    return neg


def epoch_shard(n_pairs: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of the training pairs rank `rank` visits in `epoch`, in visiting order.

    All ranks draw the same permutation (seeded by seed + epoch), pad it cyclically to a
    multiple of world_size (like DistributedSampler) and take the strided slice
    rank::world_size, so shards are disjoint up to the padding and equally long.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    perm = np.resize(perm, -(-n_pairs // world_size) * world_size)
    return perm[rank::world_size]


def hit_rate_at_k(
    U: np.ndarray | torch.Tensor,
    E: np.ndarray | torch.Tensor,
    users: np.ndarray,
    exclusions: Sequence[np.ndarray],
    targets: np.ndarray,
    k: int = 10,
    chunk: int = 1024,
) -> float:
    """HR@k over the full catalogue with each user's ``exclusions`` masked: the project's protocol,
    computed by the project's metrics (:func:`deftrec.retrieval.metrics.evaluate_in_chunks`), so
    early stopping follows the number every evaluation reports. Scores are <U_u, E_i>, ties go
    to the lower item id, and a target among the exclusions is a miss."""
    U_np = U.detach().cpu().numpy() if isinstance(U, torch.Tensor) else np.asarray(U)
    E_np = E.detach().cpu().numpy() if isinstance(E, torch.Tensor) else np.asarray(E)
    users = np.asarray(users, dtype=np.int64)
    if len(exclusions) != users.shape[0] or len(targets) != users.shape[0]:
        raise ValueError("users, exclusions and targets must have the same length")
    if users.size == 0:
        raise ValueError("empty validation set")
    metrics = evaluate_in_chunks(lambda u: U_np[u] @ E_np.T, users, targets, exclusions, chunk, ks=(k,))
    return metrics["history_excluded"][f"hr@{k}"]


# ----------------------------------------------------------------------------- training loop


@dataclass
class _Run:
    """What every epoch of one run needs: the rank layout, the deduplicated pairs and the batching."""

    cfg: LightGCNConfig
    rank: int
    world_size: int
    distributed: bool
    device: torch.device
    pairs_u: np.ndarray  # unique training pairs, sorted
    pairs_i: np.ndarray
    seen: _InteractionSet
    n_items: int
    per_rank_batch: int  # ceil(batch_size / world_size) triples per rank and step
    steps: int  # optimiser steps per epoch, equal on every rank


@dataclass
class _EarlyStopping:
    """Best evaluation so far (earliest on ties) and the count of evaluations without a gain."""

    patience: int | None
    best_hr: float = -1.0
    best: tuple[np.ndarray, np.ndarray] | None = None
    bad_evals: int = 0

    def update(self, hr: float, U: np.ndarray, E: np.ndarray) -> bool:
        """Record one evaluation; True when training should stop."""
        if hr > self.best_hr:
            self.best_hr, self.best, self.bad_evals = hr, (U, E), 0
            return False
        self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience


def _process_group(rank: int, world_size: int) -> tuple[int, int, bool]:
    """(rank, world_size, distributed): the process group's values when one is initialised."""
    if dist.is_available() and dist.is_initialized():
        g_rank, g_ws = dist.get_rank(), dist.get_world_size()
        if (rank, world_size) not in ((0, 1), (g_rank, g_ws)):
            raise ValueError(
                f"rank/world_size ({rank}, {world_size}) disagree with the process group ({g_rank}, {g_ws})"
            )
        return g_rank, g_ws, True
    if world_size != 1 or rank != 0:
        raise ValueError("world_size > 1 requires an initialised torch.distributed process group")
    return rank, world_size, False


def epoch_batch_size(n_pairs: int, cfg: LightGCNConfig) -> int:
    """The global batch: ``batch_size``, raised so that an epoch of ``n_pairs`` takes at most
    ``max_steps_per_epoch`` steps (each step propagates the whole graph)."""
    if cfg.max_steps_per_epoch is None:
        return cfg.batch_size
    return max(cfg.batch_size, -(-n_pairs // cfg.max_steps_per_epoch))


def _plan(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, cfg: LightGCNConfig,
          valid: Valid | None, rank: int, world_size: int) -> _Run:
    """Validate the inputs and fix the pairs, the rank layout and the per-epoch step count."""
    u_all, i_all = check_pairs(users, items, n_users, n_items)
    rank, world_size, distributed = _process_group(rank, world_size)
    pu, pi = unique_pairs(u_all, i_all, n_items)
    deg = np.bincount(pu, minlength=n_users)
    if (deg >= n_items).any():
        full = np.flatnonzero(deg >= n_items)[:5].tolist()
        raise InputError(f"users {full} interacted with every item: BPR has no negative for them")
    if valid is not None:
        v_users, v_excluded, v_targets = valid
        if len(v_excluded) != len(v_users) or len(v_targets) != len(v_users):
            raise ValueError("valid must be (users, exclusions, targets) of equal length")
    shard_len = -(-pu.size // world_size)
    per_rank_batch = -(-epoch_batch_size(pu.size, cfg) // world_size)
    return _Run(cfg=cfg, rank=rank, world_size=world_size, distributed=distributed, device=torch.device(cfg.device),
                pairs_u=pu, pairs_i=pi, seen=_InteractionSet(pu, pi, n_items), n_items=n_items,
                per_rank_batch=per_rank_batch, steps=-(-shard_len // per_rank_batch))


def _objective(model: LightGCN, run: _Run) -> nn.Module:
    """The BPR objective, wrapped in DDP under a process group."""
    objective: nn.Module = _BPRObjective(model)
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = None
        if run.device.type == "cuda":
            ids = [run.device.index if run.device.index is not None else torch.cuda.current_device()]
        # Buffers are the fixed graph, identical on every rank: no per-step broadcast.
        objective = DDP(objective, device_ids=ids, broadcast_buffers=False)
    return objective


def _train_epoch(objective: nn.Module, opt: torch.optim.Optimizer, run: _Run, epoch: int) -> float:
    """One pass over this rank's shard; returns the mean loss over steps (averaged over ranks)."""
    cfg, device, b = run.cfg, run.device, run.per_rank_batch
    shard = epoch_shard(run.pairs_u.size, cfg.seed, epoch, run.rank, run.world_size)
    s_users, s_pos = run.pairs_u[shard], run.pairs_i[shard]
    s_neg = sample_negatives(s_users, run.seen, run.n_items, np.random.default_rng([cfg.seed, epoch, run.rank]))
    t_users = torch.from_numpy(s_users).to(device)
    t_pos = torch.from_numpy(s_pos).to(device)
    t_neg = torch.from_numpy(s_neg).to(device)

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for step in range(run.steps):
        sl = slice(step * b, (step + 1) * b)
        loss = objective(t_users[sl], t_pos[sl], t_neg[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().double()
    if run.distributed:
        dist.all_reduce(loss_sum)
        loss_sum /= run.world_size
    return float(loss_sum) / run.steps


def _embeddings(model: LightGCN) -> tuple[np.ndarray, np.ndarray]:
    """(U, E) as float32 numpy copies, computed in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        U_t, E_t = model()
    return (U_t.detach().cpu().numpy().astype(np.float32, copy=True),
            E_t.detach().cpu().numpy().astype(np.float32, copy=True))


def _evaluate(model: LightGCN, run: _Run, valid: Valid) -> tuple[float, np.ndarray, np.ndarray]:
    """HR@10 (exclusions masked) computed on rank 0 and broadcast to all ranks, with the (U, E) it scored."""
    U_np, E_np = _embeddings(model)
    hr = torch.zeros((), dtype=torch.float64, device=run.device)
    if run.rank == 0:
        hr += hit_rate_at_k(U_np, E_np, *valid, k=10)
    if run.distributed:
        dist.broadcast(hr, src=0)
    return float(hr), U_np, E_np


def train_lightgcn(
    users: np.ndarray,
    items: np.ndarray,
    n_users: int,
    n_items: int,
    cfg: LightGCNConfig | None = None,
    valid: Valid | None = None,
    log: Callable[[str], None] | None = print,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train LightGCN with BPR and return (U, E, history).

    Args:
        users, items: training interactions only (duplicates collapse to one pair).
        valid: optional (val_users, val_exclusions, val_targets), the exclusions being each
            user's whole sequence before the target (``EvalSet.exclusions``); HR@10 with them
            excluded is computed every cfg.eval_every epochs and after the last epoch, drives
            early stopping (cfg.patience evaluations without improvement) and selects the
            returned embeddings (best evaluation, earliest on ties). Under DDP pass it on
            every rank (only rank 0 evaluates, but all ranks must take part in the broadcast).
        log: called with one line per epoch on rank 0 only; None silences it.
        rank, world_size: must match the process group when torch.distributed is
            initialised (the group's values are used); without one, world_size must be 1.

    Distributed behaviour: the objective is wrapped in DDP (gloo on CPU, NCCL on GPU, as
    initialised by the caller). Every epoch all ranks draw the same permutation (seeded by
    seed + epoch), pad it by wrap-around to a multiple of world_size and take the strided
    shard `rank::world_size`; negatives are drawn with a generator seeded by seed + epoch +
    rank. Every rank thus runs the same number of steps with ceil(batch_size / world_size)
    triples each. Validation runs on rank 0 and its HR@10 is broadcast so that all ranks
    take the same early-stopping decision.

    Returns:
        U [n_users, dim] and E [n_items, dim] as float32 numpy arrays, and a list with one
        dict per epoch: {"epoch", "loss"} plus "hr@10" on evaluated epochs.
    """
    cfg = cfg if cfg is not None else LightGCNConfig()
    run = _plan(users, items, n_users, n_items, cfg, valid, rank, world_size)
    model = LightGCN(n_users, n_items, run.pairs_u, run.pairs_i, cfg).to(run.device)
    objective = _objective(model, run)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    say = log if run.rank == 0 else None
    if say is not None and run.per_rank_batch * run.world_size > cfg.batch_size:
        say(f"[lightgcn] {run.pairs_u.size:,} training pairs: batch {run.per_rank_batch * run.world_size:,} "
            f"(collab.max_steps_per_epoch={cfg.max_steps_per_epoch}), {run.steps} steps per epoch")

    history: list[dict] = []
    stopping = _EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        record: dict = {"epoch": epoch + 1, "loss": _train_epoch(objective, opt, run, epoch)}
        stop = False
        if valid is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1):
            hr, U_np, E_np = _evaluate(model, run, valid)
            record["hr@10"] = hr
            stop = stopping.update(hr, U_np, E_np)
        history.append(record)
        if say is not None:
            extra = f" hr@10={record['hr@10']:.4f}" if "hr@10" in record else ""
            say(f"[lightgcn] epoch {epoch + 1}/{cfg.epochs} loss={record['loss']:.4f}{extra}")
        if stop:
            if say is not None:
                say(f"[lightgcn] early stop: best hr@10={stopping.best_hr:.4f}")
            break

    if stopping.best is not None:
        return stopping.best[0], stopping.best[1], history
    return (*_embeddings(model), history)
