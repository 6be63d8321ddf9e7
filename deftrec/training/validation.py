"""deftrec.training.validation: validation runs during training (one process, or sliced over Ray ranks).

:func:`evaluate` scores a validation set under both protocols; :class:`_Validator` runs it on this
rank's slice and all-reduces the metrics; :func:`primary_score` is the number checkpoints and early
stopping follow; :func:`valid_line` / :func:`early_stop_line` are the progress lines of both loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from deftrec.config.model import InferenceConfig
from deftrec.data.samples import EvalSet
from deftrec.model.deftrec import DeftRec
from deftrec.retrieval.metrics import evaluate_in_chunks, standard_errors
from deftrec.retrieval.recommender import DeftRecRecommender
from deftrec.training.dataset import shard_bounds


class _Validator:
    """Validation on this rank's slice of the fixed subset; metrics all-reduced (same on all ranks)."""

    def __init__(self, model: DeftRec, valid: EvalSet, rank: int, world: int, zero3: bool, precision: str,
                 device: torch.device) -> None:
        self.model, self.zero3, self.device = model, zero3, device
        self.bf16 = precision == "bf16" and device.type == "cuda"
        start, stop = shard_bounds(len(valid), rank, world)
        self.slice = valid.subset(np.arange(start, stop))
        bs = model.cfg.eval.batch_size
        # Under ZeRO-3 every forward gathers parameters collectively: all ranks must run the same
        # number of batches, so shorter slices run dummy batches to match the longest.
        longest = -(-len(valid) // world)
        self.extra = -(-longest // bs) - -(-len(self.slice) // bs) if zero3 else 0
        self.valid = valid

    def __call__(self) -> dict[str, dict[str, float]]:
        import torch.distributed as tdist

        m = self.model
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            # one recommender per validation on every rank: building one reads the item keys, which
            # under ZeRO-3 is a collective gather that every rank must run equally often
            rec = DeftRecRecommender(m)
            local = evaluate(m, self.slice, seed=m.cfg.eval.seed, mean_squares=True, recommender=rec)
            for _ in range(self.extra):
                rec.score_users(self.valid.exclusions[:1], self.valid.users[:1], seed=0)
        m.train()
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return {p: standard_errors(v, len(self.slice)) for p, v in local.items()}
        # Every slice is non-empty (the driver checks len(valid) >= world): same keys on every rank.
        keys = [(p, k) for p, vals in sorted(local.items()) for k in sorted(vals)]
        n = len(self.slice)
        vec = torch.tensor([n] + [local[p][k] * n for p, k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(vec)
        total = float(vec[0])
        out: dict[str, dict[str, float]] = {}
        for (p, k), v in zip(keys, vec[1:].tolist()):
            out.setdefault(p, {})[k] = v / total
        return {p: standard_errors(v, int(total)) for p, v in out.items()}


def primary_score(metrics: dict[str, dict[str, float]], exclude_history: bool) -> float:
    """Validation NDCG@10 under the primary protocol: what checkpoints and early stopping follow."""
    return metrics["history_excluded" if exclude_history else "history_kept"]["ndcg@10"]


def valid_line(step: int, metrics: dict[str, dict[str, float]]) -> str:
    """The log line of a validation (both protocols)."""
    ex, kept = metrics["history_excluded"], metrics["history_kept"]
    se = f" ± {ex['ndcg@10_se']:.4f}" if "ndcg@10_se" in ex else ""
    return (f"[deftrec] valid step {step}: HR@10 {ex['hr@10']:.4f} NDCG@10 {ex['ndcg@10']:.4f}{se} (history "
            f"excluded) | HR@10 {kept['hr@10']:.4f} NDCG@10 {kept['ndcg@10']:.4f} (kept)")


def early_stop_line(step: int, best_score: float, best_step: int | None) -> str:
    return f"[deftrec] early stop at step {step}: best NDCG@10 {best_score:.4f} at step {best_step}"


def evaluate(
    model: DeftRec,
    eval_set: EvalSet,
    ks: Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    eval_cfg: InferenceConfig | None = None,
    mean_squares: bool = False,
    recommender: DeftRecRecommender | None = None,
) -> dict[str, dict[str, float]]:
    """HR/NDCG/MRR@K of ``eval_set`` under both protocols (full catalog, see deftrec.retrieval.metrics),
    with the standard errors of HR@K and NDCG@K (``*_se``; ``mean_squares=True`` leaves the mean squares
    ``*_sq`` instead, for combining ranks).

    ``eval_cfg`` overrides the model's inference settings (sampler, steps, score...); ``recommender``
    reuses a built one (its settings then apply). Noise is keyed
    by user id, so the same users give the same numbers whatever the chunking.
    """
    ecfg = eval_cfg or model.cfg.eval
    rec = recommender if recommender is not None else DeftRecRecommender(model, ecfg)
    ks = tuple(ks or ecfg.k)
    bs = batch_size or ecfg.batch_size

    # the model reads the whole history before the target (its prompt the newest prompt.max_history
    # items), and the ranking excludes all of it
    def score_fn(positions: np.ndarray) -> np.ndarray:
        return rec.score_users(eval_set.exclusions[positions], eval_set.users[positions], seed=seed, batch_size=bs)

    raw = evaluate_in_chunks(score_fn, np.arange(len(eval_set)), eval_set.targets, eval_set.exclusions, bs, ks,
                             with_se=True)
    return raw if mean_squares else {p: standard_errors(v, len(eval_set)) for p, v in raw.items()}
