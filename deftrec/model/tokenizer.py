"""Continuous tokenizer: entity embedding -> K continuous LLM tokens (method.md section 2).

For an entity embedding e in R^{d_c}:

    e'  = mask(e) + p                                  (mask only in training mode)
    z_k = W_k( relu( e' + MLP_k(e') ) ),   k = 1..K,   MLP_k(x) = B_k relu(A_k x + a_k) + b_k

mask(e) zeroes each feature independently with probability `mask_ratio`, drawn afresh for
every sample (unlike the authors' code, which masks in place and zeroes the first row of the
batch). There is no 1/(1 - mask_ratio) rescaling: masked features are simply dropped, as in
the reference. p is a learned position vector. The K branches are stored as stacked weights
and evaluated with one einsum per layer, so K costs no Python loop. With combine="sum" the K
branch outputs are added into a single token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftrec.config.components import ContinuousTokenizerConfig

__all__ = ["ContinuousTokenizerConfig", "ContinuousTokenizer"]


def _linear_init(weight: torch.Tensor, bias: torch.Tensor, fan_in: int) -> None:
    # Same distribution as nn.Linear's default, applied per branch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class ContinuousTokenizer(nn.Module):
    """Maps e [*, d_c] to continuous tokens [*, num_tokens, d_llm].

    Parameters (K branches stacked on the first axis; weights are stored input-major so that
    y = x @ W + b):
        pos [d_c]; w1 [K, d_c, hidden], b1 [K, hidden]; w2 [K, hidden, d_c], b2 [K, d_c];
        w_out [K, d_c, d_llm], b_out [K, d_llm].
    """

    def __init__(self, cfg: ContinuousTokenizerConfig) -> None:
        super().__init__()
        if cfg.d_c is None or cfg.d_llm is None:
            raise ValueError("ContinuousTokenizerConfig.d_c and d_llm are derived and unset: build the config with "
                             "DeftRecConfig.tokenizer_config() or pass d_c= and d_llm=")
        self.cfg = cfg
        K, d_c, h, d_llm = cfg.K, cfg.d_c, cfg.hidden, cfg.d_llm
        # Small init so e' starts close to the (masked) collaborative embedding itself.
        self.pos = nn.Parameter(torch.empty(d_c))
        self.w1 = nn.Parameter(torch.empty(K, d_c, h))
        self.b1 = nn.Parameter(torch.empty(K, h))
        self.w2 = nn.Parameter(torch.empty(K, h, d_c))
        self.b2 = nn.Parameter(torch.empty(K, d_c))
        self.w_out = nn.Parameter(torch.empty(K, d_c, d_llm))
        self.b_out = nn.Parameter(torch.empty(K, d_llm))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        _linear_init(self.w1, self.b1, self.cfg.d_c)
        _linear_init(self.w2, self.b2, self.cfg.hidden)
        _linear_init(self.w_out, self.b_out, self.cfg.d_c)

    @property
    def num_tokens(self) -> int:
        """Tokens emitted per entity: 1 with combine="sum", else K."""
        return 1 if self.cfg.combine == "sum" else self.cfg.K

    def mask(self, e: torch.Tensor) -> torch.Tensor:
        """Training-mode feature masking; returns a new tensor and never touches `e`."""
        if not self.training or self.cfg.mask_ratio == 0.0:
            return e
        keep = torch.rand(e.shape, device=e.device) >= self.cfg.mask_ratio
        return e * keep.to(e.dtype)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e [*, d_c] -> [*, num_tokens, d_llm]."""
        if e.shape[-1] != self.cfg.d_c:
            raise ValueError(f"expected last dim d_c={self.cfg.d_c}, got shape {tuple(e.shape)}")
        x = self.mask(e) + self.pos  # e' [*, d_c]
        h = torch.relu(torch.einsum("...d,kdh->...kh", x, self.w1) + self.b1)  # [*, K, hidden]
        r = torch.einsum("...kh,khd->...kd", h, self.w2) + self.b2  # MLP_k(e') [*, K, d_c]
        a = torch.relu(x.unsqueeze(-2) + r)  # residual per branch
        z = torch.einsum("...kd,kdo->...ko", a, self.w_out) + self.b_out  # [*, K, d_llm]
        if self.cfg.combine == "sum":
            z = z.sum(dim=-2, keepdim=True)
        return z
