"""SASRec against popularity / last-item Markov / EASE on the test split (the reference figures).

    python benchmarks/sasrec.py [--data DIR [DIR ...]] [--set key=value ...] [--threads N] [--quiet]

Each ``--data`` folder is either in the authors' format (``train.txt`` / ``test.txt``: one line
``user item item ...`` per user; the last item of a ``test.txt`` line is the test target, the rest
of the line equals the ``train.txt`` line) or a preprocessed directory (``manifest.json``, read
with ``load_dataset``). Every model is fit on the sequences before the test target and ranks the
full catalog with the user's whole history excluded. Default ``--data``: the three shared datasets.
``--set`` overrides :class:`deftrec.config.baselines.SASRecConfig` fields (one config for all data).
Prints HR@10 / NDCG@10 and fit + evaluation seconds per model and dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deftrec.batch.baselines import EASE, MarkovLastItem, Popularity, run_baselines  # noqa: E402
from deftrec.batch.sasrec import SASRec  # noqa: E402
from deftrec.config.baselines import SASRecConfig  # noqa: E402
from deftrec.core.config import apply_overrides, from_dict  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / name for name in ("lastfm", "software", "ml1m")]


def _read_lines(path: Path) -> list[np.ndarray]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:
            rows.append(np.array([int(x) for x in parts[1:]], dtype=np.int64))  # drop the user id
    return rows


def _n_items_listed(path: Path) -> int:
    listing = path / "item_list.txt"
    return max(0, len(listing.read_text().splitlines()) - 1) if listing.is_file() else 0  # minus header


def load_split(path: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(sequences before the test target, test targets, n_items) of one dataset folder."""
    if (path / "manifest.json").is_file():
        from deftrec.data.samples import load_dataset

        data = load_dataset(path)
        before = data.sequences_before("test")[np.searchsorted(data.users, data.test.users)]
        return [np.asarray(s) for s in before], np.asarray(data.test.targets), data.n_items
    test = [s for s in _read_lines(path / "test.txt") if s.size >= 2]
    seqs, targets = [s[:-1] for s in test], np.array([s[-1] for s in test], dtype=np.int64)
    n_items = max(_n_items_listed(path), int(max(s.max() for s in test)) + 1)
    return seqs, targets, n_items


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SASRecConfig field")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (SASRecConfig.threads)")
    ap.add_argument("--models", default="sasrec,popularity,markov,ease", help="comma-separated subset")
    ap.add_argument("--quiet", action="store_true", help="no per-validation progress lines")
    args = ap.parse_args(argv)

    overrides = list(args.set) + ([f"threads={args.threads}"] if args.threads is not None else [])
    cfg = from_dict(SASRecConfig, apply_overrides({}, overrides), "sasrec")
    print(f"SASRecConfig: {dataclasses.asdict(cfg)}", flush=True)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    factories = {"sasrec": lambda: SASRec(cfg, log=log), "popularity": Popularity, "markov": MarkovLastItem,
                 "ease": EASE}
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(factories))
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {sorted(factories)}")

    rows = []
    for path in args.data:
        seqs, targets, n_items = load_split(path)
        print(f"== {path.name}: {len(seqs)} users, {n_items} items, "
              f"{sum(s.size for s in seqs)} interactions", flush=True)
        for name in names:
            model = factories[name]()
            t0 = time.perf_counter()
            res = run_baselines(seqs, seqs, targets, n_items, ks=(10,), models={name: model})[name]
            seconds = time.perf_counter() - t0
            m = res["history_excluded"]
            extra = f" (best epoch {model.best_epoch_}, stop: {model.stop_reason_})" if name == "sasrec" else ""
            print(f"   {name}: HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} ± {m['ndcg@10_se']:.4f} "
                  f"{seconds:.1f}s{extra}", flush=True)
            rows.append((path.name, name, m["hr@10"], m["ndcg@10"], m["ndcg@10_se"], seconds))

    print("\n| dataset | model | HR@10 | NDCG@10 ± se | seconds |\n|---|---|---|---|---|")
    for ds, name, hr, nd, se, sec in rows:
        print(f"| {ds} | {name} | {hr:.4f} | {nd:.4f} ± {se:.4f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
