"""Write a synthetic interaction log and item catalog (the embedded default dataset).

    python -m pipelines.synth --out DIR --users N --items M [--seed S] [--interactions R]
"""

from __future__ import annotations

import argparse
import sys

from deftrec.config.data import SynthConfig
from pipelines._cli import add_common_flags, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--users", type=int, default=SynthConfig.users)
    p.add_argument("--items", type=int, default=SynthConfig.items)
    p.add_argument("--interactions", type=int, default=0, help="total rows (default: users x mean length)")
    p.add_argument("--mean-length", type=float, default=SynthConfig.mean_length)
    p.add_argument("--categories", type=int, default=SynthConfig.categories)
    p.add_argument("--seed", type=int, default=SynthConfig.seed)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_common_flags(p, run_dir=False, config=False)
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.core.config import from_dict
        from deftrec.data.synth import generate

        # through from_dict: a bad flag value is a ConfigError (exit 2), not a bare ValueError
        cfg = from_dict(SynthConfig, dict(users=a.users, items=a.items, interactions=a.interactions,
                                          mean_length=a.mean_length, categories=a.categories, seed=a.seed), "synth")
        m = generate(cfg, a.out, overwrite=a.overwrite)
        print(f"[synth] wrote {m['rows']:,} interactions, {m['items']} items, {m['users']} users to {a.out}")
        return 0

    return run(a, body, "synth")


if __name__ == "__main__":
    sys.exit(main())
