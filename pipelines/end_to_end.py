"""Run the whole DeftRec pipeline for one config, resuming at the first incomplete stage.

    python -m pipelines.end_to_end --config pipelines/configs/tiny.yaml --run-dir runs/tiny [--set key=value ...]
        [--dry-run] [--verbose]

Stages (the config's ``stages`` list, in this order): synth (when the config has data.synth),
preprocess, collab, train, index, evaluate. Each writes one directory of RUN_DIR (synth/, data/,
collab/, model/, index/, eval/) with a manifest; a stage whose manifest matches its config and
inputs is skipped, so re-running after a crash resumes at the first incomplete stage. The console
shows one line per step of progress; the full log is in RUN_DIR/logs/end_to_end.log.

``--dry-run`` prints the plan as one JSON document on stdout and does nothing else (no Ray, no
files): the resolved config and, per stage, whether it would run or be skipped (its fingerprint)
and the Ray resources it would request (workers, CPUs and GPUs each, placement strategy). Check a
job with it before submitting it to a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pipelines._cli import add_common_flags, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.end_to_end", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (JSON) and exit without running anything")
    a = p.parse_args(argv)
    if a.config is None:
        p.error("--config is required (e.g. pipelines/configs/tiny.yaml)")
    if a.dry_run:
        return dry_run(a)

    def body() -> int:
        from deftrec.config.pipeline import load_pipeline_config
        from deftrec.end_to_end import run_pipeline

        cfg = load_pipeline_config(a.config, a.set)
        summary = run_pipeline(cfg, a.run_dir)
        print(format_summary(summary, a.run_dir))
        return 0

    return run(a, body, "end_to_end")


def dry_run(a: argparse.Namespace) -> int:
    """The plan on stdout; no console set-up and no log file: the run directory is left untouched."""
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.core.errors import UserError
    from deftrec.end_to_end import plan_pipeline

    try:
        plan = plan_pipeline(load_pipeline_config(a.config, a.set), a.run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2))
    return 0


def example_user_id(run_dir: str | Path) -> str | None:
    """An existing user id of the run (the first in users.parquet), for the printed curl command."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "data" / "users.parquet"
    if not path.exists():
        return None
    ids = pq.read_table(path, columns=["user_id"]).column("user_id")
    return str(ids[0].as_py()) if len(ids) else None


def format_summary(summary: dict, run_dir: str) -> str:
    lines = ["", "== summary ==", f"{'stage':<12} {'time':<22} artifact"]
    for name, st in summary["stages"].items():
        state = "skipped (up to date)" if st["skipped"] else f"{st['seconds']:.1f}s"
        lines.append(f"{name:<12} {state:<22} {st['path']}")
    pp = summary["stages"].get("preprocess")
    if pp and "counts" in pp:
        c = pp["counts"]
        lines.append(f"\ndata: {c['users']:,} users, {c['items']:,} items, {c['kept']:,} interactions kept of "
                     f"{c['rows_in']:,} (rejected {c['rejected_total']:,}, removed {c['removed_total']:,}); "
                     f"splits {json.dumps(c['splits'])}")
    m = summary.get("metrics")
    if m:
        from deftrec.batch.report import format_table

        lines += ["", format_table(m), f"protocol: {m['protocol']}"]
    if "train" in summary["stages"]:
        user = example_user_id(run_dir)
        body = json.dumps({"user_id": user, "k": 10, "explain": True})
        lines += ["", "serve and query it:", f"  serve run deftrec.serve:app run_dir={run_dir}",
                  "  curl -s -X POST 127.0.0.1:8000/recommend -H 'content-type: application/json' "
                  f"-d {shlex.quote(body)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
