"""In-process DeftRec training: LightGCN -> DeftRec -> AdamW loop with validation.

The pieces are separate so the Ray Train loop can reuse them: :func:`make_batch` (samples ->
tokenised batch), :func:`build_optimizer` / :func:`build_scheduler`, :func:`train_step` (one
optimiser step over a list of micro-batches: accumulate, clip, step) and :func:`evaluate` (both
protocols through :func:`deftrec.metrics.evaluate_in_chunks`). :func:`train_local` is the flat
single-process loop around them.

Learning-rate schedule (per optimiser step s, W warm-up steps, S total steps, r = min_lr_ratio)::

    f(s) = (s + 1) / W                                               s < W
    f(s) = r + (1 - r) * 0.5 * (1 + cos(pi * (s - W) / max(1, S - W)))   otherwise

and each group's lr is its peak times f(s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.core.config import to_dict
from deftrec.data.samples import PreprocessedData, build_training_samples, load_dataset, training_pairs
from deftrec.model.deftrec import DeftRec, DeftRecTask
from deftrec.model.lightgcn import train_lightgcn
from deftrec.training.optim import build_optimizer
from deftrec.training.optim import build_scheduler
from deftrec.training.validation import evaluate
from deftrec.training.optim import make_batch
from deftrec.training.optim import train_step
from deftrec.core.log import Log

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit_collab",
    "lr_factor",
    "make_batch",
    "train_local",
    "train_step",
]



def fit_collab(cfg: DeftRecConfig, data: PreprocessedData, log: Log | None = print) -> tuple[np.ndarray, np.ndarray, list]:
    """LightGCN on the training sequences only (s[:-2]); early stopping on validation HR@10."""
    users, items = training_pairs(data)
    v = data.valid
    return train_lightgcn(users, items, data.n_users, data.n_items, cfg.collab,
                          valid=(v.users, list(v.histories), v.targets), log=log)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _primary(metrics: dict[str, dict[str, float]], exclude_history: bool) -> float:
    return metrics["history_excluded" if exclude_history else "history_kept"]["ndcg@10"]


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
    say = log if log is not None else (lambda s: None)
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

    samples = build_training_samples(data.train_sequences, data.users, t.min_history, t.max_samples_per_user,
                                     cfg.prompt.max_history)
    if len(samples) == 0:
        raise ValueError(f"no training samples: every training sequence is shorter than train.min_history+1 "
                         f"({t.min_history + 1})")
    valid = data.valid.sample(t.valid_users, t.seed)
    per_step = t.batch_size * t.grad_accum
    steps_per_epoch = -(-len(samples) // per_step)
    total = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    validate_every = t.validate_every or steps_per_epoch
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    gen = torch.Generator().manual_seed(t.seed)
    n_llm = sum(p.numel() for p in model.param_groups()["llm"] if p.requires_grad)
    n_heads = sum(p.numel() for p in model.param_groups()["heads"])
    say(f"[deftrec] {len(samples):,} samples, {len(valid):,} validation users, {total:,} steps "
        f"({steps_per_epoch:,}/epoch, {per_step} samples/step); trainable: llm {n_llm:,}, heads {n_heads:,}")

    history: dict = {"collab": collab_hist, "train": [], "valid": [], "best": None}
    best_score, best_state, bad = -1.0, None, 0
    step, t_train = 0, time.perf_counter()
    win = {"lm": 0.0, "pos": 0.0, "neg": 0.0, "total": 0.0, "n": 0, "samples": 0, "t": time.perf_counter()}
    stop = False
    model.train()
    for epoch in range(t.epochs):
        order = np_rng.permutation(len(samples))
        for s in range(0, len(order), per_step):
            idx = order[s:s + per_step]
            micro = [make_batch(model, samples, idx[j:j + t.batch_size]) for j in range(0, len(idx), t.batch_size)]
            parts = train_step(task, micro, opt, sched, t.grad_clip, gen)
            step += 1
            for key in ("lm", "pos", "neg", "total"):
                win[key] += parts[key]
            win["n"] += 1
            win["samples"] += len(idx)
            if step % t.log_every == 0 or step == total:
                dt = max(time.perf_counter() - win["t"], 1e-9)
                rec = {"step": step, "epoch": epoch + 1, **{k: win[k] / win["n"] for k in ("lm", "pos", "neg", "total")},
                       "lr": sched.get_last_lr()[0], "samples_per_s": win["samples"] / dt}
                history["train"].append(rec)
                say(f"[deftrec] step {step}/{total} epoch {epoch + 1} loss {rec['total']:.4f} (lm {rec['lm']:.3f} "
                    f"pos {rec['pos']:.4f} neg {rec['neg']:.4f}) lr {rec['lr']:.2e} {rec['samples_per_s']:.1f} samples/s")
                win.update(lm=0.0, pos=0.0, neg=0.0, total=0.0, n=0, samples=0, t=time.perf_counter())
            if step % validate_every == 0 or step == total:
                tv = time.perf_counter()
                metrics = evaluate(model, valid, seed=cfg.eval.seed)
                model.train()
                score = _primary(metrics, cfg.eval.exclude_history)
                history["valid"].append({"step": step, "epoch": epoch + 1, **metrics,
                                         "seconds": time.perf_counter() - tv})
                ex, kept = metrics["history_excluded"], metrics["history_kept"]
                say(f"[deftrec] valid step {step}: HR@10 {ex['hr@10']:.4f} NDCG@10 {ex['ndcg@10']:.4f} (history "
                    f"excluded) | HR@10 {kept['hr@10']:.4f} NDCG@10 {kept['ndcg@10']:.4f} (kept)")
                if score > best_score:
                    best_score, best_state, bad = score, _trainable_state(model), 0
                    history["best"] = {"step": step, "ndcg@10": score}
                else:
                    bad += 1
                    if t.patience is not None and bad >= t.patience:
                        say(f"[deftrec] early stop at step {step}: best NDCG@10 {best_score:.4f} "
                            f"at step {history['best']['step']}")
                        stop = True
            if stop or step >= total:
                stop = True
                break
        if stop:
            break
    timings["train"] = time.perf_counter() - t_train
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    history["seconds"] = timings
    if out_dir is not None:
        _save(model, cfg, history, Path(out_dir), step)
    return model, history


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
