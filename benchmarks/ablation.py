"""Ablation of DeftRec's quality levers (method.md section 6) through the pipeline users run.

    python benchmarks/ablation.py --data ../shared/data/lastfm --data ../shared/data/software --preset small \
        [--levers diffusion,catalog_ce] [--samplers 'DDIM 20'] [--set key=value ...]

The preset runs whole (``benchmarks/quality.py``: preprocessing, LightGCN, training on the preset's
Ray Train workers, index, batch evaluation beside the baselines on the same users); then each lever
is switched off in turn, one variant each, with the preset's own early stopping (validation
NDCG@10), so a lever that needs more or fewer steps gets them. A variant reuses every artifact its
overrides leave unchanged: the sampler rows re-evaluate the preset's trained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import run  # noqa: E402

#: lever -> the overrides that switch it off (relative to a preset that has it on).
LEVERS: dict[str, list[str]] = {
    "diffusion": ["diffusion.noise=false"],  # the same model, the head's output is the query
    "x0_prediction": ["diffusion.prediction=eps"],
    "lightgcn_scale": ["diffusion.x0_norm=std"],  # the std-normalised item space instead
    "decoder_dropout": ["llm.dropout=0.0"],
    "catalog_ce": ["diffusion.lambda_ce=0.0"],
    "ce_on_generated": ["diffusion.ce_on=sampled"],  # CE on the noised-target estimate instead
    "negatives": ["diffusion.lambda_neg=0.0"],
    "neg_sum_scale": ["diffusion.neg_scale=mean"],
    "trainable_items": ["item_space=fixed"],
    "all_positions": ["train.positions=last"],
}
#: sampler rows: the preset's trained model evaluated with another sampler (no retraining)
SAMPLERS = {"DDIM 1": ["evaluate.steps=1"], "DDIM 20": ["evaluate.steps=20"],
            "DDPM": ["evaluate.sampler=ddpm", "evaluate.steps=null"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, action="append", default=[],
                   help="authors'-format dataset folder (repeatable); none: the preset's own data")
    p.add_argument("--preset", default="small")
    p.add_argument("--levers", default=",".join(LEVERS), help="levers to switch off, one variant each")
    p.add_argument("--samplers", default="DDIM 20", help=f"sampler rows of the preset's model: {list(SAMPLERS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deftrec-ablation")
    p.add_argument("--json", type=Path, help="also write every run's summary here")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs on the console too")
    a = p.parse_args(argv)
    levers = [x for x in a.levers.split(",") if x]
    samplers = [x for x in a.samplers.split(",") if x]
    unknown = sorted(set(levers) - set(LEVERS)) + sorted(set(samplers) - set(SAMPLERS))
    if unknown:
        p.error(f"unknown levers or samplers {unknown}; levers: {sorted(LEVERS)}, samplers: {list(SAMPLERS)}")
    variants = [("preset", [])] + [(f"- {lever}", LEVERS[lever]) for lever in levers]
    variants += [(f"preset, {s}", SAMPLERS[s]) for s in samplers]
    return run(a.preset, a.data or [None], variants, a.set, a.work, a.json, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
