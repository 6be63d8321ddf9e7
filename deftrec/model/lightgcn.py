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

This module holds the model (graph construction, propagation, BPR loss); the training loop,
negative sampling and early stopping are in :mod:`deftrec.training.lightgcn`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deftrec.config.components import LightGCNConfig

__all__ = ["LightGCNConfig", "LightGCN", "build_norm_adj", "check_pairs", "unique_pairs"]


def check_pairs(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
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


def unique_pairs(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique (user, item) pairs: repeated interactions collapse to one edge."""
    keys = np.unique(users * n_items + items)
    return keys // n_items, keys % n_items


def build_norm_adj(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """Symmetric-normalised bipartite adjacency D^{-1/2} A D^{-1/2} as a coalesced sparse COO tensor.

    Nodes are users 0..n_users-1 followed by items n_users..n_users+n_items-1. Entry
    (u, n_users + i) = (i, u) = 1 / sqrt(deg(u) deg(i)) for each distinct training pair;
    isolated nodes have an all-zero row (their embedding is kept only through layer 0).
    """
    u, i = check_pairs(users, items, n_users, n_items)
    u, i = unique_pairs(u, i, n_items)
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


class _SymmetricSpMM(torch.autograd.Function):
    """``adj @ x`` for a symmetric sparse CSR ``adj``: the backward pass is ``adj @ grad`` again.

    Autograd through a sparse product would transpose (and re-sort) the adjacency at every backward
    pass; the normalised graph is its own transpose, so the gradient is one more CSR product."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        return None, ctx.adj @ grad


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
        with warnings.catch_warnings():  # "sparse CSR support is in beta": sparse @ dense is stable
            warnings.simplefilter("ignore", UserWarning)
            csr = adj.to_sparse_csr()
        # The CSR arrays are buffers so they follow .to(device); non-persistent because the graph is
        # data, not learned state, and is rebuilt from the interactions.
        self.register_buffer("adj_crow", csr.crow_indices(), persistent=False)
        self.register_buffer("adj_col", csr.col_indices(), persistent=False)
        self.register_buffer("adj_values", csr.values(), persistent=False)

    @property
    def adjacency(self) -> torch.Tensor:
        """The normalised adjacency as a sparse CSR tensor on the module's device (a view of the buffers)."""
        n = self.n_users + self.n_items
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # Built by build_norm_adj (sorted, in range): skip the per-call invariant check.
            return torch.sparse_csr_tensor(self.adj_crow, self.adj_col, self.adj_values, (n, n),
                                           check_invariants=False)

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:
        """mean_{l=0..L} A_hat^l ego for ego of shape [n_users + n_items, d]."""
        adj = self.adjacency
        x = ego
        total = ego
        for _ in range(self.cfg.layers):  # L sparse matmuls; L is tiny
            x = _SymmetricSpMM.apply(adj, x)
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
