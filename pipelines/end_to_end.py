"""Run the whole DeftRec pipeline for one config, resuming at the first incomplete stage.

    python -m pipelines.end_to_end --config pipelines/configs/tiny.yaml --run-dir runs/tiny [--set key=value ...]

Stages available so far: synth (when the config has data.synth) and preprocess.
"""

from __future__ import annotations

import argparse
import json
import sys

from deftrec.config_utils import ConfigError
from deftrec.data.readers import InputError
from deftrec.io import ArtifactError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.end_to_end", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML preset, e.g. pipelines/configs/tiny.yaml")
    p.add_argument("--run-dir", required=True, help="directory for every artifact of this run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    a = p.parse_args(argv)
    from deftrec.pipeline import load_pipeline_config, run_pipeline

    try:
        cfg = load_pipeline_config(a.config, a.set)
        summary = run_pipeline(cfg, a.run_dir)
    except (ConfigError, InputError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n== summary ==")
    for name, st in summary["stages"].items():
        state = "skipped (up to date)" if st["skipped"] else f"{st['seconds']:.1f}s"
        print(f"{name:<12} {state:<22} {st['path']}")
    pp = summary["stages"].get("preprocess")
    if pp:
        c = pp["counts"]
        print(f"\ndata: {c['users']:,} users, {c['items']:,} items, {c['kept']:,} interactions kept of "
              f"{c['rows_in']:,} (rejected {c['rejected_total']:,}, removed {c['removed_total']:,})")
        print(f"splits: {json.dumps(c['splits'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
