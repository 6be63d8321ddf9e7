"""In-process DeftRec training: LightGCN -> DeftRec -> AdamW loop with validation.

:func:`train_local` is the single-process counterpart of the Ray Train loop
(:mod:`deftrec.training.worker`) and uses the same pieces: :func:`~deftrec.training.optim.make_batch`,
:func:`~deftrec.training.optim.build_optimizer` / :func:`~deftrec.training.optim.build_scheduler`
(the learning-rate schedule is documented in :mod:`deftrec.training.optim`),
:func:`~deftrec.training.optim.train_step`, :func:`~deftrec.training.validation.evaluate`, the
progress lines, and the one step planner :func:`~deftrec.training.dataset.plan_steps` (one rank,
keeping each epoch's last, incomplete step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.core.config import to_dict
from deftrec.core.log import Log, writer
from deftrec.data.samples import (
    EvalSet,
    PreprocessedData,
    TrainingSamples,
    build_training_samples,
    sample_options,
    load_dataset,
    training_pairs,
)
from deftrec.model.deftrec import DeftRec, DeftRecTask
from deftrec.training.dataset import plan_steps
from deftrec.training.lightgcn import train_lightgcn
from deftrec.training.optim import (
    LossWindow,
    build_optimizer,
    PlateauScale,
    build_scheduler,
    make_batch,
    step_line,
    train_step,
)
from deftrec.training.validation import (
    early_stop_line,
    evaluate,
    primary_score,
    valid_line,
)

__all__ = ["fit_collab", "train_local"]


def fit_collab(cfg: DeftRecConfig, data: PreprocessedData, log: Log | None = print) -> tuple[np.ndarray, np.ndarray, list]:
    """LightGCN on the training sequences only (s[:-2]); early stopping on validation HR@10."""
    users, items = training_pairs(data)
    v = data.valid
    return train_lightgcn(users, items, data.n_users, data.n_items, cfg.collab,
                          valid=(v.users, list(v.histories), v.targets), log=log)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def train_local(
    cfg: DeftRecConfig,
    data_dir: str | Path | PreprocessedData,
    out_dir: str | Path | None = None,
    log: Log | None = print,
    collab: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[DeftRec, dict]:
    """Train DeftRec in this process and return (model with the best validation state, history).

    Args:
        cfg: the full config (``train`` drives this loop, ``eval`` the validation runs).
        data_dir: a preprocessed directory, or an already loaded :class:`PreprocessedData`.
        out_dir: if given, ``checkpoint.pt`` (trainable state of the best model, E/U buffers,
            config, step), ``history.json`` and ``config.json`` are written there.
        collab: precomputed (U, E) to skip the LightGCN stage.

    History: {"collab": [...], "train": [per log line], "valid": [per validation], "best": {...},
    "seconds": {...}}. Validation uses a fixed subset of ``train.valid_users`` users and selects
    the state with the best NDCG@10 under the primary protocol (``eval.exclude_history``).
    """
    t = cfg.train
    data = data_dir if isinstance(data_dir, PreprocessedData) else load_dataset(data_dir)
    timings: dict[str, float] = {}
    torch.manual_seed(t.seed)
    np_rng = np.random.default_rng(t.seed)

    t0 = time.perf_counter()
    collab_hist: list = []
    if collab is None:
        U, E, collab_hist = fit_collab(cfg, data, log=log)
    else:
        U, E = collab
    timings["collab"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = DeftRec.from_config(cfg, E, U if cfg.tokenizer.user_tokens else None, data.catalog)
    model.to(torch.device(t.device))
    cfg = model.cfg  # d_llm filled in
    task = DeftRecTask(model)
    timings["build"] = time.perf_counter() - t0

    samples = build_training_samples(data.train_sequences, data.users, **sample_options(cfg))
    if len(samples) == 0:
        raise ValueError(f"no training samples: every training sequence is shorter than train.min_history+1 "
                         f"({t.min_history + 1})")
    valid = data.valid.sample(t.valid_users, t.seed)
    history: dict = {"collab": collab_hist, "train": [], "valid": [], "best": None}
    t0 = time.perf_counter()
    progress = _fit(model, task, cfg, samples, valid, np_rng, history, writer(log))
    timings["train"] = time.perf_counter() - t0
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state, strict=False)
    model.eval()
    history["seconds"] = timings
    if out_dir is not None:
        _save(model, cfg, history, Path(out_dir), progress.step)
    return model, history


@dataclass
class _Progress:
    """The local loop's bookkeeping: steps done, the log window, the best validated state, patience."""

    step: int = 0
    window: LossWindow = field(default_factory=LossWindow)
    best_score: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    bad: int = 0
    plateau: PlateauScale = field(default_factory=PlateauScale)


def _fit(model: DeftRec, task: DeftRecTask, cfg: DeftRecConfig, samples: TrainingSamples, valid: EvalSet,
         np_rng: np.random.Generator, history: dict, say: Log) -> _Progress:
    """Epochs of optimizer steps over shuffled samples, until the step budget or early stopping."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum
    steps_per_epoch, total = plan_steps(len(samples), t, world_size=1, drop_last=False)
    validate_every = t.validate_every or steps_per_epoch
    opt = build_optimizer(model, cfg)
    p = _Progress(plateau=PlateauScale(t.plateau_decay))
    sched = build_scheduler(opt, cfg, total, p.plateau)
    gen = torch.Generator().manual_seed(t.seed)
    n_llm = sum(p.numel() for p in model.param_groups()["llm"] if p.requires_grad)
    n_heads = sum(p.numel() for p in model.param_groups()["heads"])
    say(f"[deftrec] {len(samples):,} samples, {len(valid):,} validation users, {total:,} steps "
        f"({steps_per_epoch:,}/epoch, {per_step} samples/step); trainable: llm {n_llm:,}, heads {n_heads:,}")
    mark = time.perf_counter()  # samples/s: wall time since the last log line (validations included)
    model.train()
    for epoch in range(1, t.epochs + 1):
        order = np_rng.permutation(len(samples))
        for s in range(0, len(order), per_step):
            idx = order[s:s + per_step]
            micro = [make_batch(model, samples, idx[j:j + t.batch_size]) for j in range(0, len(idx), t.batch_size)]
            parts = train_step(task, micro, opt, sched, t.grad_clip, gen)
            p.step += 1
            now = time.perf_counter()
            p.window.add(parts, len(idx), now - mark)
            mark = now
            if p.step % t.log_every == 0 or p.step == total:
                rec = {"step": p.step, "epoch": epoch, **p.window.means(), "lr": sched.get_last_lr()[0],
                       "samples_per_s": p.window.samples_per_s()}
                history["train"].append(rec)
                say(step_line(p.step, total, epoch, rec, rec["lr"], rec["samples_per_s"]))
                p.window = LossWindow()
            stop = False
            if p.step % validate_every == 0 or p.step == total:
                stop = _validate(model, valid, cfg, p, epoch, history, say)
            if stop or p.step >= total:
                return p
    return p


def _validate(model: DeftRec, valid: EvalSet, cfg: DeftRecConfig, p: _Progress, epoch: int, history: dict,
              say: Log) -> bool:
    """Validate, keep the best state; whether patience ran out."""
    tv = time.perf_counter()
    metrics = evaluate(model, valid, seed=cfg.eval.seed)
    model.train()
    score = primary_score(metrics, cfg.eval.exclude_history)
    history["valid"].append({"step": p.step, "epoch": epoch, **metrics, "seconds": time.perf_counter() - tv})
    say(valid_line(p.step, metrics))
    if score > p.best_score:
        p.best_score, p.best_state, p.bad = score, _trainable_state(model), 0
        history["best"] = {"step": p.step, "ndcg@10": score}
        return False
    p.bad += 1
    p.plateau.plateaus += 1
    patience = cfg.train.patience
    if patience is not None and p.bad >= patience:
        say(early_stop_line(p.step, p.best_score, history["best"]["step"]))
        return True
    return False


def _save(model: DeftRec, cfg: DeftRecConfig, history: dict, out: Path, step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = _trainable_state(model)
    for name in ("item_emb", "x0_scale", "user_emb", "user_scale"):
        buf = getattr(model, name)
        if buf is not None:
            state[name] = buf.detach().cpu()
    tmp = out / ".checkpoint.pt.tmp"
    torch.save({"model": state, "config": to_dict(cfg), "step": step}, tmp)
    tmp.replace(out / "checkpoint.pt")  # atomic: a crash never leaves a half-written checkpoint
    (out / "history.json").write_text(json.dumps(history, indent=2, default=float))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
