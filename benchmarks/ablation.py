"""Ablation of DeftRec's quality levers (method.md section 6): each lever off in turn, same data, same
LightGCN embeddings, same test users, same masking, same metrics code as the baselines.

    python benchmarks/ablation.py --data ../shared/data/lastfm --preset small [--levers diffusion,catalog_ce]
        [--baselines popularity,markov,ease,sasrec] [--users 0] [--set key=value ...]

``--data``: an authors'-format dataset folder (preprocessed on Ray into ``--work``), a preprocessed
directory, or a pipeline run directory (its ``data/`` and ``collab/`` are reused). LightGCN runs once
(unless the run directory has it) and every variant starts from the same embeddings. Each variant
trains with the preset's own early stopping (validation NDCG@10), so a lever that needs more or fewer
steps gets them. Prints one table (NDCG@10 and HR@10, history excluded and kept, test split) with
train seconds, steps and samples/s per variant, then the baselines on the same users.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import KS, REPO, _prepare_data  # noqa: E402

#: lever -> the overrides that switch it off (relative to a preset that has it on).
LEVERS: dict[str, list[str]] = {
    "diffusion": ["diffusion.noise=false"],  # the same model, the head's output is the query
    "x0_prediction": ["diffusion.prediction=eps"],
    "normalised_space": ["diffusion.x0_norm=none"],
    "catalog_ce": ["diffusion.lambda_ce=0.0"],
    "ce_on_generated": ["diffusion.ce_on=sampled"],  # CE on the noised-target estimate instead
    "negatives": ["diffusion.lambda_neg=0.0"],
    "neg_sum_scale": ["diffusion.neg_scale=mean"],
    "trainable_items": ["item_space=fixed"],
    "all_positions": ["train.positions=last"],
}
SAMPLERS = {"DDIM 1": ["eval.steps=1"], "DDIM 20": ["eval.steps=20"], "DDPM": ["eval.sampler=ddpm", "eval.steps=null"]}


def _metrics_row(name: str, m: dict, extra: str) -> str:
    ex, kept = m["history_excluded"], m["history_kept"]
    return (f"| {name} | {ex['ndcg@10']:.4f} | {ex['hr@10']:.4f} | {kept['ndcg@10']:.4f} | {kept['hr@10']:.4f} "
            f"| {extra} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--levers", default=",".join(LEVERS), help="levers to switch off, one variant each")
    p.add_argument("--samplers", default="DDIM 1,DDIM 20", help=f"sampler rows of the full model: {list(SAMPLERS)}")
    p.add_argument("--baselines", default="popularity,markov,ease,sasrec")
    p.add_argument("--users", type=int, default=0, help="test users (fixed random subset); 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deftrec-ablation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    a = p.parse_args(argv)
    unknown = set(x for x in a.levers.split(",") if x) - set(LEVERS)
    if unknown:
        p.error(f"unknown levers {sorted(unknown)}; known: {sorted(LEVERS)}")

    import dataclasses

    import torch

    from deftrec.batch.baselines import run_baselines
    from deftrec.batch.registry import build_baselines
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.data.samples import load_dataset
    from deftrec.training.collab_job import fit_collab
    from deftrec.training.local import train_local
    from deftrec.training.validation import evaluate

    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    preset = REPO / f"pipelines/configs/{a.preset}.yaml"
    root = a.data.resolve()
    run_dir = root if (root / "data" / "manifest.json").is_file() else None
    data = load_dataset(root / "data" if run_dir else _prepare_data(root, a.work))
    test = data.test.sample(a.users or None, a.seed)
    base_cfg = load_deftrec_config(preset, a.set)
    t0 = time.perf_counter()
    art = None
    if run_dir is not None and (run_dir / "collab" / "manifest.json").is_file():
        from deftrec.artifacts.collab import load_collab

        art = load_collab(run_dir / "collab")
        if art.item_emb.shape[1] != base_cfg.d_c:  # another preset's LightGCN: fit this one's
            art = None
    if art is not None:
        collab = (art.user_emb, art.item_emb)
    else:
        U, E, _ = fit_collab(base_cfg, data, log=lambda s: print(s, flush=True))
        collab = (U, E)
    t_collab = time.perf_counter() - t0
    print(f"[ablation] {data.root}: {data.n_users} users, {data.n_items} items, {len(test)} test users; preset "
          f"{a.preset}; LightGCN {t_collab:.0f} s", flush=True)

    variants = [("DeftRec (preset)", [])] + [(f"- {lever}", LEVERS[lever]) for lever in a.levers.split(",") if lever]
    rows = []
    for name, off in variants:
        cfg = load_deftrec_config(preset, [*a.set, *off])
        t0 = time.perf_counter()
        model, history = train_local(cfg, data, collab=collab, log=lambda s: print(s, flush=True))
        seconds = time.perf_counter() - t0
        steps = history["train"][-1]["step"] if history["train"] else 0
        rate = np.mean([r["samples_per_s"] for r in history["train"]]) if history["train"] else float("nan")
        best = history.get("best") or {}
        info = f"{seconds:.0f} s, {steps} steps (best {best.get('step')}), {rate:.0f} samples/s"
        samplers = [s for s in a.samplers.split(",") if s] if not off and model.cfg.diffusion.noise else []
        if not samplers:
            rows.append(_metrics_row(name, evaluate(model, test, seed=a.seed), info))
        for s in samplers:
            ecfg = load_deftrec_config(preset, [*a.set, *SAMPLERS[s]]).eval
            ecfg = dataclasses.replace(model.cfg.eval, sampler=ecfg.sampler, steps=ecfg.steps)
            rows.append(_metrics_row(f"{name}, {s}", evaluate(model, test, seed=a.seed, eval_cfg=ecfg), info))
        print(rows[-1], flush=True)

    models = build_baselines([b for b in a.baselines.split(",") if b], log=lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    base = run_baselines(data.sequences_before("test"), list(test.exclusions), test.targets, data.n_items, ks=KS,
                         models=models) if models else {}
    t_base = time.perf_counter() - t0

    print(f"\n## Ablation: {a.preset} preset on {a.data.name}, {len(test)} test users, full-catalog ranking")
    print("| variant | NDCG@10 excl | HR@10 excl | NDCG@10 kept | HR@10 kept | training |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    for name, m in base.items():
        print(_metrics_row(name, m, f"baselines {t_base:.0f} s together"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
