"""deftrec.training.optim: the optimisation pieces of the training loop (:mod:`deftrec.training.worker`).

:func:`make_batch` (samples -> tokenised batch), :func:`build_optimizer` / :func:`build_scheduler`
(DeepSpeed steps them) and the progress of the steps between two log lines (:class:`LossWindow`,
:func:`step_line`).

Learning-rate schedule (per optimiser step s, W warm-up steps, S total steps, r = min_lr_ratio)::

    f(s) = (s + 1) / W                                               s < W
    f(s) = r + (1 - r) * 0.5 * (1 + cos(pi * (s - W) / max(1, S - W)))   otherwise

and each group's lr is its peak times f(s) times ``train.plateau_decay`` ** n, n the validations
without a gain so far (:class:`PlateauScale`; 1 when the decay is off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.data.samples import TrainingSamples
from deftrec.model.deftrec import DeftRec


def make_batch(model: DeftRec, samples: TrainingSamples, index: np.ndarray | slice) -> dict[str, torch.Tensor]:
    """Tokenised training batch of ``samples[index]`` (histories, targets and users)."""
    part = samples.subset(index)
    return model.make_batch(part.histories, part.targets, part.users)


def build_optimizer(model: DeftRec, cfg: DeftRecConfig) -> torch.optim.AdamW:
    """AdamW with two groups: "llm" at train.llm_lr and "heads" (tokenizers + diffusion) at train.lr."""
    groups = model.param_groups()
    t = cfg.train
    params = [{"params": groups["heads"], "lr": t.lr, "name": "heads"}]
    if groups["llm"] and t.llm_lr > 0:
        params.append({"params": groups["llm"], "lr": t.llm_lr, "name": "llm"})
    elif groups["llm"]:  # llm_lr = 0: freeze instead of carrying useless optimiser state
        for p in groups["llm"]:
            p.requires_grad_(False)
    # foreach: one fused kernel per op over all tensors (the per-tensor loop dominates small models on CPU)
    return torch.optim.AdamW(params, weight_decay=t.weight_decay, foreach=True)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay (module docstring); ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class PlateauScale:
    """The learning-rate multiplier ``decay ** plateaus``: the loops count every validation without a
    gain into ``plateaus`` (checkpointed as ``TrainerState.lr_decays``); it applies from the next step."""

    decay: float = 1.0
    plateaus: int = 0

    def __call__(self) -> float:
        return self.decay ** self.plateaus


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DeftRecConfig, total_steps: int,
                    plateau: PlateauScale | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    warmup = min(t.warmup_steps, max(0, total_steps - 1))
    scale = plateau if plateau is not None else PlateauScale()
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, t.min_lr_ratio) * scale())


#: The loss parts every training step reports.
LOSS_PARTS = ("lm", "pos", "neg", "ce", "total")


def _zero_parts() -> dict[str, float]:
    return dict.fromkeys(LOSS_PARTS, 0.0)


@dataclass
class LossWindow:
    """The optimizer steps since the last log line: summed loss parts, samples and seconds."""

    sums: dict[str, float] = field(default_factory=_zero_parts)
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    def add(self, parts: dict[str, float], samples: int, seconds: float) -> None:
        for key in LOSS_PARTS:
            self.sums[key] += parts[key]
        self.steps += 1
        self.samples += samples
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        """Loss parts averaged over the window's steps."""
        return {key: self.sums[key] / self.steps for key in LOSS_PARTS}

    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def step_line(step: int, total: int, epoch: int, parts: dict[str, float], lr: float, samples_per_s: float) -> str:
    """The log line of a training step (``parts``: the mean loss parts of the window)."""
    ce = f" ce {parts['ce']:.3f}" if parts.get("ce") else ""
    return (f"[deftrec] step {step}/{total} epoch {epoch} loss {parts['total']:.4f} (lm {parts['lm']:.3f} "
            f"pos {parts['pos']:.4f} neg {parts['neg']:.4f}{ce}) lr {lr:.2e} {samples_per_s:.1f} samples/s")
