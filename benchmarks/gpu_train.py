"""GPU training throughput of the ``gpu`` preset on one GPU: samples/s and model FLOPs utilisation (MFU).

    python benchmarks/gpu_train.py [--config pipelines/configs/gpu.yaml] [--steps 30] [--window 10]
        [--zero-stage 2] [--llm PATH_OR_ID] [--data-preset tiny] [--peak-tflops 989]
        [--run-dir /tmp/deftrec-bench-gpu] [--set key=value ...]

1. Data and collaborative embeddings are prepared once in ``--run-dir`` (the preset's data section,
   or ``--data-preset``'s, e.g. ``tiny`` for the synthetic log when the shared datasets are not on
   the machine; LightGCN runs only 2 epochs: the embeddings' quality does not change the cost).
2. Model FLOPs per training sample are *measured*: one forward + backward of the training task on a
   few real micro-batches under ``torch.utils.flop_counter.FlopCounterMode`` (every matmul /
   attention FLOP of the LLM, the continuous tokenizer and the diffusion head; no optimizer, no
   recomputation when activation checkpointing is off, as in the preset).
3. :func:`deftrec.training.driver.train_distributed` runs ``--steps`` optimizer steps on one GPU worker
   (DeepSpeed ZeRO ``--zero-stage``, bf16 where supported); samples/s is the training throughput of
   the last logging window of ``--window`` steps (warm-up window, validation and checkpoints excluded).

MFU = samples/s x FLOPs/sample / peak dense FLOP/s of the device in the training precision (looked
up from the device name, or ``--peak-tflops``). Needs a CUDA GPU; ``--llm`` points at a local copy
of the LLM where the hub is unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment; fp32 is not tabled.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 125.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "GH200" before "H200", "A10G" before "A10"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def prepare(config: Path, data_preset: str | None, run: Path, overrides: list[str]) -> None:
    from deftrec.artifacts.collab import save_collab
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.core.artifacts import is_complete
    from deftrec.data.samples import load_dataset
    from deftrec.end_to_end import run_pipeline
    from deftrec.training.collab_job import fit_collab

    if not is_complete(run / "data"):
        src = REPO / "pipelines" / "configs" / f"{data_preset}.yaml" if data_preset else config
        dcfg = load_pipeline_config(src)
        stages = [s for s in dcfg.stages if s in ("synth", "preprocess")] or ["preprocess"]
        cwd = os.getcwd()
        os.chdir(REPO)  # presets name shared data relative to the repository root
        try:
            run_pipeline(load_pipeline_config(src, [f"stages=[{','.join(stages)}]"]), run, log=print)
        finally:
            os.chdir(cwd)
    if not is_complete(run / "collab"):
        cfg = load_pipeline_config(config, [*overrides, "collab.epochs=2", "collab.eval_every=2"]).model
        U, E, hist = fit_collab(cfg, load_dataset(run / "data"), log=print)
        save_collab(run / "collab", U, E, cfg.collab, hist)


def flops_per_sample(cfg, run: Path, n_batches: int = 3) -> float:
    """Measured forward + backward FLOPs per training sample (see the module docstring)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deftrec.artifacts.collab import load_collab
    from deftrec.data.samples import build_training_samples, sample_options, load_dataset
    from deftrec.model.deftrec import DeftRec, DeftRecTask
    from deftrec.training.optim import make_batch

    data = load_dataset(run / "data")
    collab = load_collab(run / "collab")
    t = cfg.train
    samples = build_training_samples(data.train_sequences, data.users, **sample_options(cfg))
    torch.manual_seed(t.seed)
    model = DeftRec.from_config(cfg, collab.item_emb, collab.user_emb if cfg.tokenizer.user_tokens else None,
                                data.catalog).to("cuda")
    if cfg.llm.dtype == "bfloat16":
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode trains
    task = DeftRecTask(model).train()
    rng = np.random.default_rng(0)
    total, n = 0, 0
    for _ in range(n_batches):
        idx = rng.choice(len(samples), size=t.batch_size, replace=False)
        batch = make_batch(model, samples, idx)
        with FlopCounterMode(display=False) as fc:
            task(batch)["total"].backward()
        total += fc.get_total_flops()
        n += t.batch_size
        model.zero_grad(set_to_none=True)
    del model, task
    torch.cuda.empty_cache()
    return total / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "gpu.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--zero-stage", type=int, choices=(0, 2, 3), default=2)
    p.add_argument("--llm", help="override llm.name_or_path (e.g. a local folder of Llama-3.2-1B-Instruct)")
    p.add_argument("--data-preset", help="take the data section from this preset instead (e.g. tiny)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense TFLOP/s in the training precision")
    p.add_argument("--run-dir", default="/tmp/deftrec-bench-gpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.steps < 2 * a.window:
        p.error("--steps must be at least 2 x --window (the first window is warm-up)")
    import ray
    import torch

    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.config.training import DistributedConfig
    from deftrec.training.driver import train_distributed
    from deftrec.training.ds_config import resolve_precision

    if not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    overrides = list(a.set) + ([f"llm.name_or_path={a.llm}"] if a.llm else [])
    run = Path(a.run_dir)
    prepare(Path(a.config), a.data_preset, run, overrides)
    # Benchmark runs: no validation until the end, a tiny final validation, no export.
    overrides += [f"train.log_every={a.window}", "train.validate_every=null", "train.valid_users=8",
                  "eval.steps=1", "eval.sampler=ddim", f"train.warmup_steps={max(1, a.steps // 3)}"]
    pcfg = load_pipeline_config(a.config, overrides)
    cfg = pcfg.model
    precision = resolve_precision("auto", use_gpu=True)
    if precision == "bf16" and cfg.llm.dtype != "bfloat16":
        print(f"note: llm.dtype={cfg.llm.dtype}; DeepSpeed bf16 casts the weights to bfloat16 anyway")
    t0 = time.perf_counter()
    fps = flops_per_sample(cfg, run)
    print(f"[gpu-bench] {device}: {fps / 1e9:.2f} GFLOP per training sample (measured, fwd + bwd) "
          f"in {time.perf_counter() - t0:.0f}s")
    ray.init(num_gpus=1, include_dashboard=False, logging_level="warning")
    dist = DistributedConfig(num_workers=1, use_gpu=True, cpus_per_worker=max(1, (os.cpu_count() or 2) // 2),
                             zero_stage=a.zero_stage, precision="auto", debug_steps=a.steps,
                             name=f"gpu-bench-{int(time.time())}", storage_path=str(run / "bench_results"),
                             num_to_keep=1)
    t0 = time.perf_counter()
    res = train_distributed(cfg, dist, run, export=False)
    wall = time.perf_counter() - t0
    m = res.metrics
    sps = m["samples_per_s"]
    peak = a.peak_tflops or (peak_tflops(device) if precision == "bf16" else None)
    achieved = sps * fps
    print("\n== gpu training benchmark ==")
    print(f"device            {device} ({precision}, ZeRO-{a.zero_stage}, 1 worker)")
    print(f"llm               {cfg.llm.name_or_path} (lora={cfg.llm.lora})")
    print(f"steps             {m['step']} x {cfg.train.batch_size * cfg.train.grad_accum} samples "
          f"(last {a.window} measured), wall {wall:.0f}s incl. start-up")
    print(f"samples/s         {sps:.2f}")
    print(f"peak GPU memory   {m['peak_memory_mb'] / 1024:.2f} GiB")
    print(f"model TFLOP/s     {achieved / 1e12:.2f}")
    if peak:
        print(f"MFU               {100 * achieved / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s peak")
    else:
        print("MFU               unknown peak for this device: pass --peak-tflops")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
