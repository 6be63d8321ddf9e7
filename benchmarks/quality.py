"""Recommendation quality through the pipeline users run: every figure here comes from ``run_pipeline``.

    python benchmarks/quality.py --preset tiny                     # the embedded synthetic data: README command (1)
    python benchmarks/quality.py --preset small --data ../shared/data/lastfm --data ../shared/data/software
    python benchmarks/quality.py --preset small --data ../shared/data/software \\
        --variant 'x0 std: diffusion.x0_norm=std' --variant 'DDIM 20: evaluate.steps=20'

For each dataset (``--data``: a folder in the authors' format, as in ``../shared/data``; none: the
preset's own data, the embedded synthetic log for ``tiny``) the preset's whole pipeline runs in
``WORK/<dataset>/preset``: preprocessing, LightGCN and DeftRec's training on the preset's Ray Train
workers (``distributed:``), the FAISS index and the batch evaluation, which scores popularity,
last-item Markov, EASE and SASRec on the same users with the same exclusions and metrics code. Each
``--variant 'NAME: key=value key=value'`` then runs the same pipeline with its overrides in
``WORK/<dataset>/<NAME>``, starting from copies of the preset run's artifacts: a stage whose
fingerprint the overrides leave unchanged is skipped (``evaluate.*`` overrides re-evaluate the same
trained model). Variants do not refit the baselines: theirs are the preset run's, on the same users.
``--reuse-preset`` reads the preset run an earlier ``quality.py`` left in ``WORK`` instead of running
it again (a change of code moves the fingerprints, which would retrain it), so that new variants are
compared with the same measured reference.

Prints one table per dataset: test NDCG@10 (history excluded) with its standard error, HR@10, the
training seconds and the best validation step, then the baselines.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Stage directories a variant starts from (copies of the preset run's): unchanged stages are skipped.
REUSED = ("synth", "data", "collab", "model", "index")
SUMMARY = "quality_summary.json"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``'NAME: key=value key=value'`` -> (NAME, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r} must look like 'NAME: key=value ...'")
    return name.strip(), rest.split()


def dataset_overrides(data: Path | None) -> list[str]:
    """Overrides that point a preset at an authors'-format dataset folder (none: the preset's own data)."""
    if data is None:
        return []
    return [f"data.preprocess.input=[{data.resolve()}]", "data.preprocess.format=deftrec",
            "stages=[preprocess,collab,train,index,evaluate]"]


def run_variant(preset: Path, overrides: list[str], run_dir: Path, start_from: Path | None = None,
                log=print) -> dict:
    """The whole pipeline for ``preset`` + ``overrides`` in ``run_dir``; returns its summary, with the
    model manifest's best validation step and the seconds of every stage."""
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.core.artifacts import read_manifest
    from deftrec.end_to_end import run_pipeline

    if start_from is not None and not run_dir.exists():
        run_dir.mkdir(parents=True)
        for name in REUSED:
            if (start_from / name).is_dir():
                shutil.copytree(start_from / name, run_dir / name, symlinks=True)
    cfg = load_pipeline_config(preset, overrides)
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, run_dir, log=log)
    summary["seconds"] = time.perf_counter() - t0
    summary["model"] = read_manifest(run_dir / "model")
    summary["workers"] = cfg.distributed.num_workers
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def read_variant(run_dir: Path) -> dict:
    """The summary an earlier ``run_variant`` left in ``run_dir``."""
    if not (run_dir / SUMMARY).is_file():
        raise SystemExit(f"--reuse-preset: {run_dir} holds no {SUMMARY} of a finished quality.py run")
    return json.loads((run_dir / SUMMARY).read_text())


def _fmt(m: dict, key: str = "ndcg@10") -> str:
    se = m.get(f"{key}_se")
    return f"{m[key]:.4f} ± {se:.4f}" if se is not None else f"{m[key]:.4f}"


def print_table(title: str, runs: dict[str, dict]) -> None:
    print(f"\n## {title}")
    print("| model | test NDCG@10 ± se (history excluded) | HR@10 | train s | best valid step (NDCG@10) | workers |")
    print("|---|---|---|---|---|---|")
    preset = next(iter(runs.values()))
    for name, s in runs.items():
        ex = s["metrics"]["results"]["deftrec"]["history_excluded"]
        train = s["stages"].get("train", {})
        t = "skipped" if train.get("skipped") else f"{train.get('seconds', 0):.0f}"
        m = s["model"]
        print(f"| DeftRec {name} | {_fmt(ex)} | {ex['hr@10']:.4f} | {t} | {m.get('best_step')} "
              f"({m.get('valid_ndcg@10', float('nan')):.4f}) | {s['workers']} |")
    for name, r in preset["metrics"]["results"].items():
        if name != "deftrec":
            ex = r["history_excluded"]
            print(f"| {name} | {_fmt(ex)} | {ex['hr@10']:.4f} | | | |")
    users = preset["metrics"]["users"]
    print(f"\n{users:,} test users, full-catalog ranking; every row from the same pipeline code path.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="pipelines/configs/<preset>.yaml")
    p.add_argument("--data", type=Path, action="append", default=[],
                   help="authors'-format dataset folder (repeatable); none: the preset's own data")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   help="'NAME: key=value ...' run beside the preset (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deftrec-quality")
    p.add_argument("--json", type=Path, help="also write every run's summary here")
    p.add_argument("--reuse-preset", action="store_true",
                   help="read the preset runs an earlier quality.py left in --work instead of running them")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs on the console too")
    a = p.parse_args(argv)
    return run(a.preset, a.data or [None], [("preset", []), *a.variant], a.set, a.work, a.json, a.verbose,
               a.reuse_preset)


def run(preset_name: str, datasets: list, variants: list[tuple[str, list[str]]], common: list[str], work: Path,
        json_out: Path | None = None, verbose: bool = False, reuse_preset: bool = False) -> int:
    """Every variant on every dataset, one table per dataset (the console as ``pipelines.end_to_end``'s)."""
    from deftrec.core.console import configure_console

    configure_console(verbose=verbose, log_file=work / "benchmark.log")
    preset = REPO / f"pipelines/configs/{preset_name}.yaml"
    everything = {}
    for data in datasets:
        label = data.name if data is not None else f"{preset_name} (preset data)"
        root = work / (data.name if data is not None else preset_name)
        runs: dict[str, dict] = {}
        for name, overrides in variants:
            first = not runs
            extra = [] if first else ["evaluate.baselines=[]"]
            run_dir = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            print(f"[quality] {label}: {name} -> {run_dir}", flush=True)
            if first and reuse_preset:
                runs[name] = read_variant(run_dir)
                continue
            runs[name] = run_variant(preset, [*dataset_overrides(data), *common, *overrides, *extra], run_dir,
                                     start_from=None if first else root / "preset",
                                     log=lambda s: print(s, flush=True))
        print_table(f"{preset_name} preset on {label}", runs)
        everything[label] = runs
    if json_out is not None:
        json_out.write_text(json.dumps(everything, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
