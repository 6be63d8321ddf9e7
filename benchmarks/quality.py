"""Recommendation quality of a short DeftRec training run against the baselines, on the same users.

    python benchmarks/quality.py --data ../shared/data/lastfm --preset cpu [--steps 200] [--users 300]
        [--condition prompt_state|response_embeddings|hidden_states] [--eval-steps 50,1] [--set key=value ...]

``--data`` is either a dataset folder in the authors' format (train.txt/test.txt/item_list.txt,
preprocessed on Ray into ``--work``) or an already preprocessed directory.

Prints one table: DeftRec (one row per ``--eval-steps`` DDIM setting, all from the same trained
model) and popularity / last-item Markov / EASE / SASRec on the SAME test users, HR@5/10/20 and
NDCG@5/10/20 under both protocols (full catalog; "excl" = every item of the user's sequence before
the target removed from every model's ranking, the standard protocol; "kept" = nothing removed, the
authors' default). Baselines are fit on everything before
the test target (s[:-1]); DeftRec's LightGCN sees s[:-2] only. Then train time, inference speed
(users/s) and the peak RSS of one training step of the preset with batch 4 and 20-item histories,
measured in a fresh subprocess (goal: < 6 GB for the cpu preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KS = (5, 10, 20)


def _prepare_data(path: Path, work: Path) -> Path:
    """A preprocessed directory: ``path`` itself, or ``path`` (authors' format) preprocessed into ``work``."""
    if (path / "manifest.json").is_file():
        return path
    from deftrec.config.data import PreprocessConfig
    from deftrec.core.artifacts import is_complete
    from deftrec.core.cluster import ensure_ray
    from deftrec.data.preprocess import run_preprocess

    out = work / f"{path.name}-preprocessed"
    if not is_complete(out):
        ensure_ray(num_cpus=2)
        run_preprocess(PreprocessConfig(input=[str(path)], format="deftrec", output=str(out), overwrite=True),
                       log=lambda s: None)
    return out


def _row(name: str, m: dict) -> str:
    cells = []
    for proto in ("history_excluded", "history_kept"):
        cells += [f"{m[proto][f'hr@{k}']:.4f}" for k in KS] + [f"{m[proto][f'ndcg@{k}']:.4f}" for k in KS]
    return f"| {name} | " + " | ".join(cells) + " |"


def _header() -> str:
    cols = []
    for proto in ("excl", "kept"):
        cols += [f"HR@{k} {proto}" for k in KS] + [f"NDCG@{k} {proto}" for k in KS]
    return "| model | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1)


def _evaluate_deftrec(model, test, step_counts: list[int], seed: int) -> dict[int, tuple[dict, float]]:
    """Both protocols for several DDIM step counts; the LLM part (conditions) runs once.

    Returns {steps: (metrics, users/s)} where users/s counts the condition pass plus that sampler.
    """
    import torch

    from deftrec.retrieval.metrics import evaluate_both_protocols
    from deftrec.retrieval.recommender import DeftRecRecommender

    model.eval()
    base = model.cfg.eval
    rec = DeftRecRecommender(model, base)
    users = test.users if model.cfg.tokenizer.user_tokens else None
    bs = base.batch_size
    t0 = time.perf_counter()
    conds = [rec.conditions(test.histories[s:s + bs], None if users is None else users[s:s + bs])[0]
             for s in range(0, len(test), bs)]
    t_cond = time.perf_counter() - t0
    out = {}
    for steps in step_counts:
        steps = min(steps, model.cfg.diffusion.T)
        r = DeftRecRecommender(model, dataclasses.replace(base, steps=steps, seed=seed))
        t0 = time.perf_counter()
        with torch.no_grad():
            scores = torch.cat([r.scores(r.sample(c, test.users[i * bs:i * bs + c.shape[0]], seed))
                                for i, c in enumerate(conds)]).cpu().numpy()
        dt = t_cond + time.perf_counter() - t0
        # the same exclusion as every baseline: the whole sequence before the target
        out[steps] = (evaluate_both_protocols(scores, test.targets, list(test.exclusions), KS), len(test) / dt)
    return out


def measure_step_rss(preset: str, overrides: list[str], batch: int = 4, history: int = 20) -> dict:
    """Peak RSS (MiB) of building the preset's model and running one training step, in this process.

    Random collaborative embeddings are enough: memory depends on shapes, not values. Histories are
    ``history`` distinct items with 40-character titles (the longest prompts the preset allows).
    """
    import torch

    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.data.samples import ItemCatalog
    from deftrec.model.deftrec import DeftRec, DeftRecTask
    from deftrec.training.optim import build_optimizer, train_step

    torch.set_num_threads(2)
    cfg = load_deftrec_config(REPO / f"pipelines/configs/{preset}.yaml",
                              [*overrides, f"train.batch_size={batch}", f"prompt.max_history={history}"])
    n_items = 500
    rng = np.random.default_rng(0)
    titles = np.array([f"Artist number {i:04d} with a long band name" for i in range(n_items)], dtype=object)
    catalog = ItemCatalog(np.array([str(i) for i in range(n_items)], dtype=object), titles,
                      np.array(["Electronic"] * n_items, dtype=object))
    E = rng.normal(scale=0.1, size=(n_items, cfg.d_c)).astype(np.float32)
    U = rng.normal(scale=0.1, size=(batch, cfg.d_c)).astype(np.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    model = DeftRec.from_config(cfg, E, U if cfg.tokenizer.user_tokens else None, catalog)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_load = time.perf_counter() - t0
    task = DeftRecTask(model)
    opt = build_optimizer(model, model.cfg)
    hist = [rng.choice(n_items, size=history, replace=False) for _ in range(batch)]
    batch_t = model.make_batch(hist, rng.integers(0, n_items, size=batch), np.arange(batch))
    model.train()
    t0 = time.perf_counter()
    train_step(task, [batch_t], opt, grad_clip=cfg.train.grad_clip)  # includes allocating the AdamW state
    t_step = time.perf_counter() - t0
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": rss_before,
            "rss_after_load_mib": rss_model, "tokens": int(batch_t["input_ids"].shape[1]), "load_s": t_load,
            "step_s": t_step}


def _rss_subprocess(preset: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-rss", "--preset", preset]
    for ov in overrides:
        cmd += ["--set", ov]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"RSS measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="authors' dataset folder or a preprocessed directory")
    p.add_argument("--preset", default="cpu", help="pipelines/configs/<preset>.yaml")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (train.max_steps)")
    p.add_argument("--users", type=int, default=300, help="test users (fixed random subset); 0 = all")
    p.add_argument("--valid-users", type=int, default=100, help="validation users during training")
    p.add_argument("--condition", choices=["prompt_state", "response_embeddings", "hidden_states", "item_states"])
    p.add_argument("--eval-steps", default="50,1", help="DDIM step counts to evaluate, comma separated")
    p.add_argument("--seed", type=int, default=0, help="test-user subset and noise seed")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deftrec-quality")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--skip-rss", action="store_true", help="do not measure the training-step RSS")
    p.add_argument("--baselines", default="popularity,markov,ease,sasrec", help="baselines beside DeftRec")
    p.add_argument("--measure-rss", action="store_true", help=argparse.SUPPRESS)  # subprocess mode
    a = p.parse_args(argv)

    if a.measure_rss:
        print(json.dumps(measure_step_rss(a.preset, a.set)))
        return 0
    if a.data is None:
        p.error("--data is required")

    import torch

    from deftrec.batch.baselines import run_baselines
    from deftrec.batch.registry import build_baselines
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.data.samples import load_dataset
    from deftrec.training.local import train_local

    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.max_steps={a.steps}", f"train.valid_users={a.valid_users}",
                 f"train.warmup_steps={max(1, min(50, a.steps // 10))}"]
    if a.condition:
        overrides.append(f"condition={a.condition}")
        if a.condition != "item_states":  # all-position training reads the item states only
            overrides.append("train.positions=last")
    overrides += a.set
    cfg = load_deftrec_config(REPO / f"pipelines/configs/{a.preset}.yaml", overrides)
    data = load_dataset(_prepare_data(a.data.resolve(), a.work))
    test = data.test.sample(a.users or None, a.seed)
    print(f"[quality] {data.root}: {data.n_users} users, {data.n_items} items; {len(test)} test users; "
          f"preset {a.preset}, condition {cfg.condition}, {a.steps} steps", flush=True)

    t0 = time.perf_counter()
    model, history = train_local(cfg, data, log=lambda s: print(s, flush=True))
    t_train = time.perf_counter() - t0

    rows, speeds = [], []
    for steps, (metrics, users_per_s) in _evaluate_deftrec(model, test, [int(x) for x in a.eval_steps.split(",") if x],
                                                          a.seed).items():
        rows.append((f"DeftRec ({cfg.condition}, DDIM {steps})", metrics))
        speeds.append((steps, users_per_s))
    models = build_baselines([b for b in a.baselines.split(",") if b], log=lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    base = run_baselines(data.sequences_before("test"), list(test.exclusions), test.targets, data.n_items, ks=KS,
                         models=models)
    t_base = time.perf_counter() - t0
    rows += list(base.items())

    rss = None if a.skip_rss else _rss_subprocess(a.preset, a.set)

    print(f"\n## {a.preset} preset on {a.data.name}: {len(test)} test users (seed {a.seed}), full-catalog ranking")
    print(_header())
    for name, m in rows:
        print(_row(name, m))
    best = history.get("best") or {}
    print(f"\ntrain: {t_train:.0f} s wall ({history['seconds']}), best validation NDCG@10 "
          f"{best.get('ndcg@10', float('nan')):.4f} at step {best.get('step')}")
    print(f"baselines: {t_base:.0f} s (fit and score, SASRec training included)")
    print("inference: " + ", ".join(f"DDIM {s}: {v:.1f} users/s" for s, v in speeds)
          + (" (includes reasoning generation)" if model.cfg.needs_generation else ""))
    if rss is not None:
        ok = "OK" if rss["peak_rss_mib"] < 6 * 1024 else "ABOVE the 6 GB goal"
        print(f"training-step peak RSS (batch 4, 20-item histories, {rss['tokens']} tokens): "
              f"{rss['peak_rss_mib'] / 1024:.2f} GiB ({ok}); after model load {rss['rss_after_load_mib'] / 1024:.2f} GiB; "
              f"{rss['step_s']:.2f} s/step")
    winner = max(rows, key=lambda r: r[1]["history_excluded"]["ndcg@10"])[0]
    print(f"best NDCG@10 (history excluded): {winner}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
