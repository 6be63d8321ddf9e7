"""Batch evaluation on Ray Data: recommendations for a split's users, metrics beside the
baselines, and a report.

Evaluation job (``run_evaluation``): the split's users -> ``map_batches`` over an actor pool holding
model + index: prompt with continuous tokens, (greedy reasoning), condition, diffusion sampling,
FAISS search with and without history exclusion -> ``eval/recs.parquet``; metrics are recomputed
from those lists and put beside popularity / Markov / EASE / SASRec on the same users (each baseline in
its own Ray task, so one that crashes ends alone) -> ``metrics.json``,
``report.md`` and ``report.png``.

``metrics.json`` layout (stable; schema_version 1)::

    {"schema_version", "split", "users", "sampler", "steps", "seed", "k",
     "seconds": {"load", "condition", "sample", "search", "baselines", "total"},
     "coverage": fraction of the catalog in any user's top-10 (history excluded),
     "results": {"deftrec" | "popularity" | "markov" | "ease" | "sasrec":
                 {"history_excluded" | "history_kept": {"hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20",
                                                        and each with its standard error "<metric>_se"}}},
     "baselines_not_run": {name: reason} (a baseline that crashed, ran out of memory or time),
     "model_version", "index_version", "protocol"}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.artifacts.served import load_version
from deftrec.batch.report import KS, PROTOCOL, write_report
from deftrec.config.jobs import EvaluateJobConfig
from deftrec.core.artifacts import (
    ArtifactError,
    artifact_id,
    artifact_version,
    atomic_directory,
    finish_manifest,
    is_complete,
    read_manifest,
    stage_fingerprint,
    up_to_date,
    write_json_atomic,
)
from deftrec.core.config import to_dict


class BatchRecommender:
    """Ray Data actor: one loaded version (model + index); one call = one batch of users through
    the shared retrieval path, searched with and without history exclusion."""

    def __init__(self, model_dir: str, index_dir: str, sampler: Optional[str], steps: Optional[int],
                 seed: Optional[int], explain: bool, k: int, loader: Optional[Callable] = None):
        self.version = load_version(model_dir, index_dir, loader=loader, sampler=sampler, steps=steps, seed=seed)
        self.explain, self.k = explain, k
        self.load_seconds = self.version.load_seconds  # reported once, with this actor's first batch

    def __call__(self, batch: dict) -> dict:
        v = self.version
        users = np.array(batch["user"], dtype=np.int64)  # a writable copy: torch wraps it
        # the whole history before the target: what the model reads (its prompt the newest
        # prompt.max_history items) and what the history-excluded ranking leaves out
        histories = [np.asarray(h, dtype=np.int64) for h in batch["history"]]
        q = v.recommender.queries(histories, users=users if v.needs_user_ids else None, keys=users,
                                  explain=self.explain)
        t0 = time.perf_counter()
        ex_ids, ex_sc = v.searcher.search(q.vectors, self.k, exclude=histories)
        kp_ids, kp_sc = v.searcher.search(q.vectors, self.k)
        t_search = time.perf_counter() - t0
        n = len(users)
        load, self.load_seconds = self.load_seconds, 0.0
        ecfg = v.recommender.cfg
        text = q.reasoning
        return {
            "user": users, "target": np.asarray(batch["target"], dtype=np.int64),
            "items_excluded": list(ex_ids), "scores_excluded": list(ex_sc),
            "items_kept": list(kp_ids), "scores_kept": list(kp_sc),
            "reasoning": np.array(text if text is not None else [None] * n, dtype=object),
            "seconds_condition": np.full(n, q.seconds["condition"] / n),
            "seconds_sample": np.full(n, q.seconds["sample"] / n),
            "seconds_search": np.full(n, t_search / n), "seconds_load": np.full(n, load / n),
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
        out[proto] = _select(evaluate_topk(lists, targets, ks, with_se=True), ks)
    return out


def _select(m: dict, ks=KS) -> dict:
    """HR@K and NDCG@K with their standard errors (``*_se``) of one model under one protocol."""
    return {f"{name}@{k}{se}": float(m[f"{name}@{k}{se}"]) for k in ks for name in ("hr", "ndcg")
            for se in ("", "_se") if f"{name}@{k}{se}" in m}


def evaluation_fingerprint(run_dir: str | Path, cfg: EvaluateJobConfig) -> str:
    """The evaluation stage's identity: its config and the data, model and index it reads."""
    run_dir = Path(run_dir)
    return stage_fingerprint(to_dict(cfg), {name: artifact_id(run_dir / d) for name, d in
                                            (("data", "data"), ("model", "model"), ("index", "index"))})


def _user_rows(es) -> pa.Table:
    """One row per user: the ``history`` (the whole sequence before the target: what the model reads,
    its prompt the newest ``prompt.max_history`` items, and what every model leaves out of its
    ranking) and the ``target``."""
    return pa.table({"user": pa.array(es.users, pa.int64()),
                     "history": pa.array([h.tolist() for h in es.exclusions], pa.list_(pa.int64())),
                     "target": pa.array(es.targets, pa.int64())})


def evaluation_actors(cfg: EvaluateJobConfig, n_users: int, cluster: dict[str, float]) -> int:
    """The scoring actors: ``cfg.actors``, or (null) as many as the cluster's GPUs hold at
    ``gpus_per_actor`` each, else its CPUs at ``cpus_per_actor`` each less one CPU for Ray Data's
    own tasks; at least one, at most one per batch of users."""
    if cfg.actors is not None:
        return cfg.actors
    if cfg.gpus_per_actor > 0:
        fit = int(cluster.get("GPU", 0.0) // cfg.gpus_per_actor)
    else:
        fit = int((cluster.get("CPU", 1.0) - 1.0) // cfg.cpus_per_actor)
    return max(1, min(fit, -(-n_users // cfg.batch_size)))


def _recommend_users(rows: pa.Table, run_dir: Path, cfg: EvaluateJobConfig, out: Path,
                     loader: Optional[Callable]) -> pa.Table:
    """DeftRec's top-K lists for every row (Ray Data actor pool), written to ``out/recs.parquet``."""
    import ray

    n = rows.num_rows
    actors = evaluation_actors(cfg, n, ray.cluster_resources())
    ds = ray.data.from_arrow(rows).repartition(max(1, min(n // cfg.batch_size, 4 * actors)))
    ds = ds.map_batches(
        BatchRecommender,
        fn_constructor_kwargs=dict(model_dir=str(run_dir / "model"), index_dir=str(run_dir / "index"),
                                   sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed, explain=cfg.explain,
                                   k=max(KS), loader=loader),
        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor, batch_format="numpy")
    ds.write_parquet(str(out / "recs.parquet"))
    recs = pq.read_table(out / "recs.parquet").sort_by("user")
    if recs.num_rows != n:
        raise RuntimeError(f"evaluation produced {recs.num_rows} rows for {n} users")
    return recs


def _baseline_results(data, es, split: str, cfg: EvaluateJobConfig, log: Callable,
                      models: Optional[dict] = None) -> tuple[dict, dict[str, str]]:
    """The baselines on the same users: fit on every user's sequence before the split's target,
    scored with each user's whole sequence before the target, which is also what they exclude
    (the same ``es.exclusions`` DeftRec excludes). Each runs in its own Ray task; returns (results,
    ``{name: reason}`` of those that did not finish)."""
    from deftrec.batch.baselines import run_baselines_isolated
    from deftrec.batch.registry import baseline_factories

    fit = data.sequences_before(split)
    if models is None:
        models = baseline_factories(cfg.baselines, cfg.sasrec)
    base, not_run = run_baselines_isolated(models, list(fit), list(es.exclusions), es.targets, data.n_items, KS,
                                           timeout_s=cfg.baseline_timeout_s, gpus={"sasrec": cfg.gpus_per_actor},
                                           log=log)
    return {name: {p: _select(v) for p, v in protos.items()} for name, protos in base.items()}, not_run


def run_evaluation(run_dir: str | Path, cfg: EvaluateJobConfig, log: Callable = print,
                   loader: Optional[Callable] = None, force: bool = False, baselines: Optional[dict] = None) -> dict:
    """Evaluate ``run_dir/model`` (with ``run_dir/index``) on ``cfg.split`` into ``run_dir/eval``.

    Skipped, returning the stored metrics, when ``run_dir/eval`` is up to date for the same config,
    data, model and index (``force`` re-evaluates). ``baselines``: unfitted models by name to report
    instead of the registry's ``cfg.baselines`` (your own, with the same ``fit``/``score`` protocol).
    A baseline that does not finish is listed in ``metrics["baselines_not_run"]`` with the reason.
    """
    from deftrec.core.cluster import ensure_ray
    from deftrec.data.samples import load_dataset

    run_dir = Path(run_dir)
    model_dir, index_dir, out = run_dir / "model", run_dir / "index", run_dir / "eval"
    for d, what in ((model_dir, "model export (pipelines.train)"), (index_dir, "index (pipelines.index)")):
        if not is_complete(d):
            raise ArtifactError(f"{d}: no complete {what}; run that stage first")
    fp = evaluation_fingerprint(run_dir, cfg)
    if not force and up_to_date(out, fp):
        log(f"[evaluate] {out} is up to date (same config, data, model and index); --force re-evaluates")
        return json.loads((out / "metrics.json").read_text())
    ensure_ray()
    t_all = time.time()
    data = load_dataset(run_dir / "data")
    es = data.split(cfg.split)
    es = es.subset(np.arange(len(es) if cfg.limit is None else min(cfg.limit, len(es))))
    if baselines is None and "ease" in cfg.baselines:  # refuse before any work, not after DeftRec's scoring
        from deftrec.batch.baselines import EASE

        EASE.check_memory(data.n_items)
    import ray

    actors = evaluation_actors(cfg, len(es), ray.cluster_resources())
    sized = "" if cfg.actors is not None else " (sized from the cluster: evaluate.actors=null)"
    log(f"[evaluate] {cfg.split}: {len(es):,} users, batch {cfg.batch_size}, {actors} actor(s){sized}")
    with atomic_directory(out, overwrite=True) as tmp:
        recs = _recommend_users(_user_rows(es), run_dir, cfg, tmp, loader)
        seconds = {s: float(np.sum(recs.column(f"seconds_{s}").to_numpy()))
                   for s in ("load", "condition", "sample", "search")}
        t0 = time.time()
        base, not_run = _baseline_results(data, es, cfg.split, cfg, log, baselines)
        results = {"deftrec": metrics_from_recs(recs), **base}
        seconds["baselines"] = time.time() - t0
        top10 = np.stack(recs.column("items_excluded").to_numpy(zero_copy_only=False))[:, :10]
        seconds["total"] = time.time() - t_all
        steps = int(recs.column("steps")[0].as_py())
        metrics = {
            "schema_version": 1, "split": cfg.split, "users": int(len(es)),
            "sampler": recs.column("sampler")[0].as_py(), "steps": steps if steps > 0 else None,
            "seed": int(recs.column("seed")[0].as_py()), "k": max(KS),
            "seconds": {s: round(v, 3) for s, v in seconds.items()},
            "coverage": float(np.unique(top10[top10 >= 0]).size / data.n_items),
            "results": results, "baselines_not_run": not_run, "model_version": artifact_version(model_dir),
            "index_version": read_manifest(index_dir).get("version"), "protocol": PROTOCOL,
        }
        write_json_atomic(tmp / "metrics.json", metrics)
        write_report(metrics, tmp)
        finish_manifest(tmp, {"kind": "evaluation", "schema_version": 1, "config": to_dict(cfg), "fingerprint": fp,
                              "model_version": metrics["model_version"], "index_version": metrics["index_version"]})
    log(f"[evaluate] wrote {out}: DeftRec test NDCG@10 {results['deftrec']['history_excluded']['ndcg@10']:.4f} "
        f"(history excluded), {len(results) - 1} baseline(s) beside it")
    return metrics
