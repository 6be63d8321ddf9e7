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

from deftrec.config_utils import to_dict
from deftrec.index import IndexConfig, build_index, describe, load_index, save_index, search
from deftrec.io import ArtifactError, atomic_directory, finish_manifest, is_complete, read_manifest

KS = (5, 10, 20)
PROTOCOL = ("leave-one-out; full-catalog ranking (no sampled negatives); history_excluded removes the user's "
            "history items from the ranking, history_kept does not; baselines fit on every user's sequence "
            "before the split's target and score the same users with their full history")


@dataclasses.dataclass
class EvalJobConfig:
    split: str = "test"
    limit: Optional[int] = None  # evaluate the first N users (by user id) of the split
    sampler: Optional[str] = None  # override eval.sampler of the model config: ddim | ddpm
    steps: Optional[int] = None  # override eval.steps
    seed: Optional[int] = None  # override eval.seed
    explain: bool = False  # also generate the reasoning text when the condition does not need it
    batch_size: int = 32
    actors: int = 1  # model replicas in the actor pool
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self):
        if self.split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {self.split!r}")
        if self.sampler not in (None, "ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError("batch_size and actors must be >= 1")


def model_version(model_dir: str | Path) -> str:
    """The export's version string (from its manifest): what index and serving pin themselves to."""
    m = read_manifest(model_dir)
    if m.get("version"):
        return str(m["version"])
    from deftrec.pipeline import fingerprint

    return fingerprint(m.get("outputs", {}))


def _load_model(model_dir: str):
    from deftrec.export import load_model

    return load_model(model_dir)


# ------------------------------------------------------------------------------------ index job


class ItemKeyEmbedder:
    """Ray Data actor: loads the model once; maps item indices to keys in the retrieval space."""

    def __init__(self, model_dir: str, loader: Optional[Callable] = None):
        model = (loader or _load_model)(model_dir)
        # DeftRec retrieves by -||x0_hat - E_i||^2 against the collaborative item matrix E.
        self.keys = model.item_emb.detach().float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        items = np.asarray(batch["item"], dtype=np.int64)
        return {"item": items, "key": list(self.keys[items])}


def run_index_job(run_dir: str | Path, cfg: IndexConfig, force: bool = False, log: Callable = print,
                  loader: Optional[Callable] = None, actors: int = 1, model_dir: str | Path | None = None,
                  out_dir: str | Path | None = None) -> dict:
    """Index ``run_dir/data/items.parquet`` with the keys of ``model_dir`` (default ``run_dir/model``)
    into ``out_dir`` (default ``run_dir/index``)."""
    import ray

    from deftrec.pipeline import fingerprint
    from deftrec.ray_utils import ensure_ray

    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    model_dir = Path(model_dir) if model_dir is not None else run_dir / "model"
    out = Path(out_dir) if out_dir is not None else run_dir / "index"
    version = model_version(model_dir)
    fp = fingerprint({"model": version, "index": to_dict(cfg)})
    if is_complete(out) and not force and read_manifest(out).get("fingerprint") == fp:
        log(f"[index] {out} is up to date for model {version} and {cfg.factory}; nothing to do (--force rebuilds)")
        return read_manifest(out)
    ensure_ray()
    t0 = time.time()
    with atomic_directory(out, overwrite=True) as tmp:
        ds = ray.data.read_parquet(str(data_dir / "items.parquet"), columns=["item"])
        ds = ds.map_batches(ItemKeyEmbedder, fn_constructor_kwargs={"model_dir": str(model_dir), "loader": loader},
                            batch_size=4096, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                            batch_format="numpy")
        ds.write_parquet(str(tmp / "item_keys.parquet"))
        t = pq.read_table(tmp / "item_keys.parquet").sort_by("item")
        items = t.column("item").to_numpy()
        if not np.array_equal(items, np.arange(len(items))):
            raise ArtifactError(f"{data_dir}/items.parquet: item indices are not 0..N-1")
        keys = np.stack(t.column("key").to_numpy(zero_copy_only=False)).astype(np.float32)
        t_embed = time.time() - t0
        log(f"[index] {len(keys):,} item keys of dim {keys.shape[1]} ({t_embed:.1f}s); building {cfg.factory}")
        t1 = time.time()
        index = build_index(keys, cfg, ids=items)
        save_index(index, tmp)
        info = describe(index, cfg, keys)
        manifest = {"kind": "index", "schema_version": 1, "config": to_dict(cfg), "model_version": version,
                    "version": f"{version}-{fp[:8]}", "fingerprint": fp, **info,
                    "seconds": {"embed": round(t_embed, 3), "build": round(time.time() - t1, 3)}}
        manifest = finish_manifest(tmp, manifest)
    log(f"[index] wrote {out}: {cfg.factory}, recall@10 vs exact {manifest['recall@10']:.3f}")
    return manifest


# ------------------------------------------------------------------------------------ evaluation


class BatchRecommender:
    """Ray Data actor: model + index loaded once; one call = one batch of users, every stage batched."""

    def __init__(self, model_dir: str, index_dir: str, sampler: Optional[str], steps: Optional[int],
                 seed: Optional[int], explain: bool, k: int, loader: Optional[Callable] = None):
        from deftrec.model.deftrec import DeftRecRecommender

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
    from deftrec.metrics import evaluate_topk

    targets = recs.column("target").to_numpy()
    out = {}
    for proto, col in (("history_excluded", "items_excluded"), ("history_kept", "items_kept")):
        lists = np.stack(recs.column(col).to_numpy(zero_copy_only=False)).astype(np.int64)
        m = evaluate_topk(lists, targets, ks)
        out[proto] = {f"{name}@{k}": float(m[f"{name}@{k}"]) for k in ks for name in ("hr", "ndcg")}
    return out


def _select(m: dict, ks=KS) -> dict:
    return {f"{name}@{k}": float(m[f"{name}@{k}"]) for k in ks for name in ("hr", "ndcg")}


def run_evaluation(run_dir: str | Path, cfg: EvalJobConfig, log: Callable = print,
                   loader: Optional[Callable] = None) -> dict:
    import ray

    from deftrec.baselines import run_baselines
    from deftrec.data.samples import load_dataset
    from deftrec.ray_utils import ensure_ray

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
        from deftrec.io import write_json_atomic

        write_json_atomic(tmp / "metrics.json", metrics)
        write_report(metrics, tmp)
        finish_manifest(tmp, {"kind": "evaluation", "schema_version": 1, "config": to_dict(cfg),
                              "model_version": metrics["model_version"], "index_version": metrics["index_version"]})
    log(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"split {metrics['split']}, {metrics['users']:,} users, sampler {metrics['sampler']} "
             f"({metrics['steps']} steps), coverage@10 {metrics['coverage']:.3f}",
             f"{'model':<11} | {'excluded HR@10':>14} {'NDCG@10':>8} {'HR@20':>6} | {'kept HR@10':>10} {'NDCG@10':>8}"]
    for name, r in metrics["results"].items():
        ex, kp = r["history_excluded"], r["history_kept"]
        lines.append(f"{name:<11} | {ex['hr@10']:>14.4f} {ex['ndcg@10']:>8.4f} {ex['hr@20']:>6.4f} | "
                     f"{kp['hr@10']:>10.4f} {kp['ndcg@10']:>8.4f}")
    return "\n".join(lines)


def write_report(metrics: dict, out: Path) -> None:
    """``report.md`` (tables, protocol, timings) and ``report.png`` (NDCG@10 / HR@10 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["results"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, proto in zip(axes, ("history_excluded", "history_kept")):
        x = np.arange(len(names))
        hr = [metrics["results"][n][proto]["hr@10"] for n in names]
        nd = [metrics["results"][n][proto]["ndcg@10"] for n in names]
        ax.bar(x - 0.2, hr, 0.4, label="HR@10")
        ax.bar(x + 0.2, nd, 0.4, label="NDCG@10")
        ax.set_xticks(x, names)
        ax.set_title(proto.replace("_", " "))
        ax.legend()
    fig.suptitle(f"DeftRec vs baselines — {metrics['split']}, {metrics['users']} users")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    rows = []
    for proto in ("history_excluded", "history_kept"):
        rows.append(f"\n### {proto.replace('_', ' ')}\n")
        rows.append("| model | " + " | ".join(f"{m}@{k}" for k in KS for m in ("HR", "NDCG")) + " |")
        rows.append("|---|" + "---|" * (2 * len(KS)))
        for n in names:
            r = metrics["results"][n][proto]
            rows.append(f"| {n} | " + " | ".join(f"{r[f'{m}@{k}']:.4f}" for k in KS for m in ("hr", "ndcg")) + " |")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["seconds"].items())
    text = (f"# DeftRec evaluation\n\nSplit `{metrics['split']}`, {metrics['users']:,} users, sampler "
            f"`{metrics['sampler']}` ({metrics['steps']} steps), seed {metrics['seed']}. Model "
            f"`{metrics['model_version']}`, index `{metrics['index_version']}`.\n\nProtocol: {metrics['protocol']}.\n"
            + "\n".join(rows) + f"\n\nCoverage@10 (history excluded): {metrics['coverage']:.3f}. Time: {secs}.\n\n"
            "![DeftRec vs baselines](report.png)\n")
    (out / "report.md").write_text(text, encoding="utf-8")
