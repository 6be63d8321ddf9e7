"""Noise schedule and sampler arithmetic of the diffusion head (method.md section 4-5).

Owns everything of DDPM/DDIM that does not depend on the denoiser: the linear-beta
:class:`NoiseSchedule` with its derived coefficients, the forward process ``q_sample``, one
reverse step of each sampler (per row and for a timestep shared by the batch), the DDIM
timestep grid :func:`ddim_timesteps`, and the generator-driven noise draws. The denoiser, the
loss and the sampling loop are in :mod:`deftrec.model.diffusion`.

Forward process (linear betas, ``abar_t = prod_{s<=t} (1 - beta_s)``, t in [0, T))::

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,      eps ~ N(0, I)

Reverse steps: DDPM ancestral (posterior mean + beta-tilde variance) and DDIM (Song et al.
2021, eq. 12), see :meth:`NoiseSchedule.ddpm_step` / :meth:`NoiseSchedule.ddim_step`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["NoiseSchedule", "ddim_timesteps", "draw_rand", "draw_randint", "draw_randn"]


# ----------------------------------------------------------------------------- helpers


def draw_randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise drawn on the generator's device, then moved next to ``like``.

    Drawing on the generator's device lets one CPU generator drive a CUDA model, and gives the
    same numbers whatever device the model lives on.
    """
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev).to(device=like.device, dtype=like.dtype)


def draw_rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def draw_randint(high: int, shape: tuple[int, ...], device: torch.device,
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

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the noise an x0 estimate implies."""
        return (x_t - self._at(self.sqrt_alpha_bar, t, x_t) * x0) / self._at(self.sqrt_one_minus_alpha_bar, t, x_t)

    def eps_from_x0_at(self, x_t: Tensor, step: int, x0: Tensor) -> Tensor:
        """:meth:`eps_from_x0` with t = ``step`` for every row."""
        abar = float(self.alpha_bar[step])
        return (x_t - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)

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
