"""Closed-loop HTTP load on the Serve endpoint (loopback only): QPS and latency percentiles.

    python benchmarks/serve_load.py --run-dir runs/tiny [--clients 1 8 32] [--steps 10 50] \
        [--topology split fused] [--seconds 10]

For each topology and DDIM step count the application is (re)deployed on 127.0.0.1:8000, then
for each client count N, N threads each send ``POST /recommend`` for random known users, one
request after the other, for ``--seconds`` (and at most ``--max-requests`` in total). Prints QPS,
p50/p95/p99 latency and the mean served batch size.

Serving settings used (printed with the table): Ray's high-throughput Serve mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, set before Ray starts; ``--no-throughput-optimized`` to
compare) and per-request access logs off (``--access-log`` to keep them). Goals on a 2-core
machine: ``tiny`` p99 < 100 ms at 8 clients; ``cpu`` QPS at 32 clients >= 3x QPS at 1 client.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def closed_loop(url: str, users: list[str], clients: int, seconds: float, max_requests: int, k: int = 10):
    import httpx

    lat, batch, errors = [], [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    count = [0]

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop_at:
                with lock:
                    if count[0] >= max_requests:
                        return
                    count[0] += 1
                t0 = time.perf_counter()
                r = c.post("/recommend", json={"user_id": users[rng.integers(len(users))], "k": k})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        batch.append(r.json()["timings_ms"]["batch_size"])
                    else:
                        errors.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return {"qps": len(lat) / wall, "p50": np.percentile(lat_ms, 50), "p95": np.percentile(lat_ms, 95),
            "p99": np.percentile(lat_ms, 99), "batch": float(np.mean(batch)), "n": len(lat), "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a run with data/, model/ and index/")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the recommender replica")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.02,
                    help="@serve.batch wait; 0.02 let 8 closed-loop clients share one batch on tiny")
    ap.add_argument("--topology", nargs="+", default=["split", "fused"], choices=["split", "fused"])
    ap.add_argument("--access-log", action="store_true", help="keep Serve's per-request access log")
    ap.add_argument("--no-throughput-optimized", action="store_true",
                    help="do not set RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    a = ap.parse_args()
    import os

    if not a.no_throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # read by every Serve process Ray starts
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from deftrec.serve import build_app

    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    users = [str(u) for u in pq.read_table(Path(a.run_dir) / "data" / "users.parquet").column("user_id").to_pylist()]
    logging_config = None if a.access_log else {"enable_access_log": False}
    rows = []
    for topo in a.topology:
        for steps in a.steps:
            serve.run(build_app(a.run_dir, num_cpus=a.num_cpus, ddim_steps=steps, max_batch_size=a.max_batch_size,
                                batch_wait_timeout_s=a.batch_wait_timeout_s, topology=topo),
                      route_prefix="/", logging_config=logging_config)
            closed_loop("http://127.0.0.1:8000", users, 2, 2.0, 50)  # warm-up
            for c in a.clients:
                r = closed_loop("http://127.0.0.1:8000", users, c, a.seconds, a.max_requests)
                rows.append((topo, steps, c, r))
                print(f"  {topo} DDIM-{steps} clients {c}: {r['qps']:.1f} QPS p50 {r['p50']:.1f} ms "
                      f"p99 {r['p99']:.1f} ms batch {r['batch']:.1f}", file=sys.stderr)
            serve.delete("default")
    serve.shutdown()
    print(f"\nrun {a.run_dir}; RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}; "
          f"access log {'on' if a.access_log else 'off'}; max_batch_size {a.max_batch_size}; "
          f"batch_wait_timeout_s {a.batch_wait_timeout_s}; replica CPUs {a.num_cpus}; {a.seconds:g} s per row")
    print(f"{'topology':>8} {'DDIM':>5} {'clients':>7} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'requests':>8} {'errors':>6}")
    for topo, steps, c, r in rows:
        print(f"{topo:>8} {steps:>5} {c:>7} {r['qps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
              f"{r['batch']:>6.1f} {r['n']:>8} {r['errors']:>6}")
    for topo in a.topology:
        for steps in a.steps:
            q = {c: r["qps"] for t, s, c, r in rows if (t, s) == (topo, steps)}
            if min(a.clients) in q and max(a.clients) in q:
                print(f"{topo} DDIM-{steps}: QPS at {max(a.clients)} clients / QPS at {min(a.clients)} client = "
                      f"{q[max(a.clients)] / q[min(a.clients)]:.1f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
