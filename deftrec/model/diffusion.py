"""Diffusion head of DeftRec (method.md sections 4 and 5, sampling part).

The head learns a conditional denoiser ``eps_theta(x_t, c, t)`` over the collaborative
item-embedding space (``d_c``) and, at inference, turns a condition vector ``c`` (pooled LLM
state) into an embedding ``x0_hat`` that is then matched against the item table.

This module owns the learned part and its use: :class:`Denoiser` (residual MLP with timestep
and condition embeddings, learned null condition) and :class:`DiffusionHead` (training loss,
negative sampling, classifier-free guidance and the reverse sampling loop). The schedule and
the per-step sampler arithmetic are in :mod:`deftrec.model.schedule`.

Training loss per sample i (errors are *means over the d_c dimensions*, i.e. MSE), with
x_t = q_sample(x0, t, eps) and f the denoiser, whose target y is eps (``prediction: eps``, the
method) or x0 (``prediction: x0``)::

    e_pos_i = mean_d (f(x_t_i,  c_i, t_i) - y_i)^2
    e_neg_i = mean_d (f(x_t-_i, c_i, t_i) - y-_i)^2      (x0-_i = mean of n_neg items, same t_i and
                                                          eps_i; y- = eps_i or x0-_i)
    L_pos   = mean_i e_pos_i
    L_neg   = mean_i -log sigmoid(m (e_neg_i - e_pos_i))  (m = d_c with ``neg_scale: sum``, the
                                                          spec's ||.||^2; 1 with ``mean``)
    L       = L_pos + lambda_neg * L_neg

The loss also returns the x0 estimate of the positive rows (``x0_hat``), which the training task
scores against the catalog (``lambda_ce``).

Reverse process: DDPM over all T steps or DDIM over S evenly spaced steps, both starting at
t = T - 1 (the authors' code starts at t = 99 of 1000, which skips most of the chain) and ending
at t = 0. Classifier-free guidance: ``eps = (1 + w) f(x_t, c) - w f(x_t, null)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deftrec.config.components import SAMPLERS, DiffusionConfig
from deftrec.model.schedule import (
    NoiseSchedule,
    ddim_timesteps,
    draw_rand,
    draw_randint,
    draw_randn,
)

__all__ = ["DiffusionConfig", "Denoiser", "DiffusionHead", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim]: [sin(t w_k), cos(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


# ----------------------------------------------------------------------------- denoiser


class _ResBlock(nn.Module):
    """Pre-norm residual MLP block: h + Dropout(W2 SiLU(W1 LayerNorm(h)))."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.drop(self.fc2(F.silu(self.fc1(self.norm(h)))))


class Denoiser(nn.Module):
    """eps_theta(x_t, c, t): residual MLP on W_x x_t + g(c) + MLP(sinusoid(t)).

    ``null_cond`` is the learned condition used where the condition is dropped (CFG); it lives
    in the condition space so it goes through the same projection g as real conditions.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        if cfg.d_c is None or cfg.cond_dim is None:
            raise ValueError("DiffusionConfig.d_c and cond_dim are derived and unset: build the config with "
                             "DeftRecConfig.diffusion_config() or pass d_c= and cond_dim=")
        self.time_dim = cfg.time_dim
        h = cfg.hidden
        self.in_proj = nn.Linear(cfg.d_c, h)
        self.cond_norm = nn.LayerNorm(cfg.cond_dim) if cfg.cond_norm else nn.Identity()
        self.cond_proj = nn.Sequential(nn.Linear(cfg.cond_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(_ResBlock(h, cfg.dropout) for _ in range(cfg.n_blocks))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, cfg.d_c)
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))

    def forward(self, x_t: Tensor, cond: Tensor, t: Tensor, drop_cond: Tensor | None = None) -> Tensor:
        """x_t [B, d_c], cond [B, cond_dim], t LongTensor [B], drop_cond BoolTensor [B] (True:
        use the null condition) -> predicted noise [B, d_c]."""
        B = x_t.shape[0]
        if x_t.dim() != 2 or cond.dim() != 2 or cond.shape[0] != B or t.shape != (B,):
            raise ValueError(f"Denoiser expects x_t [B, d_c], cond [B, cond_dim], t [B]; got "
                             f"{tuple(x_t.shape)}, {tuple(cond.shape)}, {tuple(t.shape)}")
        return self.trunk(x_t, self.cond_features(cond, drop_cond), self.time_features(t, x_t.dtype))

    # forward = trunk(x_t, g(c), MLP(sinusoid(t))). Samplers compute g(c) and every step's time
    # features once per sample (one row per step, broadcast), instead of once per row and step.
    def cond_features(self, cond: Tensor, drop_cond: Tensor | None = None) -> Tensor:
        """g(c) [B, hidden]; rows with drop_cond True use the null condition."""
        cond = cond.to(self.null_cond.dtype)
        if drop_cond is not None:
            cond = torch.where(drop_cond[:, None], self.null_cond.expand_as(cond), cond)
        return self.cond_proj(self.cond_norm(cond))

    def time_features(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """MLP(sinusoid(t)) [len(t), hidden]."""
        return self.time_mlp(timestep_embedding(t, self.time_dim).to(dtype))

    def trunk(self, x_t: Tensor, cond_h: Tensor, time_h: Tensor) -> Tensor:
        """The residual MLP on in_proj(x_t) + cond_h + time_h (time_h may be one broadcast row)."""
        h = self.in_proj(x_t) + cond_h + time_h
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------- head


class DiffusionHead(nn.Module):
    """Schedule + denoiser, with the training loss, negative sampling and reverse samplers."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.T, cfg.beta_start, cfg.beta_end)
        self.denoiser = Denoiser(cfg)
        # log of the learned sharpness of the normalised catalog cross-entropy (DeftRecTask.catalog_ce);
        # shape (1,), not (): DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot view
        self.ce_log_gain = nn.Parameter(torch.zeros(1)) if cfg.ce_scale == "normalised" else None

    # -- small exposed pieces (see NoiseSchedule for the formulas)
    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self.schedule.predict_x0(x_t, t, eps)

    def ddim_step(self, x_t: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor, eta: float = 0.0,
                  noise: Tensor | None = None) -> Tensor:
        return self.schedule.ddim_step(x_t, t, t_prev, eps, eta, noise)

    def ddpm_step(self, x_t: Tensor, t: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.schedule.ddpm_step(x_t, t, eps, noise)

    def sampling_condition(self, cond: Tensor, guidance_w: float = 0.0) -> Tensor:
        """g(c) for :meth:`eps_at`: [B, hidden], or [2B, hidden] (conditioned rows, then null) for CFG."""
        if guidance_w == 0.0:
            return self.denoiser.cond_features(cond)
        B = cond.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=cond.device),
                          torch.ones(B, dtype=torch.bool, device=cond.device)])
        return self.denoiser.cond_features(torch.cat([cond, cond]), drop)

    def sampling_times(self, steps: list[int], like: Tensor) -> Tensor:
        """Time features [len(steps), hidden] of a sampler's timesteps, computed once per sample."""
        t = torch.tensor(steps, dtype=torch.long, device=like.device)
        return self.denoiser.time_features(t, like.dtype)

    def eps_at(self, x_t: Tensor, cond_h: Tensor, time_h: Tensor, guidance_w: float = 0.0,
               step: int | None = None) -> Tensor:
        """:meth:`guided_eps` for one timestep ``step`` shared by every row, from ``sampling_condition``'s
        output and that step's row of ``sampling_times`` ([1, hidden] or [hidden]). ``step`` is needed
        to turn an x0 prediction into eps."""
        if guidance_w == 0.0:
            out = self.denoiser.trunk(x_t, cond_h, time_h)
        else:
            B = x_t.shape[0]
            both = self.denoiser.trunk(torch.cat([x_t, x_t]), cond_h, time_h)
            out = (1.0 + guidance_w) * both[:B] - guidance_w * both[B:]
        if self.cfg.prediction == "eps":
            return out
        if step is None:
            raise ValueError("eps_at needs the step of an x0-predicting head")
        return self.schedule.eps_from_x0_at(x_t, step, out)

    def guided_eps(self, x_t: Tensor, cond: Tensor, t: Tensor, guidance_w: float = 0.0) -> Tensor:
        """eps = (1 + w) f(x_t, c, t) - w f(x_t, null, t); one batched [2B] call when w != 0. An x0
        prediction is guided the same way, then turned into the eps it implies."""
        if guidance_w == 0.0:
            out = self.denoiser(x_t, cond, t)
        else:
            B = x_t.shape[0]
            drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=x_t.device),
                              torch.ones(B, dtype=torch.bool, device=x_t.device)])
            both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([cond, cond]), torch.cat([t, t]), drop)
            out = (1.0 + guidance_w) * both[:B] - guidance_w * both[B:]
        return out if self.cfg.prediction == "eps" else self.schedule.eps_from_x0(x_t, t, out)

    # -- training
    def loss(self, x0: Tensor, cond: Tensor, neg_x0: Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean") -> dict[str, Tensor]:
        """Diffusion loss with the negative ranking term (see module docstring).

        Args:
            x0: target item embeddings [B, d_c].
            cond: condition vectors [B, cond_dim] (cast to the head's dtype).
            neg_x0: negative targets [B, d_c] (e.g. from :meth:`sample_negative_mean`) or None
                (then, like lambda_neg = 0, L_neg is 0 and no extra forward is run).
            generator: drives t ~ U{0..T-1}, eps ~ N(0, I) and the CFG drop mask.
            reduction: "mean" -> scalars; "none" -> per-sample [B] tensors.

        Errors are means over the d_c dims. The CFG drop (prob. ``cond_dropout``) is applied only
        in training mode, like dropout, so eval-mode losses are conditional losses; a dropped
        sample uses the null condition for both its positive and negative term.

        Returns: dict(loss, pos, neg, x0_hat): x0_hat [B, d_c] is the x0 estimate of the positive rows
        (the output itself with ``prediction: x0``; from the predicted eps otherwise), with gradient.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x0.dim() != 2 or x0.shape[1] != self.cfg.d_c:
            raise ValueError(f"x0 must be [B, d_c={self.cfg.d_c}], got {tuple(x0.shape)}")
        B = x0.shape[0]
        if cond.shape != (B, self.cfg.cond_dim):
            raise ValueError(f"cond must be [B={B}, cond_dim={self.cfg.cond_dim}], got {tuple(cond.shape)}")
        if neg_x0 is not None and neg_x0.shape != x0.shape:
            raise ValueError(f"neg_x0 must have x0's shape {tuple(x0.shape)}, got {tuple(neg_x0.shape)}")

        dev = x0.device
        if self.cfg.noise:
            t = draw_randint(self.cfg.T, (B,), dev, generator)
            eps = draw_randn(tuple(x0.shape), x0, generator)
        else:  # the no-diffusion ablation: the input carries nothing of x0 (see direct_x0)
            t = torch.full((B,), self.cfg.T - 1, dtype=torch.long, device=dev)
            eps = torch.zeros_like(x0)
        drop = None
        if self.training and self.cfg.cond_dropout > 0:
            drop = draw_rand((B,), dev, generator) < self.cfg.cond_dropout

        use_neg = neg_x0 is not None and self.cfg.lambda_neg > 0
        x0_pred = self.cfg.prediction == "x0"
        x_t = self.schedule.q_sample(x0, t, eps) if self.cfg.noise else torch.zeros_like(x0)
        if use_neg:
            # Same t and eps for the negative; both halves in one batched call of 2B rows.
            neg_x0 = neg_x0.to(x0.dtype)
            x_t_neg = self.schedule.q_sample(neg_x0, t, eps) if self.cfg.noise else torch.zeros_like(x0)
            pred = self.denoiser(torch.cat([x_t, x_t_neg]), torch.cat([cond, cond]), torch.cat([t, t]),
                                 None if drop is None else torch.cat([drop, drop]))
            assert pred.shape == (2 * B, self.cfg.d_c), pred.shape
            target = torch.cat([x0, neg_x0]) if x0_pred else torch.cat([eps, eps])
            err = (pred.float() - target.float()).pow(2).mean(dim=1)
            pos, neg_err = err[:B], err[B:]
            margin = float(self.cfg.d_c) if self.cfg.neg_scale == "sum" else 1.0
            # -log sigmoid(e_neg - e_pos): small when the negative is denoised worse than the positive.
            neg = F.softplus(margin * (pos - neg_err))
            pred = pred[:B]
        else:
            pred = self.denoiser(x_t, cond, t, drop)
            assert pred.shape == x0.shape, pred.shape
            pos = (pred.float() - (x0 if x0_pred else eps).float()).pow(2).mean(dim=1)
            neg = torch.zeros_like(pos)
        assert pos.shape == (B,) and neg.shape == (B,)
        x0_hat = pred if x0_pred else self.schedule.predict_x0(x_t, t, pred)
        total = pos + self.cfg.lambda_neg * neg
        if reduction == "none":
            return {"loss": total, "pos": pos, "neg": neg, "x0_hat": x0_hat}
        return {"loss": total.mean(), "pos": pos.mean(), "neg": neg.mean(), "x0_hat": x0_hat}

    def sample_negative_mean(self, item_table: Tensor, batch_size: int, n_neg: int | None = None,
                             exclude: Tensor | None = None,
                             generator: torch.Generator | None = None) -> Tensor:
        """x0-_b = mean of ``n_neg`` rows of ``item_table`` [N, d_c] drawn uniformly (with
        replacement) per sample -> [batch_size, d_c].

        With ``exclude`` (LongTensor [B], the positives) each draw is uniform over the other N-1
        items: draw j in [0, N-1) and shift j >= exclude_b up by one (exact, no rejection loop).
        """
        n_neg = self.cfg.n_neg if n_neg is None else n_neg
        if item_table.dim() != 2 or n_neg < 1 or batch_size < 1:
            raise ValueError(f"need item_table [N, d], n_neg >= 1, batch_size >= 1; got "
                             f"{tuple(item_table.shape)}, {n_neg}, {batch_size}")
        N = item_table.shape[0]
        dev = item_table.device
        if exclude is None:
            idx = draw_randint(N, (batch_size, n_neg), dev, generator)
        else:
            if exclude.shape != (batch_size,):
                raise ValueError(f"exclude must be [batch_size={batch_size}], got {tuple(exclude.shape)}")
            if N < 2:
                raise ValueError("cannot exclude the positive from a catalog of fewer than 2 items")
            ex = exclude.to(dev).long()[:, None]
            idx = draw_randint(N - 1, (batch_size, n_neg), dev, generator)
            idx = idx + (idx >= ex).long()
        return item_table[idx].mean(dim=1)

    def generated_x0(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The one-step generation from x_T ~ N(0, I) at t = T-1 (x_T = 0 without noise), in the
        current mode and with gradient: the query a one-step sampler retrieves with."""
        B, T = cond.shape[0], self.cfg.T
        param = next(self.denoiser.parameters())
        t = torch.full((B,), T - 1, dtype=torch.long, device=param.device)
        if self.cfg.noise:
            x_T = draw_randn((B, self.cfg.d_c), param, generator)
        else:
            x_T = torch.zeros(B, self.cfg.d_c, device=param.device, dtype=param.dtype)
        drop = None
        if self.training and self.cfg.cond_dropout > 0:
            drop = draw_rand((B,), param.device, generator) < self.cfg.cond_dropout
        pred = self.denoiser(x_T, cond.to(device=param.device, dtype=param.dtype), t, drop)
        return pred if self.cfg.prediction == "x0" else self.schedule.predict_x0(x_T, t, pred)

    # -- inference
    @torch.no_grad()
    def direct_x0(self, cond: Tensor) -> Tensor:
        """The query of a ``noise: false`` head: its output for x_t = 0 at t = T-1 (eval mode)."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            return self.generated_x0(cond)
        finally:
            self.denoiser.train(was_training)

    @torch.no_grad()
    def sample(self, cond: Tensor, sampler: str | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, guidance_w: float | None = None,
               eta: float | None = None, x_T: Tensor | None = None) -> Tensor:
        """Reverse diffusion from x_T ~ N(0, I) at t = T-1 down to t = 0 -> x0_hat [B, d_c].

        Args:
            cond: conditions [B, cond_dim].
            sampler: "ddpm" (all T steps, ancestral) or "ddim" (``steps`` evenly spaced
                timesteps, see :func:`ddim_timesteps`); defaults from the config.
            steps: DDIM step count S (default cfg.ddim_steps); for DDPM it must be None or T.
            generator: drives x_T and the per-step noise (same seed -> same samples).
            guidance_w: CFG weight w (default cfg.guidance_w).
            eta: DDIM eta (default cfg.ddim_eta).
            x_T: optional starting point [B, d_c] instead of fresh Gaussian noise.

        The denoiser runs in eval mode (no dropout); the previous mode is restored afterwards.
        """
        sampler = self.cfg.sampler if sampler is None else sampler
        w = self.cfg.guidance_w if guidance_w is None else float(guidance_w)
        eta = self.cfg.ddim_eta if eta is None else float(eta)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if cond.dim() != 2 or cond.shape[1] != self.cfg.cond_dim:
            raise ValueError(f"cond must be [B, cond_dim={self.cfg.cond_dim}], got {tuple(cond.shape)}")
        T = self.cfg.T
        if sampler == "ddpm" and steps not in (None, T):
            raise ValueError(f"ddpm runs all T={T} steps; got steps={steps} (use sampler='ddim')")
        B = cond.shape[0]
        param = next(self.denoiser.parameters())
        cond = cond.to(device=param.device, dtype=param.dtype)
        if x_T is None:
            x = draw_randn((B, self.cfg.d_c), param, generator)
        else:
            if x_T.shape != (B, self.cfg.d_c):
                raise ValueError(f"x_T must be [B={B}, d_c={self.cfg.d_c}], got {tuple(x_T.shape)}")
            x = x_T.to(device=param.device, dtype=param.dtype)

        return self.reverse(x, cond, sampler, self.cfg.ddim_steps if steps is None else int(steps), w, eta,
                            noise=lambda step: draw_randn(tuple(x.shape), x, generator))

    @torch.no_grad()
    def reverse(self, x_T: Tensor, cond: Tensor, sampler: str, steps: int, guidance_w: float, eta: float,
                noise: Callable[[int], Tensor]) -> Tensor:
        """The reverse process from x_T at t = T-1 down to x0_hat, in eval mode (the previous mode
        is restored). ``steps`` is the DDIM step count (ignored by DDPM); ``noise(step)`` gives
        that step's z and is only called for the steps that add noise, in sampling order."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            cond_h = self.sampling_condition(cond, guidance_w)  # g(c) once, not once per step
            T = self.cfg.T
            ts = list(range(T - 1, -1, -1)) if sampler == "ddpm" else ddim_timesteps(T, steps).tolist()
            time_h = self.sampling_times(ts, x_T)  # every step's time features in one pass
            x = x_T
            for i, step in enumerate(ts):
                eps = self.eps_at(x, cond_h, time_h[i], guidance_w, step)
                if sampler == "ddpm":
                    x = self.schedule.ddpm_step_at(x, step, eps, noise(step) if step > 0 else None)
                else:
                    prev = ts[i + 1] if i + 1 < len(ts) else -1
                    # The last jump (to abar = 1) has sigma = 0, so it never needs noise.
                    z = noise(step) if (eta > 0 and prev >= 0) else None
                    x = self.schedule.ddim_step_at(x, step, prev, eps, eta if z is not None else 0.0, z)
        finally:
            self.denoiser.train(was_training)
        return x
