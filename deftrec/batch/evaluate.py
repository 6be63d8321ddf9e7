"""Batch item embedding + FAISS index job, and batch evaluation with a report (both on Ray Data).

Index job (``run_index_job``): ``items.parquet`` -> ``map_batches`` over an actor pool whose actors
load the model once and emit each item's key in the retrieval space -> ``index/item_keys.parquet``
-> a FAISS index from the configured factory string -> ``index/manifest.json`` (factory, search
parameters, items, dim, model version, recall@10 against exact search). Idempotent: a complete
index for the same model version and config is left alone unless forced.

Evaluation job (``run_evaluation``): the split's users -> ``map_batches`` over an actor pool holding
model + index: prompt with continuous tokens, (greedy reasoning), condition, diffusion sampling,
FAISS search with and without history exclusion -> ``eval/recs.parquet``; metrics are recomputed
from those lists and put beside popularity / Markov / EASE on the same users -> ``metrics.json``,
``report.md`` and ``report.png``.

``metrics.json`` layout (stable; schema_version 1)::

    {"schema_version", "split", "users", "sampler", "steps", "seed", "k",
     "seconds": {"load", "condition", "sample", "search", "baselines", "total"},
     "coverage": fraction of the catalog in any user's top-10 (history excluded),
     "results": {"deftrec" | "popularity" | "markov" | "ease":
                 {"history_excluded" | "history_kept": {"hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20"}}},
     "model_version", "index_version", "protocol"}
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.core.config import to_dict
from deftrec.config.jobs import IndexConfig
from deftrec.retrieval.index import load_index, search
from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest, is_complete, read_manifest
from deftrec.config.jobs import EvaluateJobConfig
from deftrec.batch.report import KS, PROTOCOL, format_table
from deftrec.core.artifacts import model_version
from deftrec.batch.report import write_report



def _load_model(model_dir: str):
    from deftrec.artifacts.model import load_model

    return load_model(model_dir)


# ------------------------------------------------------------------------------------ index job


# ------------------------------------------------------------------------------------ evaluation


class BatchRecommender:
    """Ray Data actor: model + index loaded once; one call = one batch of users, every stage batched."""

    def __init__(self, model_dir: str, index_dir: str, sampler: Optional[str], steps: Optional[int],
                 seed: Optional[int], explain: bool, k: int, loader: Optional[Callable] = None):
        from deftrec.retrieval.recommender import DeftRecRecommender

        t0 = time.time()
        self.model = (loader or _load_model)(model_dir)
        self.model.eval()
        ecfg = self.model.cfg.eval
        changes = {}
        if sampler is not None:
            changes["sampler"] = sampler
        if steps is not None or sampler == "ddpm":
            changes["steps"] = steps if sampler != "ddpm" else None
        if seed is not None:
            changes["seed"] = seed
        self.rec = DeftRecRecommender(self.model, dataclasses.replace(ecfg, **changes) if changes else ecfg)
        imanifest = read_manifest(index_dir)
        self.index = load_index(index_dir, IndexConfig(**imanifest["config"]))
        self.metric = imanifest["metric"]
        self.explain, self.k = explain, k
        self.load_seconds = time.time() - t0  # reported once, with this actor's first batch

    def __call__(self, batch: dict) -> dict:
        users = np.array(batch["user"], dtype=np.int64)  # a writable copy: torch wraps it
        histories = [np.asarray(h, dtype=np.int64) for h in batch["history"]]
        t0 = time.time()
        cond, text = self.rec.conditions(histories, users=users if self.model.cfg.tokenizer.user_tokens else None,
                                         explain=self.explain)
        t1 = time.time()
        x0 = self.rec.sample(cond, users)
        query = (x0.float() / self.model.x0_scale).cpu().numpy()
        t2 = time.time()
        ex_ids, ex_sc = search(self.index, query, self.k, self.metric, exclude=histories)
        kp_ids, kp_sc = search(self.index, query, self.k, self.metric)
        t3 = time.time()
        n = len(users)
        load, self.load_seconds = self.load_seconds, 0.0
        ecfg = self.rec.cfg
        return {
            "user": users, "target": np.asarray(batch["target"], dtype=np.int64),
            "items_excluded": list(ex_ids), "scores_excluded": list(ex_sc),
            "items_kept": list(kp_ids), "scores_kept": list(kp_sc),
            "reasoning": np.array(text if text is not None else [None] * n, dtype=object),
            "seconds_condition": np.full(n, (t1 - t0) / n), "seconds_sample": np.full(n, (t2 - t1) / n),
            "seconds_search": np.full(n, (t3 - t2) / n), "seconds_load": np.full(n, load / n),
            "sampler": np.array([ecfg.sampler] * n), "steps": np.full(n, ecfg.steps if ecfg.steps else -1),
            "seed": np.full(n, ecfg.seed),
        }


def metrics_from_recs(recs: pa.Table, ks=KS) -> dict:
    """Both protocols' HR/NDCG@K recomputed from the saved top-K lists (independent of the job)."""
    from deftrec.retrieval.metrics import evaluate_topk

    targets = recs.column("target").to_numpy()
    out = {}
    for proto, col in (("history_excluded", "items_excluded"), ("history_kept", "items_kept")):
        lists = np.stack(recs.column(col).to_numpy(zero_copy_only=False)).astype(np.int64)
        m = evaluate_topk(lists, targets, ks)
        out[proto] = {f"{name}@{k}": float(m[f"{name}@{k}"]) for k in ks for name in ("hr", "ndcg")}
    return out


def _select(m: dict, ks=KS) -> dict:
    return {f"{name}@{k}": float(m[f"{name}@{k}"]) for k in ks for name in ("hr", "ndcg")}


def run_evaluation(run_dir: str | Path, cfg: EvaluateJobConfig, log: Callable = print,
                   loader: Optional[Callable] = None) -> dict:
    import ray

    from deftrec.batch.baselines import run_baselines
    from deftrec.data.samples import load_dataset
    from deftrec.core.cluster import ensure_ray

    run_dir = Path(run_dir)
    model_dir, index_dir, out = run_dir / "model", run_dir / "index", run_dir / "eval"
    for d, what in ((model_dir, "model export (pipelines.train)"), (index_dir, "index (pipelines.index)")):
        if not is_complete(d):
            raise ArtifactError(f"{d}: no complete {what}; run that stage first")
    ensure_ray()
    t_all = time.time()
    data = load_dataset(run_dir / "data")
    es = data.split(cfg.split)
    positions = np.arange(len(es)) if cfg.limit is None else np.arange(min(cfg.limit, len(es)))
    es = es.subset(positions)
    k = max(KS)
    rows = pa.table({"user": pa.array(es.users, pa.int64()),
                     "history": pa.array([h.tolist() for h in es.histories], pa.list_(pa.int64())),
                     "target": pa.array(es.targets, pa.int64())})
    log(f"[evaluate] {cfg.split}: {len(es):,} users, batch {cfg.batch_size}, {cfg.actors} actor(s)")
    with atomic_directory(out, overwrite=True) as tmp:
        ds = ray.data.from_arrow(rows).repartition(max(1, min(len(es) // cfg.batch_size, 4 * cfg.actors)))
        ds = ds.map_batches(
            BatchRecommender,
            fn_constructor_kwargs=dict(model_dir=str(model_dir), index_dir=str(index_dir), sampler=cfg.sampler,
                                       steps=cfg.steps, seed=cfg.seed, explain=cfg.explain, k=k, loader=loader),
            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor, batch_format="numpy")
        ds.write_parquet(str(tmp / "recs.parquet"))
        recs = pq.read_table(tmp / "recs.parquet").sort_by("user")
        if recs.num_rows != len(es):
            raise RuntimeError(f"evaluation produced {recs.num_rows} rows for {len(es)} users")
        seconds = {s: float(np.sum(recs.column(f"seconds_{s}").to_numpy()))
                   for s in ("load", "condition", "sample", "search")}
        results = {"deftrec": metrics_from_recs(recs)}
        t0 = time.time()
        fit = data.sequences_before(cfg.split)
        pos_in_data = np.searchsorted(data.users, es.users)
        full_hist = fit[pos_in_data]
        base = run_baselines(list(fit), list(full_hist), es.targets, data.n_items, KS)
        for name, protos in base.items():
            results[name] = {p: _select(v) for p, v in protos.items()}
        seconds["baselines"] = time.time() - t0
        top10 = np.stack(recs.column("items_excluded").to_numpy(zero_copy_only=False))[:, :10]
        coverage = float(np.unique(top10[top10 >= 0]).size / data.n_items)
        seconds["total"] = time.time() - t_all
        steps = int(recs.column("steps")[0].as_py())
        metrics = {
            "schema_version": 1, "split": cfg.split, "users": int(len(es)),
            "sampler": recs.column("sampler")[0].as_py(), "steps": steps if steps > 0 else None,
            "seed": int(recs.column("seed")[0].as_py()), "k": k,
            "seconds": {s: round(v, 3) for s, v in seconds.items()}, "coverage": coverage,
            "results": results, "model_version": model_version(model_dir),
            "index_version": read_manifest(index_dir).get("version"), "protocol": PROTOCOL,
        }
        from deftrec.core.artifacts import write_json_atomic

        write_json_atomic(tmp / "metrics.json", metrics)
        write_report(metrics, tmp)
        finish_manifest(tmp, {"kind": "evaluation", "schema_version": 1, "config": to_dict(cfg),
                              "model_version": metrics["model_version"], "index_version": metrics["index_version"]})
    log(format_table(metrics))
    return metrics


