"""Run the whole DeftRec pipeline for one config, resuming at the first incomplete stage.

    python -m pipelines.end_to_end --config pipelines/configs/tiny.yaml --run-dir runs/tiny [--set key=value ...]

Stages (the config's ``stages`` list, in this order): synth (when the config has data.synth),
preprocess, collab, train, index, evaluate. Each writes one directory of RUN_DIR (synth/, data/,
collab/, model/, index/, eval/) with a manifest; a stage whose manifest matches its config and
inputs is skipped, so re-running after a crash resumes at the first incomplete stage.
"""

from __future__ import annotations

import argparse
import json
import sys

from deftrec.core.config import ConfigError
from deftrec.data.readers import InputError
from deftrec.core.artifacts import ArtifactError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.end_to_end", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML preset, e.g. pipelines/configs/tiny.yaml")
    p.add_argument("--run-dir", required=True, help="directory for every artifact of this run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    a = p.parse_args(argv)
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.end_to_end import run_pipeline

    try:
        cfg = load_pipeline_config(a.config, a.set)
        summary = run_pipeline(cfg, a.run_dir)
    except (ConfigError, InputError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, a.run_dir))
    return 0


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
        lines += ["", "serve and query it:",
                  f"  serve run deftrec.serve:app run_dir={run_dir}",
                  "  curl -s -X POST 127.0.0.1:8000/recommend -H 'content-type: application/json' "
                  "-d '{\"user_id\": \"<a user id>\", \"k\": 10, \"explain\": true}'"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
