"""Inference speed and sampler quality, plus FAISS Flat vs HNSW on a large synthetic catalog.

    python benchmarks/inference.py --preset tiny [--users 300] [--train-steps 300]
    python benchmarks/inference.py --model-dir runs/lastfm/model --data runs/lastfm/data --users 100
    python benchmarks/inference.py --faiss-only --catalog 1000000

Prints three tables:
1. users/s per stage (reasoning generation, prompt-only condition, DDIM sampling, FAISS search);
2. NDCG@10 / HR@10 and sampling time of DDPM (all T steps) against DDIM with 50, 20 and 10 steps on
   the same users and seed (goal: DDIM-20 within 2% relative NDCG@10 of DDPM, >= 25x faster);
3. FAISS ``Flat`` against ``HNSW32,Flat`` on a synthetic catalog: build time, QPS, recall@10.

The model is the export of a pipeline run (``--model-dir``, with its ``--data``), or one trained by
the pipeline's own stages on the embedded synthetic log (``--train-steps`` steps of ``--preset``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _model(args):
    from deftrec.artifacts.model import load_model

    if args.model_dir:
        return load_model(args.model_dir), args.data
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.end_to_end import run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="deftrec-bench-"))
    cfg = load_pipeline_config(REPO / f"pipelines/configs/{args.preset}.yaml", [
        "stages=[synth,preprocess,collab,train]", f"train.max_steps={args.train_steps}",
        f"train.validate_every={args.train_steps}", f"train.warmup_steps={max(1, min(10, args.train_steps - 1))}"])
    run_pipeline(cfg, tmp, log=lambda s: print(s, file=sys.stderr))
    return load_model(tmp / "model"), str(tmp / "data")


def stage_table(model, es, batch: int) -> list[tuple[str, float]]:
    from deftrec.config.jobs import IndexConfig
    from deftrec.retrieval.index import build_index, search
    from deftrec.retrieval.recommender import DeftRecRecommender

    rec = DeftRecRecommender(model)
    hist, users = es.histories, es.users
    n = len(users)
    rows = []
    t0 = time.perf_counter()
    conds = []
    for s in range(0, n, batch):
        c, _ = rec.conditions(hist[s:s + batch], explain=True)
        conds.append(c)
    rows.append(("generation (greedy reasoning + condition)", n / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    conds = []
    for s in range(0, n, batch):
        c, _ = rec.conditions(hist[s:s + batch])
        conds.append(c)
    rows.append(("condition only (no text)", n / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    xs = [rec.sample(c, users[i * batch:(i + 1) * batch]) for i, c in enumerate(conds)]
    rows.append((f"sampling ({rec.cfg.sampler}, {rec.cfg.steps} steps)", n / (time.perf_counter() - t0)))
    keys = model.item_emb.float().cpu().numpy()
    index = build_index(keys, IndexConfig())
    q = np.concatenate([(x.float() / model.x0_scale).cpu().numpy() for x in xs])
    t0 = time.perf_counter()
    search(index, q, 10, "l2", exclude=list(hist))
    rows.append(("FAISS Flat search (k=10, history excluded)", n / (time.perf_counter() - t0)))
    return rows


def sampler_table(model, es, batch: int) -> list[tuple]:
    from deftrec.retrieval.metrics import evaluate_scores
    from deftrec.retrieval.recommender import DeftRecRecommender

    T = model.head.cfg.T
    rows = []
    base = model.cfg.eval
    for name, sampler, steps in [("DDPM", "ddpm", None), ("DDIM", "ddim", 50), ("DDIM", "ddim", 20),
                                 ("DDIM", "ddim", 10)]:
        if steps is not None and steps > T:
            continue
        rec = DeftRecRecommender(model, dataclasses.replace(base, sampler=sampler, steps=steps))
        conds = [rec.conditions(es.histories[s:s + batch])[0] for s in range(0, len(es), batch)]
        t0 = time.perf_counter()
        scores = np.concatenate([rec.scores(rec.sample(c, es.users[i * batch:(i + 1) * batch])).cpu().numpy()
                                 for i, c in enumerate(conds)])
        secs = time.perf_counter() - t0
        m = evaluate_scores(scores, es.targets, es.exclusions, ks=(10,), exclude_history=True)
        rows.append((f"{name}-{steps or T}", m["ndcg@10"], m["hr@10"], secs))
    return rows


def faiss_table(n_items: int, dim: int, n_queries: int) -> list[tuple]:
    from deftrec.config.jobs import IndexConfig
    from deftrec.retrieval.index import build_index, recall_at_k, search

    rng = np.random.default_rng(0)
    # clustered keys look more like learned embeddings than an isotropic Gaussian
    centers = rng.standard_normal((256, dim)).astype(np.float32)
    keys = centers[rng.integers(256, size=n_items)] + 0.5 * rng.standard_normal((n_items, dim)).astype(np.float32)
    q = keys[rng.choice(n_items, n_queries, replace=False)] + 0.1 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    rows = []
    for factory, extra in (("Flat", {}), ("HNSW32,Flat", {"ef_search": 64}), ("HNSW32,Flat", {"ef_search": 256})):
        t0 = time.perf_counter()
        index = build_index(keys, IndexConfig(factory=factory, **extra))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        search(index, q, 10)
        qps = n_queries / (time.perf_counter() - t0)
        rec = 1.0 if factory == "Flat" else recall_at_k(index, keys, q[:200], 10)
        label = factory + (f" (efSearch {extra['ef_search']})" if extra else "")
        rows.append((label, build, qps, rec))
        print(f"  {label}: build {build:.1f}s, {qps:,.0f} QPS, recall@10 {rec:.3f}", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "cpu", "gpu"])
    ap.add_argument("--data", help="the preprocessed data of --model-dir's run")
    ap.add_argument("--model-dir", help="an exported model instead of a fresh pipeline run")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--catalog", type=int, default=1_000_000, help="synthetic catalog size for the FAISS table")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--faiss-only", action="store_true")
    ap.add_argument("--no-faiss", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not a.faiss_only:
        from deftrec.data.samples import load_dataset

        model, data = _model(a)
        es = load_dataset(data).test.sample(a.users, 0)
        print(f"\n== stages: preset {a.preset}, {len(es)} test users, batch {a.batch} ==")
        for name, ups in stage_table(model, es, a.batch):
            print(f"{name:<48} {ups:>10.1f} users/s")
        print(f"\n== samplers: same {len(es)} users and seed; NDCG@10 / HR@10 history excluded ==")
        rows = sampler_table(model, es, a.batch)
        ddpm = rows[0]
        print(f"{'sampler':<10} {'NDCG@10':>8} {'HR@10':>7} {'seconds':>8} {'speed-up':>9} {'rel. NDCG':>10}")
        for name, nd, hr, secs in rows:
            rel = (nd - ddpm[1]) / ddpm[1] if ddpm[1] > 0 else float("nan")
            print(f"{name:<10} {nd:>8.4f} {hr:>7.4f} {secs:>8.2f} {ddpm[3] / secs:>8.1f}x {rel:>+9.1%}")
    if not a.no_faiss:
        print(f"\n== FAISS: {a.catalog:,} synthetic items, dim {a.dim}, 1000 queries ==")
        rows = faiss_table(a.catalog, a.dim, 1000)
        print(f"{'index':<28} {'build s':>8} {'QPS':>10} {'recall@10':>10}")
        for label, build, qps, rec in rows:
            print(f"{label:<28} {build:>8.1f} {qps:>10,.0f} {rec:>10.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
