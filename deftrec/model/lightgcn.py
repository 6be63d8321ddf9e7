"""LightGCN collaborative embeddings (method.md section 1).

LightGCN (He et al., SIGIR 2020) learns one ego embedding per user and per item and smooths
them over the symmetric-normalised user-item graph of the *training split only*:

    A_hat = D^{-1/2} A D^{-1/2},      A = [[0, R], [R^T, 0]],  R in {0,1}^{n_users x n_items}
    X^{(l+1)} = A_hat X^{(l)},        X_final = 1/(L+1) * sum_{l=0..L} X^{(l)}

It is trained with BPR on (user, positive, negative) triples, the negative drawn uniformly
among the items the user has not interacted with in training:

    L = -mean_b log sigmoid(<u_b, i_b+> - <u_b, i_b->)
        + reg * 0.5 * (||u_b^0||^2 + ||i_b+^0||^2 + ||i_b-^0||^2) / B

(the L2 term is on the batch's ego embeddings X^{(0)}, as in the reference implementation).
The final item matrix E is DeftRec's diffusion target space and retrieval space.

`train_lightgcn` runs single-process or inside a Ray Train / torchrun worker: when a
`torch.distributed` process group is initialised, the objective is wrapped in DDP and each
rank trains on its own shard of the (user, item) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from deftrec.config.components import LightGCNConfig

__all__ = [
    "LightGCNConfig",
    "LightGCN",
    "build_norm_adj",
    "sample_negatives",
    "epoch_shard",
    "hit_rate_at_k",
    "train_lightgcn",
]


def _check_pairs(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    if n_users < 1 or n_items < 1:
        raise ValueError(f"n_users and n_items must be >= 1, got {n_users}, {n_items}")
    u = np.asarray(users)
    i = np.asarray(items)
    if u.ndim != 1 or i.ndim != 1 or u.shape != i.shape:
        raise ValueError(f"users and items must be 1-D arrays of equal length, got {u.shape} and {i.shape}")
    if u.size == 0:
        raise ValueError("no training interactions given")
    if not (np.issubdtype(u.dtype, np.integer) and np.issubdtype(i.dtype, np.integer)):
        raise ValueError(f"users and items must be integer arrays, got {u.dtype} and {i.dtype}")
    if u.min() < 0 or u.max() >= n_users:
        raise ValueError(f"user ids must lie in [0, {n_users}), got range [{u.min()}, {u.max()}]")
    if i.min() < 0 or i.max() >= n_items:
        raise ValueError(f"item ids must lie in [0, {n_items}), got range [{i.min()}, {i.max()}]")
    return u.astype(np.int64), i.astype(np.int64)


def _unique_pairs(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique (user, item) pairs: repeated interactions collapse to one edge."""
    keys = np.unique(users * n_items + items)
    return keys // n_items, keys % n_items


def build_norm_adj(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """Symmetric-normalised bipartite adjacency D^{-1/2} A D^{-1/2} as a coalesced sparse COO tensor.

    Nodes are users 0..n_users-1 followed by items n_users..n_users+n_items-1. Entry
    (u, n_users + i) = (i, u) = 1 / sqrt(deg(u) deg(i)) for each distinct training pair;
    isolated nodes have an all-zero row (their embedding is kept only through layer 0).
    """
    u, i = _check_pairs(users, items, n_users, n_items)
    u, i = _unique_pairs(u, i, n_items)
    deg_u = np.bincount(u, minlength=n_users).astype(np.float64)
    deg_i = np.bincount(i, minlength=n_items).astype(np.float64)
    w = 1.0 / np.sqrt(deg_u[u] * deg_i[i])  # both degrees >= 1 for an observed edge
    n = n_users + n_items
    rows = np.concatenate([u, i + n_users])
    cols = np.concatenate([i + n_users, u])
    vals = np.concatenate([w, w]).astype(np.float32)
    adj = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (n, n), dtype=torch.float32,
        check_invariants=True,  # once per graph; cheap next to training
    )
    return adj.coalesce()


class LightGCN(nn.Module):
    """LightGCN over a fixed training graph.

    Args:
        n_users, n_items: catalogue sizes (ids are 0-based).
        users, items: training interactions (validation/test targets must not be included).
        cfg: dimension, layers, init std, L2 weight and seed (initialisation uses its own
            generator seeded with cfg.seed, so construction does not depend on global RNG).
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        users: np.ndarray,
        items: np.ndarray,
        cfg: LightGCNConfig | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LightGCNConfig()
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.user_emb = nn.Embedding(self.n_users, self.cfg.dim)
        self.item_emb = nn.Embedding(self.n_items, self.cfg.dim)
        g = torch.Generator().manual_seed(self.cfg.seed)
        nn.init.normal_(self.user_emb.weight, std=self.cfg.init_std, generator=g)
        nn.init.normal_(self.item_emb.weight, std=self.cfg.init_std, generator=g)
        adj = build_norm_adj(users, items, self.n_users, self.n_items)
        # Dense index/value buffers follow .to(device); non-persistent because the graph is data,
        # not learned state, and is rebuilt from the interactions.
        self.register_buffer("adj_indices", adj.indices(), persistent=False)
        self.register_buffer("adj_values", adj.values(), persistent=False)

    @property
    def adjacency(self) -> torch.Tensor:
        """The normalised adjacency as a sparse tensor on the module's device."""
        n = self.n_users + self.n_items
        # Built by build_norm_adj (coalesced, in range): skip the per-call invariant check.
        return torch.sparse_coo_tensor(
            self.adj_indices, self.adj_values, (n, n), is_coalesced=True, check_invariants=False
        )

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:
        """mean_{l=0..L} A_hat^l ego for ego of shape [n_users + n_items, d]."""
        adj = self.adjacency
        x = ego
        total = ego
        for _ in range(self.cfg.layers):  # L sparse matmuls; L is tiny
            x = torch.sparse.mm(adj, x)
            total = total + x
        return total / (self.cfg.layers + 1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final embeddings (U [n_users, d], E [n_items, d])."""
        ego = torch.cat([self.user_emb.weight, self.item_emb.weight], dim=0)
        out = self.propagate(ego)
        return out[: self.n_users], out[self.n_users :]

    def bpr_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss plus cfg.reg-weighted L2 on the batch's ego embeddings (see module docstring)."""
        U, E = self()
        u, p, n = U[users], E[pos], E[neg]
        diff = (u * p).sum(-1) - (u * n).sum(-1)
        loss = -F.logsigmoid(diff).mean()
        if self.cfg.reg > 0:
            sq = (
                self.user_emb.weight[users].pow(2).sum()
                + self.item_emb.weight[pos].pow(2).sum()
                + self.item_emb.weight[neg].pow(2).sum()
            )
            loss = loss + self.cfg.reg * 0.5 * sq / users.shape[0]
        return loss


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
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    k: int = 10,
    chunk: int = 1024,
) -> float:
    """HR@k over the full catalogue with each user's history items excluded.

    Score s_ui = <U_u, E_i>; rank of the target = #{i : s_i > s_t} + #{i < t : s_i == s_t}
    (ties broken by item id, like a stable sort), history items set to -inf. A target that
    is itself in the history is excluded too and therefore counts as a miss.
    Local helper for early stopping; the project-wide metrics live elsewhere.
    """
    U_t = torch.as_tensor(U, dtype=torch.float32)
    E_t = torch.as_tensor(E, dtype=torch.float32)
    users = np.asarray(users, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(histories) != users.shape[0] or targets.shape[0] != users.shape[0]:
        raise ValueError("users, histories and targets must have the same length")
    if users.size == 0:
        raise ValueError("empty validation set")
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    flat = (
        np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        if lengths.sum()
        else np.zeros(0, dtype=np.int64)
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    item_ids = torch.arange(E_t.shape[0])
    hits = 0
    for s in range(0, users.size, chunk):  # chunked to bound the [chunk, n_items] score matrix
        e = min(s + chunk, users.size)
        scores = U_t[torch.from_numpy(users[s:e])] @ E_t.T
        rows = torch.from_numpy(np.repeat(np.arange(e - s), lengths[s:e]))
        cols = torch.from_numpy(flat[offsets[s] : offsets[e]])
        scores[rows, cols] = float("-inf")
        t = torch.from_numpy(targets[s:e])
        st = scores.gather(1, t[:, None])
        rank = (scores > st).sum(1) + ((scores == st) & (item_ids[None, :] < t[:, None])).sum(1)
        hits += int(((rank < k) & torch.isfinite(st[:, 0])).sum())
    return hits / users.size


def train_lightgcn(
    users: np.ndarray,
    items: np.ndarray,
    n_users: int,
    n_items: int,
    cfg: LightGCNConfig | None = None,
    valid: tuple[np.ndarray, Sequence[np.ndarray], np.ndarray] | None = None,
    log: Callable[[str], None] | None = print,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train LightGCN with BPR and return (U, E, history).

    Args:
        users, items: training interactions only (duplicates collapse to one pair).
        valid: optional (val_users, val_histories, val_targets); HR@10 with history items
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
    u_all, i_all = _check_pairs(users, items, n_users, n_items)

    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        g_rank, g_ws = dist.get_rank(), dist.get_world_size()
        if (rank, world_size) not in ((0, 1), (g_rank, g_ws)):
            raise ValueError(
                f"rank/world_size ({rank}, {world_size}) disagree with the process group ({g_rank}, {g_ws})"
            )
        rank, world_size = g_rank, g_ws
    elif world_size != 1 or rank != 0:
        raise ValueError("world_size > 1 requires an initialised torch.distributed process group")

    pu, pi = _unique_pairs(u_all, i_all, n_items)
    seen = _InteractionSet(pu, pi, n_items)
    deg = np.bincount(pu, minlength=n_users)
    if (deg >= n_items).any():
        full = np.flatnonzero(deg >= n_items)[:5].tolist()
        raise ValueError(f"users {full} interacted with every item: BPR has no negative for them")

    if valid is not None:
        v_users, v_hist, v_targets = valid
        if len(v_hist) != len(v_users) or len(v_targets) != len(v_users):
            raise ValueError("valid must be (users, histories, targets) of equal length")

    device = torch.device(cfg.device)
    model = LightGCN(n_users, n_items, pu, pi, cfg).to(device)
    objective: nn.Module = _BPRObjective(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = None
        if device.type == "cuda":
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # Buffers are the fixed graph, identical on every rank: no per-step broadcast.
        objective = DDP(objective, device_ids=ids, broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    n_pairs = pu.size
    shard_len = -(-n_pairs // world_size)
    per_rank_batch = -(-cfg.batch_size // world_size)
    steps = -(-shard_len // per_rank_batch)

    history: list[dict] = []
    best_hr = -1.0
    best: tuple[np.ndarray, np.ndarray] | None = None
    bad_evals = 0
    for epoch in range(cfg.epochs):
        model.train()
        shard = epoch_shard(n_pairs, cfg.seed, epoch, rank, world_size)
        s_users, s_pos = pu[shard], pi[shard]
        s_neg = sample_negatives(s_users, seen, n_items, np.random.default_rng([cfg.seed, epoch, rank]))
        t_users = torch.from_numpy(s_users).to(device)
        t_pos = torch.from_numpy(s_pos).to(device)
        t_neg = torch.from_numpy(s_neg).to(device)

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps):
            sl = slice(step * per_rank_batch, (step + 1) * per_rank_batch)
            loss = objective(t_users[sl], t_pos[sl], t_neg[sl])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double()
        if distributed:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        record: dict = {"epoch": epoch + 1, "loss": float(loss_sum) / steps}

        last = epoch == cfg.epochs - 1
        stop = False
        if valid is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            model.eval()
            with torch.no_grad():
                U_t, E_t = model()
            U_np = U_t.detach().cpu().numpy().astype(np.float32, copy=True)
            E_np = E_t.detach().cpu().numpy().astype(np.float32, copy=True)
            hr = torch.zeros((), dtype=torch.float64, device=device)
            if rank == 0:
                hr += hit_rate_at_k(U_np, E_np, v_users, v_hist, v_targets, k=10)
            if distributed:
                dist.broadcast(hr, src=0)
            hr_f = float(hr)
            record["hr@10"] = hr_f
            if hr_f > best_hr:
                best_hr, best, bad_evals = hr_f, (U_np, E_np), 0
            else:
                bad_evals += 1
                stop = cfg.patience is not None and bad_evals >= cfg.patience
        history.append(record)
        if rank == 0 and log is not None:
            extra = f" hr@10={record['hr@10']:.4f}" if "hr@10" in record else ""
            log(f"[lightgcn] epoch {epoch + 1}/{cfg.epochs} loss={record['loss']:.4f}{extra}")
        if stop:
            if rank == 0 and log is not None:
                log(f"[lightgcn] early stop: best hr@10={best_hr:.4f}")
            break

    if best is not None:
        return best[0], best[1], history
    model.eval()
    with torch.no_grad():
        U_t, E_t = model()
    return (
        U_t.cpu().numpy().astype(np.float32, copy=True),
        E_t.cpu().numpy().astype(np.float32, copy=True),
        history,
    )
