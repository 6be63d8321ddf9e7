"""Preprocessing throughput: the Ray Data pipeline against the single-process pandas reference.

    python benchmarks/preprocess.py [--sizes 1000000 10000000] [--workdir /tmp/deftrec-bench]

For each size it writes a synthetic log once (cached in --workdir), then runs both
implementations on the same file, each in its own subprocess, and prints rows/s, their ratio and
peak memory (summed RSS of the process tree, sampled every 0.1 s: for Ray this includes the
raylet, GCS and workers). Ray start-up is reported apart from the pipeline time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measured(cmd: list[str]) -> tuple[dict, float]:
    """Run cmd, sample its process tree's RSS; return (its JSON result line, peak GiB)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(ps))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    result = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    return result, peak / 2**30


def run_one(impl: str, inp: str, items: str, out: str) -> None:
    """Child process: run one implementation and print a JSON line."""
    from deftrec.config.data import PreprocessConfig
    from deftrec.core.config import from_dict

    cfg = from_dict(PreprocessConfig, {"input": [inp], "items": items, "output": out, "overwrite": True})
    if impl == "ray":
        from deftrec.core.cluster import ensure_ray
        from deftrec.data.preprocess import run_preprocess

        t0 = time.time()
        ensure_ray()
        startup = time.time() - t0
        t0 = time.time()
        m = run_preprocess(cfg, log=lambda s: print(s, file=sys.stderr))
        print(json.dumps({"seconds": time.time() - t0, "startup": startup, "rows": m["counts"]["rows_in"],
                          "kept": m["counts"]["kept"]}))
    else:
        from deftrec.data.reference import reference_preprocess

        t0 = time.time()
        r = reference_preprocess(cfg, items)
        kept = int(r["sequences"].column("items").combine_chunks().value_lengths().to_numpy().sum())
        print(json.dumps({"seconds": time.time() - t0, "startup": 0.0, "rows": r["rows_in"], "kept": kept}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--workdir", default=os.environ.get("DEFTREC_BENCH_DIR", "/tmp/deftrec-bench"))
    ap.add_argument("--run", choices=["ray", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--items", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        run_one(a.run, a.input, a.items, a.out)
        return
    from deftrec.config.data import SynthConfig
    from deftrec.core.artifacts import is_complete
    from deftrec.data.synth import generate

    work = Path(a.workdir)
    rows = []
    for n in a.sizes:
        d = work / f"synth-{n}"
        if not is_complete(d):
            users = max(100, n // 50)
            print(f"generating {n:,} interactions -> {d}", file=sys.stderr)
            generate(SynthConfig(users=users, items=max(200, n // 500), interactions=n), d, overwrite=True,
                     log=lambda s: None)
        inp, items = str(d / "interactions.csv"), str(d / "items.csv")
        size_mb = os.path.getsize(inp) / 2**20
        res = {}
        for impl in ("pandas", "ray"):
            cmd = [sys.executable, __file__, "--run", impl, "--input", inp, "--items", items,
                   "--out", str(work / f"out-{impl}-{n}")]
            res[impl] = measured(cmd)
            r, peak = res[impl]
            print(f"  {impl:6s} {n:>11,} rows  {r['seconds']:7.1f}s  {r['rows'] / r['seconds']:>11,.0f} rows/s  "
                  f"peak {peak:5.2f} GiB", file=sys.stderr)
        if res["ray"][0]["kept"] != res["pandas"][0]["kept"]:
            raise SystemExit(f"implementations disagree: kept {res['ray'][0]['kept']} vs {res['pandas'][0]['kept']}")
        rows.append((n, size_mb, res))
    print()
    print(f"{'rows':>11} {'MiB':>6} | {'pandas s':>8} {'pandas rows/s':>13} {'peak GiB':>8} | {'ray s':>7} "
          f"{'ray rows/s':>11} {'peak GiB':>8} {'ray start s':>11} | {'ray/pandas':>10}")
    for n, mb, res in rows:
        (p, pm), (r, rm) = res["pandas"], res["ray"]
        pr, rr = p["rows"] / p["seconds"], r["rows"] / r["seconds"]
        print(f"{n:>11,} {mb:>6.0f} | {p['seconds']:>8.1f} {pr:>13,.0f} {pm:>8.2f} | {r['seconds']:>7.1f} {rr:>11,.0f} "
              f"{rm:>8.2f} {r['startup']:>11.1f} | {rr / pr:>9.2f}x")
    print(f"\nmachine: {os.cpu_count()} cores; both read the same CSV; outputs agree on kept rows.")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
