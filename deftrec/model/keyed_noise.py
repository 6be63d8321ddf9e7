"""Counter-based Gaussian noise keyed by (seed, key, stream): a user's draws do not depend on which
other users share its batch (inference of :class:`~deftrec.model.deftrec.DeftRec`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keyed_normal"]

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash (Wellons): a bijection of [0, 2^32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_normal(seed: int, keys: Tensor, stream: int, dim: int, device: torch.device | str = "cpu") -> Tensor:
    """N(0, 1) draws [len(keys), dim] that depend only on (seed, key, stream, column).

    Counter-based: each entry hashes (seed, key, stream, 2j) and (..., 2j + 1) to two uniforms
    u1, u2 in (0, 1) and applies Box-Muller, z = sqrt(-2 ln u1) cos(2 pi u2). Vectorised, and the
    row of a key is the same whatever else is in the batch.
    """
    keys = torch.as_tensor(keys, dtype=torch.int64, device=device).reshape(-1, 1)
    h = _hash32(torch.full_like(keys, int(seed) & _M32))
    h = _hash32(h ^ (keys & _M32))
    h = _hash32(h ^ ((keys >> 32) & _M32))
    h = _hash32(h ^ (int(stream) & _M32))
    cols = torch.arange(2 * dim, dtype=torch.int64, device=keys.device).reshape(1, -1)
    u = (_hash32(h ^ _hash32(cols)).double() + 0.5) / 2.0**32
    u1, u2 = u[:, 0::2], u[:, 1::2]
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()
