"""Diffusion head of DeftRec (method.md sections 4 and 5, sampling part).

The head learns a conditional denoiser ``eps_theta(x_t, c, t)`` over the collaborative
item-embedding space (``d_c``) and, at inference, turns a condition vector ``c`` (pooled LLM
state) into an embedding ``x0_hat`` that is then matched against the item table.

Forward process (linear betas, ``abar_t = prod_{s<=t} (1 - beta_s)``, t in [0, T))::

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,      eps ~ N(0, I)

Training loss per sample i (errors are *means over the d_c dimensions*, i.e. MSE)::

    e_pos_i = mean_d (eps_theta(x_t_i,  c_i, t_i) - eps_i)^2
    e_neg_i = mean_d (eps_theta(x_t-_i, c_i, t_i) - eps_i)^2      (x0-_i = mean of n_neg items,
                                                                  same t_i and eps_i)
    L_pos   = mean_i e_pos_i
    L_neg   = mean_i -log sigmoid(e_neg_i - e_pos_i)
    L       = L_pos + lambda_neg * L_neg

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
from deftrec.config.components import DiffusionConfig
from deftrec.config.components import _SAMPLERS

__all__ = [
    "DiffusionConfig",
    "NoiseSchedule",
    "Denoiser",
    "DiffusionHead",
    "ddim_timesteps",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------- helpers


def _draw_randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise drawn on the generator's device, then moved next to ``like``.

    Drawing on the generator's device lets one CPU generator drive a CUDA model, and gives the
    same numbers whatever device the model lives on.
    """
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev).to(device=like.device, dtype=like.dtype)


def _draw_rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def _draw_randint(high: int, shape: tuple[int, ...], device: torch.device,
                  generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=dev).to(device)


def ddim_timesteps(T: int, steps: int) -> Tensor:
    """S = ``steps`` evenly spaced timesteps from T-1 down to 0 (inclusive), strictly decreasing.

    ``round(linspace(T-1, 0, S))``: the spacing (T-1)/(S-1) >= 1 when S <= T, so rounding keeps
    them distinct. S = 1 gives [T-1] (a single jump straight to x0).
    """
    if not (1 <= steps <= T):
        raise ValueError(f"DDIM steps must be in [1, T={T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim]: [sin(t w_k), cos(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


# ----------------------------------------------------------------------------- schedule


class NoiseSchedule(nn.Module):
    """Linear-beta DDPM schedule with all derived coefficients as (non-persistent) buffers.

    ``beta_t = linspace(beta_start, beta_end, T)``, ``alpha_t = 1 - beta_t``,
    ``abar_t = prod_{s<=t} alpha_s``, ``abar_{-1} = 1``. Posterior q(x_{t-1} | x_t, x0)::

        mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) * x0
             + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) * x_t
        var  = beta_t (1 - abar_{t-1}) / (1 - abar_t)            (0 at t = 0)

    Buffers are kept in float64 even when the owning model is cast to bf16/fp16 (mixed-precision
    engines cast every floating buffer): 1 - abar_0 = 1e-4 is not representable next to 1 in
    bf16. Coefficients are cast to the data's dtype when used. The buffers are derived from the
    config, so they are not stored in state dicts.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__()
        if T < 1 or not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(f"invalid schedule: T={T}, beta_start={beta_start}, beta_end={beta_end}")
        self.T = int(T)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self._build(torch.device("cpu"))

    def _build(self, device: torch.device) -> None:
        betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64, device=device)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        bufs = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": abar,
            "alpha_bar_prev": abar_prev,
            "sqrt_alpha_bar": abar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - abar).sqrt(),
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
            "posterior_mean_coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef_xt": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        for name, value in bufs.items():
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Let .to()/.cuda() move the buffers, then rebuild them in float64 on the new device so
        # a dtype cast of the parent model never degrades the schedule.
        super()._apply(fn, recurse)
        self._build(self.betas.device)
        return self

    # -- coefficient lookup
    def _at(self, buf: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """buf[t] as a [B, 1] column in ``like``'s dtype/device (t: LongTensor [B])."""
        return buf.to(like.device)[t.to(like.device)].to(like.dtype).unsqueeze(-1)

    def _abar_prev_of(self, t_prev: Tensor, like: Tensor) -> Tensor:
        """abar at t_prev, with abar_{-1} = 1 (t_prev = -1 means 'jump to x0')."""
        tp = t_prev.to(like.device)
        vals = self.alpha_bar.to(like.device)[tp.clamp(min=0)]
        vals = torch.where(tp < 0, torch.ones_like(vals), vals)
        return vals.to(like.dtype).unsqueeze(-1)

    # -- forward process
    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, eps [B, d], t LongTensor [B]."""
        if x0.shape != eps.shape or x0.dim() != 2 or t.shape != (x0.shape[0],):
            raise ValueError(f"q_sample expects x0, eps [B, d] and t [B], got {tuple(x0.shape)}, "
                             f"{tuple(eps.shape)}, {tuple(t.shape)}")
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    # -- reverse process pieces
    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (inverse of q_sample)."""
        return (x_t - self._at(self.sqrt_one_minus_alpha_bar, t, x_t) * eps) / self._at(self.sqrt_alpha_bar, t, x_t)

    def ddpm_step(self, x_t: Tensor, t: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """One ancestral step x_t -> x_{t-1}: posterior mean (x0 from eps) + sigma_t z, sigma_t^2 =
        posterior variance (beta tilde). No noise is added where t = 0 (its variance is 0)."""
        x0_hat = self.predict_x0(x_t, t, eps)
        mean = self._at(self.posterior_mean_coef_x0, t, x_t) * x0_hat + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        if noise is None:
            return mean
        sigma = self._at(self.posterior_variance, t, x_t).clamp(min=0).sqrt()
        return mean + sigma * noise

    def ddim_step(self, x_t: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor, eta: float = 0.0,
                  noise: Tensor | None = None) -> Tensor:
        """DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12); t_prev = -1 means abar = 1::

            x0_hat = predict_x0(x_t, t, eps)
            sigma  = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
            x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z

        ``noise`` (z) is only needed when eta > 0.
        """
        abar_t = self._at(self.alpha_bar, t, x_t)
        abar_prev = self._abar_prev_of(t_prev, x_t)
        x0_hat = self.predict_x0(x_t, t, eps)
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).clamp(min=0).sqrt()
        dir_coef = (1.0 - abar_prev - sigma**2).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt() * x0_hat + dir_coef * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            x_prev = x_prev + sigma * noise
        return x_prev

    # -- the same steps for a timestep shared by the whole batch (samplers). The coefficients are
    # Python floats computed in float64, so a step is two or three tensor ops instead of a dozen
    # per-row lookups and casts: at serving batch sizes those small ops dominated the sampler.
    def ddpm_step_at(self, x_t: Tensor, step: int, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """:meth:`ddpm_step` with t = ``step`` for every row."""
        abar = float(self.alpha_bar[step])
        s, s1 = math.sqrt(abar), math.sqrt(1.0 - abar)
        c0, ct = float(self.posterior_mean_coef_x0[step]), float(self.posterior_mean_coef_xt[step])
        # mean = c0 * (x_t - s1 eps) / s + ct * x_t
        x = torch.add(x_t * (c0 / s + ct), eps, alpha=-(c0 * s1 / s))
        if noise is None:
            return x
        return torch.add(x, noise, alpha=math.sqrt(max(float(self.posterior_variance[step]), 0.0)))

    def ddim_step_at(self, x_t: Tensor, step: int, prev: int, eps: Tensor, eta: float = 0.0,
                     noise: Tensor | None = None) -> Tensor:
        """:meth:`ddim_step` with t = ``step`` and t_prev = ``prev`` (-1: abar = 1) for every row."""
        abar = float(self.alpha_bar[step])
        abar_prev = float(self.alpha_bar[prev]) if prev >= 0 else 1.0
        sigma = eta * math.sqrt(max((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev), 0.0))
        dir_coef = math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0))
        r = math.sqrt(abar_prev / abar)
        # sqrt(abar_prev) * (x_t - sqrt(1 - abar) eps) / sqrt(abar) + dir_coef * eps
        x = torch.add(x_t * r, eps, alpha=dir_coef - r * math.sqrt(1.0 - abar))
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            x = torch.add(x, noise, alpha=sigma)
        return x


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
        self.time_dim = cfg.time_dim
        h = cfg.hidden
        self.in_proj = nn.Linear(cfg.d_c, h)
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
        return self.cond_proj(cond)

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

    def eps_at(self, x_t: Tensor, cond_h: Tensor, time_h: Tensor, guidance_w: float = 0.0) -> Tensor:
        """:meth:`guided_eps` for one timestep shared by every row, from ``sampling_condition``'s
        output and that step's row of ``sampling_times`` ([1, hidden] or [hidden])."""
        if guidance_w == 0.0:
            return self.denoiser.trunk(x_t, cond_h, time_h)
        B = x_t.shape[0]
        out = self.denoiser.trunk(torch.cat([x_t, x_t]), cond_h, time_h)
        return (1.0 + guidance_w) * out[:B] - guidance_w * out[B:]

    def guided_eps(self, x_t: Tensor, cond: Tensor, t: Tensor, guidance_w: float = 0.0) -> Tensor:
        """eps = (1 + w) f(x_t, c, t) - w f(x_t, null, t); one batched [2B] call when w != 0."""
        if guidance_w == 0.0:
            return self.denoiser(x_t, cond, t)
        B = x_t.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=x_t.device),
                          torch.ones(B, dtype=torch.bool, device=x_t.device)])
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([cond, cond]), torch.cat([t, t]), drop)
        e_cond, e_null = out[:B], out[B:]
        return (1.0 + guidance_w) * e_cond - guidance_w * e_null

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

        Returns: dict(loss, pos, neg).
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
        t = _draw_randint(self.cfg.T, (B,), dev, generator)
        eps = _draw_randn(tuple(x0.shape), x0, generator)
        drop = None
        if self.training and self.cfg.cond_dropout > 0:
            drop = _draw_rand((B,), dev, generator) < self.cfg.cond_dropout

        use_neg = neg_x0 is not None and self.cfg.lambda_neg > 0
        x_t = self.schedule.q_sample(x0, t, eps)
        if use_neg:
            # Same t and eps for the negative; both halves in one batched call of 2B rows.
            x_t_neg = self.schedule.q_sample(neg_x0.to(x0.dtype), t, eps)
            pred = self.denoiser(torch.cat([x_t, x_t_neg]), torch.cat([cond, cond]), torch.cat([t, t]),
                                 None if drop is None else torch.cat([drop, drop]))
            assert pred.shape == (2 * B, self.cfg.d_c), pred.shape
            err = (pred.float() - torch.cat([eps, eps]).float()).pow(2).mean(dim=1)
            pos, neg_err = err[:B], err[B:]
            # -log sigmoid(e_neg - e_pos): small when the negative is denoised worse than the positive.
            neg = F.softplus(pos - neg_err)
        else:
            pred = self.denoiser(x_t, cond, t, drop)
            assert pred.shape == x0.shape, pred.shape
            pos = (pred.float() - eps.float()).pow(2).mean(dim=1)
            neg = torch.zeros_like(pos)
        assert pos.shape == (B,) and neg.shape == (B,)
        total = pos + self.cfg.lambda_neg * neg
        if reduction == "none":
            return {"loss": total, "pos": pos, "neg": neg}
        return {"loss": total.mean(), "pos": pos.mean(), "neg": neg.mean()}

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
            idx = _draw_randint(N, (batch_size, n_neg), dev, generator)
        else:
            if exclude.shape != (batch_size,):
                raise ValueError(f"exclude must be [batch_size={batch_size}], got {tuple(exclude.shape)}")
            if N < 2:
                raise ValueError("cannot exclude the positive from a catalog of fewer than 2 items")
            ex = exclude.to(dev).long()[:, None]
            idx = _draw_randint(N - 1, (batch_size, n_neg), dev, generator)
            idx = idx + (idx >= ex).long()
        return item_table[idx].mean(dim=1)

    # -- inference
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
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {_SAMPLERS}, got {sampler!r}")
        if cond.dim() != 2 or cond.shape[1] != self.cfg.cond_dim:
            raise ValueError(f"cond must be [B, cond_dim={self.cfg.cond_dim}], got {tuple(cond.shape)}")
        T = self.cfg.T
        if sampler == "ddpm" and steps not in (None, T):
            raise ValueError(f"ddpm runs all T={T} steps; got steps={steps} (use sampler='ddim')")
        B = cond.shape[0]
        param = next(self.denoiser.parameters())
        cond = cond.to(device=param.device, dtype=param.dtype)
        if x_T is None:
            x = _draw_randn((B, self.cfg.d_c), param, generator)
        else:
            if x_T.shape != (B, self.cfg.d_c):
                raise ValueError(f"x_T must be [B={B}, d_c={self.cfg.d_c}], got {tuple(x_T.shape)}")
            x = x_T.to(device=param.device, dtype=param.dtype)

        return self.reverse(x, cond, sampler, self.cfg.ddim_steps if steps is None else int(steps), w, eta,
                            noise=lambda step: _draw_randn(tuple(x.shape), x, generator))

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
                eps = self.eps_at(x, cond_h, time_h[i], guidance_w)
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
