"""Distributed training throughput: samples/s and peak memory per worker, by preset, ZeRO stage and workers.

    python benchmarks/train.py [--presets tiny cpu] [--stages 0 2 3] [--workers 1 2] [--steps 4]
        [--window 2] [--workdir /tmp/deftrec-bench-train] [--json out.json]

For each preset the data (``stages`` of the preset's data section) and a short LightGCN run are
prepared once in ``--workdir``; then every (ZeRO stage, worker count) runs
:func:`deftrec.training.driver.train_distributed` for ``--steps`` optimizer steps (``debug_steps``),
with one CPU and one torch thread per worker. samples/s is the training throughput of the last
logging window of ``--window`` steps (so the first, warm-up window is excluded; validation and
checkpoints are not counted), summed over workers; peak memory is the largest resident set
(``ru_maxrss``) of any worker. The last column is the speed-up over 1 worker at the same stage.
Ray is started once with one logical CPU per worker of the largest configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def prepare(preset: str, workdir: Path) -> Path:
    """RUN_DIR with data/ (the preset's data stages) and collab/ (a short LightGCN run), cached."""
    from deftrec.artifacts.collab import save_collab
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.core.artifacts import is_complete
    from deftrec.data.samples import load_dataset
    from deftrec.end_to_end import run_pipeline
    from deftrec.training.collab_job import fit_collab

    run = workdir / preset
    cfg = load_pipeline_config(REPO / "pipelines" / "configs" / f"{preset}.yaml")
    data_stages = [s for s in cfg.stages if s in ("synth", "preprocess")] or ["preprocess"]
    if not is_complete(run / "data"):
        cwd = os.getcwd()
        os.chdir(REPO)  # presets name shared data relative to the repository root
        try:
            run_pipeline(load_pipeline_config(REPO / "pipelines" / "configs" / f"{preset}.yaml",
                                              [f"stages=[{','.join(data_stages)}]"]), run, log=lambda s: None)
        finally:
            os.chdir(cwd)
    if not is_complete(run / "collab"):
        mcfg = load_pipeline_config(REPO / "pipelines" / "configs" / f"{preset}.yaml",
                                    ["collab.epochs=2", "collab.eval_every=2"]).model
        U, E, hist = fit_collab(mcfg, load_dataset(run / "data"), log=None)
        save_collab(run / "collab", U, E, mcfg.collab, hist)
    return run


def run_one(preset: str, run: Path, stage: int, workers: int, steps: int, window: int) -> dict:
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.config.training import DistributedConfig
    from deftrec.training.driver import train_distributed

    overrides = ["collab.epochs=2", f"train.log_every={window}", "train.validate_every=null",
                 f"train.valid_users={max(8, workers)}", "eval.steps=1", "eval.sampler=ddim",
                 f"train.warmup_steps={max(1, steps // 2)}"]
    pcfg = load_pipeline_config(REPO / "pipelines" / "configs" / f"{preset}.yaml", overrides)
    cfg = pcfg.model
    dist = DistributedConfig(num_workers=workers, cpus_per_worker=1, threads_per_worker=1, zero_stage=stage,
                             debug_steps=steps, name=f"bench-{preset}-z{stage}-w{workers}-{int(time.time())}",
                             storage_path=str(run / "bench_results"), num_to_keep=1)
    t0 = time.perf_counter()
    res = train_distributed(cfg, dist, run, export=False, log=None)
    m = res.metrics
    t = cfg.train
    return {"preset": preset, "zero": stage, "workers": workers, "samples_per_s": m["samples_per_s"],
            "peak_memory_mb": m["peak_memory_mb"], "steps": m["step"],
            "samples_per_step": t.batch_size * t.grad_accum * workers, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (>= 2 x --window)")
    p.add_argument("--window", type=int, default=2, help="steps per logging window (the last one is measured)")
    p.add_argument("--workdir", default="/tmp/deftrec-bench-train")
    p.add_argument("--json", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.steps < 2 * a.window:
        p.error("--steps must be at least 2 x --window (the first window is warm-up)")
    import ray
    import torch

    from deftrec.core.cluster import configure_data_context

    torch.set_num_threads(1)
    ray.init(num_cpus=max(a.workers), include_dashboard=False, logging_level="warning", log_to_driver=False)
    configure_data_context()
    workdir = Path(a.workdir)
    rows = []
    for preset in a.presets:
        t0 = time.perf_counter()
        run = prepare(preset, workdir)
        print(f"[bench] {preset}: data + collab ready in {time.perf_counter() - t0:.0f}s ({run})", flush=True)
        for stage in a.stages:
            for w in sorted(a.workers):
                r = run_one(preset, run, stage, w, a.steps, a.window)
                rows.append(r)
                print(f"[bench] {preset} ZeRO-{stage} x{w}: {r['samples_per_s']:.2f} samples/s, "
                      f"{r['peak_memory_mb']:.0f} MiB peak/worker, {r['wall_s']:.0f}s wall", flush=True)
    base = {(r["preset"], r["zero"]): r["samples_per_s"] for r in rows if r["workers"] == 1}
    print(f"\n{'preset':<7} {'ZeRO':>4} {'workers':>7} {'samples/step':>12} {'samples/s':>10} "
          f"{'peak MiB/worker':>15} {'vs 1 worker':>11}")
    for r in rows:
        b = base.get((r["preset"], r["zero"]))
        ratio = f"{r['samples_per_s'] / b:.2f}x" if b else "-"
        print(f"{r['preset']:<7} {r['zero']:>4} {r['workers']:>7} {r['samples_per_step']:>12} "
              f"{r['samples_per_s']:>10.2f} {r['peak_memory_mb']:>15.0f} {ratio:>11}")
    print(f"\n(1 CPU and 1 torch thread per worker; {a.steps} steps per run, the last {a.window} measured; "
          f"machine: {os.cpu_count()} CPUs)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
