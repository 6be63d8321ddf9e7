"""The whole pipeline as the data grows: seconds, peak memory and throughput per stage, and the slope.

    python benchmarks/scale.py                                   # 10k and 100k users
    python benchmarks/scale.py --size 10000:2000 --size 100000:20000 --size 1000000:100000
    python benchmarks/scale.py --size 2000:400 --max-steps 20    # a quick look
    python benchmarks/scale.py --size 1000000:100000 --set collab.epochs=3 --merge   # beside earlier sizes

Each ``--size USERS:ITEMS`` runs README command (1)'s preset (``pipelines/configs/tiny.yaml``) with only
the data size changed (``data.synth.users``, ``data.synth.items``, ``data.synth.mean_length``),
training capped at ``--max-steps`` steps and any ``--set KEY=VALUE`` overrides (recorded per size),
one stage at a time in its own process (which starts its own
Ray): the stage's seconds come from the pipeline's summary, its peak memory from sampling the resident
memory of that process tree (the driver, the raylet and every Ray worker) every 0.2 s: the largest
single process and the whole tree (the tree's sum counts shared object-store pages once per process
that maps them, so it overstates). A stage that fails or refuses ends that size with its last error
line. Then, for every two consecutive sizes, each stage's slope: log(seconds ratio) / log(rows ratio)
(1: linear in the data); LightGCN's slope is per epoch, since early stopping (or ``collab.epochs``)
sets how many it runs. ``--merge`` keeps the sizes an earlier run recorded in ``WORK/scale.json``
beside the new ones, in the tables and the slopes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synth", "preprocess", "collab", "train", "index", "evaluate")

#: runs one prefix of the stages (the earlier ones are up to date, so skipped) and prints the summary
_RUNNER = """
import json, sys
from deftrec.config.pipeline import load_pipeline_config
from deftrec.end_to_end import run_pipeline
cfg = load_pipeline_config(sys.argv[1], sys.argv[3:])
summary = run_pipeline(cfg, sys.argv[2], log=lambda line: print(line, file=sys.stderr, flush=True))
print("SUMMARY " + json.dumps(summary, default=str))
"""


class MemorySampler:
    """Peak resident memory of a process tree: the largest single process and the sum."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.largest = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            sizes = []
            for p in procs:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            if sizes:
                self.largest, self.total = max(self.largest, max(sizes)), max(self.total, sum(sizes))
            self._stop.wait(every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(stage: str, overrides: list[str], run_dir: Path, log_path: Path) -> dict:
    """Stages up to ``stage`` (earlier ones skipped as up to date) in a fresh process; its measurements."""
    upto = list(STAGES[: STAGES.index(stage) + 1])
    argv = [sys.executable, "-c", _RUNNER, str(REPO / "pipelines" / "configs" / "tiny.yaml"), str(run_dir),
            *overrides, f"stages=[{','.join(upto)}]"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, inside the measured tree
    t0 = time.perf_counter()
    with open(log_path, "a") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        sampler = MemorySampler(proc.pid)
        out, _ = proc.communicate()
        sampler.stop()
    lines = out.splitlines()
    with open(log_path, "a") as err:  # Ray forwards the workers' progress lines to the driver's stdout
        err.writelines(line + "\n" for line in lines if not line.startswith("SUMMARY "))
    row = {"stage": stage, "wall_s": time.perf_counter() - t0, "largest_gib": sampler.largest / 2**30,
           "tree_gib": sampler.total / 2**30}
    summary = next((json.loads(line[8:]) for line in lines if line.startswith("SUMMARY ")), None)
    if proc.returncode != 0 or summary is None:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        row["error"] = f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
        return row
    row["seconds"] = summary["stages"][stage]["seconds"]
    if stage == "synth":
        row["rows"] = summary["stages"]["synth"].get("rows")
    if stage == "collab":
        row["epochs"] = json.loads((run_dir / "collab" / "manifest.json").read_text())["epochs_run"]
    if stage == "evaluate":
        m = summary["metrics"]
        row["models"] = sorted(m["results"])
        row["not_run"] = m.get("baselines_not_run", {})
    return row


def run_size(users: int, items: int, mean_length: int, max_steps: int, work: Path,
             extra: list[str]) -> list[dict]:
    run_dir = work / f"u{users}_i{items}"
    overrides = [f"data.synth.users={users}", f"data.synth.items={items}", f"data.synth.mean_length={mean_length}",
                 f"train.max_steps={max_steps}", *extra]
    rows = [{"stage": "overrides", "overrides": overrides}]
    for stage in STAGES:
        print(f"[scale] {users:,} users / {items:,} items: {stage} ...", flush=True)
        row = run_stage(stage, overrides, run_dir, work / f"u{users}_i{items}.log")
        rows.append(row)
        print(f"[scale]   {json.dumps(row, default=str)}", flush=True)
        if "error" in row:
            break
    return rows


def print_tables(results: dict[tuple[int, int], list[dict]]) -> None:
    print("\n| users | items | rows | stage | seconds | rows/s | largest process GiB | process tree GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (users, items), rows in results.items():
        extra = next((r["overrides"][4:] for r in rows if r["stage"] == "overrides"), [])
        if extra:
            print(f"| {users:,} | {items:,} |  | overrides: {' '.join(extra)} |  |  |  |  |")
        rows = [r for r in rows if r["stage"] in STAGES]
        n_rows = next((r.get("rows") for r in rows if r["stage"] == "synth"), None)
        for r in rows:
            if "error" in r:
                print(f"| {users:,} | {items:,} | {n_rows or '-'} | {r['stage']} | {r['error']} | | "
                      f"{r['largest_gib']:.2f} | {r['tree_gib']:.2f} |")
                continue
            rate = f"{n_rows / r['seconds']:,.0f}" if n_rows and r["seconds"] else "-"
            stage = f"collab ({r['epochs']} epochs)" if "epochs" in r else r["stage"]
            print(f"| {users:,} | {items:,} | {n_rows:,} | {stage} | {r['seconds']:.1f} | {rate} | "
                  f"{r['largest_gib']:.2f} | {r['tree_gib']:.2f} |")
        evaluate = next((r for r in rows if r["stage"] == "evaluate" and "models" in r), None)
        if evaluate is not None:
            print(f"|  |  |  | models in metrics.json: {', '.join(evaluate['models'])}; not run: "
                  f"{evaluate['not_run'] or 'none'} |  |  |  |  |")
    sizes = list(results)
    if len(sizes) < 2:
        return
    print("\nslope: log(seconds ratio) / log(rows ratio) between consecutive sizes (1 = linear)")
    print("| from | to | " + " | ".join(STAGES) + " |")
    print("|---|---|" + "---|" * len(STAGES))
    for a, b in zip(sizes, sizes[1:]):
        ra, rb = ({r["stage"]: r for r in results[s]} for s in (a, b))
        rows_a, rows_b = ra.get("synth", {}).get("rows"), rb.get("synth", {}).get("rows")
        cells = []
        for stage in STAGES:
            sa, sb = ra.get(stage, {}).get("seconds"), rb.get(stage, {}).get("seconds")
            if stage == "collab" and sa and sb:  # per epoch
                sa, sb = sa / ra[stage].get("epochs", 1), sb / rb[stage].get("epochs", 1)
            ok = sa and sb and rows_a and rows_b and rows_b != rows_a
            cells.append(f"{math.log(sb / sa) / math.log(rows_b / rows_a):.2f}" if ok else "-")
        print(f"| {a[0]:,} | {b[0]:,} | " + " | ".join(cells) + " |")


def parse_size(text: str) -> tuple[int, int]:
    users, sep, items = text.partition(":")
    if not sep or not users.isdigit() or not items.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must look like USERS:ITEMS, e.g. 100000:20000")
    return int(users), int(items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, action="append", default=[], metavar="USERS:ITEMS")
    p.add_argument("--mean-length", type=int, default=20, help="mean interactions per user")
    p.add_argument("--max-steps", type=int, default=200, help="training steps (train.max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every size")
    p.add_argument("--work", type=Path, default=Path("/tmp/deftrec-scale"))
    p.add_argument("--merge", action="store_true", help="keep the other sizes recorded in WORK/scale.json")
    a = p.parse_args(argv)
    sizes = a.size or [(10_000, 2_000), (100_000, 20_000)]
    a.work.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.merge and (a.work / "scale.json").is_file():
        earlier = json.loads((a.work / "scale.json").read_text())
        results = {parse_size(key): rows for key, rows in earlier.items() if parse_size(key) not in sizes}
    for u, i in sizes:
        results[(u, i)] = run_size(u, i, a.mean_length, a.max_steps, a.work, a.set)
    results = dict(sorted(results.items()))
    print_tables(results)
    (a.work / "scale.json").write_text(json.dumps({f"{u}:{i}": r for (u, i), r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
