"""Distributed DeftRec training (deftrec.training): DeepSpeed config, data plumbing, and real Ray Train
runs with DeepSpeed on CPU: fault tolerance (a worker killed mid-run), resume by run name, resume on
another worker count, ZeRO-3 consolidation.

The Ray runs share the session's Ray instance (conftest ``ray_session``, 2 CPUs) and a small
synthetic dataset built once for the module. The multi-node test lives in tests/test_multinode.py
(it needs its own ``ray.cluster_utils.Cluster``).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from deftrec.config.pipeline import load_deftrec_config
from deftrec.config.training import DistributedConfig, TrainConfig
from deftrec.data.samples import Ragged, build_training_samples, sample_options
from deftrec.retrieval.metrics import evaluate_both_protocols
from deftrec.training.checkpoint import config_fingerprint, read_trainer_state
from deftrec.training.dataset import plan_steps, samples_table, shard_bounds
from deftrec.training.driver import train_distributed
from deftrec.training.ds_config import (
    REFERENCE_CONFIGS,
    build_deepspeed_config,
    reference_deepspeed_config,
    resolve_precision,
)
from deftrec.training.worker import _set_schedule_step

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    ({"zero_stage": 1}, "zero_stage must be 0, 2 or 3"),
    ({"zero_stage": 0, "offload_optimizer": True}, "offload_optimizer needs zero_stage 2 or 3"),
    ({"zero_stage": 2, "offload_params": True}, "offload_params needs zero_stage 3"),
    ({"precision": "fp16"}, "precision must be"),
    ({"precision": "bf16"}, "bf16 needs use_gpu"),
    ({"num_workers": 0}, "num_workers must be a positive int"),
    ({"cpus_per_worker": 0}, "cpus_per_worker must be a number > 0"),
    ({"max_failures": -2}, "max_failures must be an int >= -1"),
    ({"name": "a/b"}, "plain directory name"),
    ({"checkpoint_every": 0}, "checkpoint_every must be a positive int or null"),
])
def test_distributed_config_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedConfig(**kwargs)


def test_distributed_config_from_preset_section():
    from deftrec.config.pipeline import load_pipeline_config

    cfg = load_pipeline_config(TINY, ["distributed.num_workers=3", "distributed.cpus_per_worker=2",
                                      "distributed.zero_stage=3", "distributed.offload_params=true"])
    d = cfg.distributed
    assert (d.num_workers, d.cpus_per_worker, d.zero_stage, d.offload_params) == (3, 2.0, 3, True)
    assert d.threads == 2 and DistributedConfig(cpus_per_worker=0.5).threads == 1


def test_deepspeed_config_has_concrete_values():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    train = TrainConfig(batch_size=4, grad_accum=3, grad_clip=0.5)
    for stage in (0, 2, 3):
        c = build_deepspeed_config(train, DistributedConfig(zero_stage=stage), world_size=5, precision="fp32")
        assert c["train_batch_size"] == 4 * 3 * 5
        assert c["train_micro_batch_size_per_gpu"] == 4 and c["gradient_accumulation_steps"] == 3
        assert c["gradient_clipping"] == 0.5
        assert c["bf16"] == {"enabled": False} and c["fp16"] == {"enabled": False}
        assert "auto" not in json.dumps(c)  # only HF's Trainer fills "auto"
        z = DeepSpeedZeroConfig(**c["zero_optimization"])  # DeepSpeed's own schema (rejects unknown keys)
        assert z.stage == stage and z.offload_optimizer is None and z.offload_param is None
    c = build_deepspeed_config(TrainConfig(grad_clip=None), DistributedConfig(zero_stage=3, use_gpu=True,
                                                                             offload_optimizer=True,
                                                                             offload_params=True),
                               world_size=2, precision="bf16")
    z = DeepSpeedZeroConfig(**c["zero_optimization"])
    assert c["bf16"]["enabled"] and c["gradient_clipping"] == 0.0
    assert z.offload_optimizer.device == "cpu" and z.offload_param.device == "cpu"
    assert c["zero_force_ds_cpu_optimizer"] is False  # torch AdamW kept with offload (torch_adam default)
    with pytest.raises(ValueError, match="resolved"):
        build_deepspeed_config(train, DistributedConfig(), 1, "auto")
    with pytest.raises(ValueError, match="world_size"):
        build_deepspeed_config(train, DistributedConfig(), 0, "fp32")


def test_reference_json_files_agree_with_the_builder():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name in REFERENCE_CONFIGS:
        on_disk = json.loads((REPO / "cluster" / "deepspeed" / name).read_text())
        assert on_disk == reference_deepspeed_config(name), f"regenerate with write_reference_configs: {name}"
        t = TrainConfig()
        assert on_disk["train_batch_size"] == t.batch_size * t.grad_accum * REFERENCE_CONFIGS[name]["world_size"]
        DeepSpeedZeroConfig(**on_disk["zero_optimization"])
    z3 = json.loads((REPO / "cluster" / "deepspeed" / "zero3_offload.json").read_text())["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_param"]["device"] == "cpu" and z3["offload_optimizer"]["device"] == "cpu"


def test_precision_auto_is_fp32_without_cuda():
    assert resolve_precision("auto", use_gpu=False) == "fp32"
    assert resolve_precision("auto", use_gpu=True) == ("bf16" if torch.cuda.is_available()
                                                        and torch.cuda.is_bf16_supported() else "fp32")
    assert resolve_precision("bf16", use_gpu=True) == "bf16"


# --------------------------------------------------------------------------------------------- pieces


def test_samples_table_matches_the_prefix_rule_by_hand():
    import pyarrow as pa

    seqs = pa.table({"user": pa.array([7, 9], pa.int64()),
                     "items": pa.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]], pa.list_(pa.int32()))})
    t = samples_table(seqs, min_history=2, max_samples_per_user=3, max_history=2)
    # user 7: training sequence s[:-2] = 1..5; targets j = 4, 3, 2 (newest first), history <= 2 items
    # user 9: s[:-2] = [8, 9]; a target needs >= 2 items before it: none
    assert t.column("user").to_pylist() == [7, 7, 7]
    assert t.column("target").to_pylist() == [5, 4, 3]
    assert t.column("history").to_pylist() == [[3, 4], [2, 3], [1, 2]]
    # and it agrees with the library's vectorised builder on a random batch
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, size=n).tolist() for n in rng.integers(3, 30, size=40)]
    seqs = pa.table({"user": pa.array(np.arange(40), pa.int64()), "items": pa.array(rows, pa.list_(pa.int32()))})
    t = samples_table(seqs, 3, 5, 4)
    ref = build_training_samples(Ragged.from_lists(rows).drop_last(2), np.arange(40), 3, 5, 4)
    assert t.column("user").to_pylist() == ref.users.tolist()
    assert t.column("target").to_pylist() == ref.targets.tolist()
    assert t.column("history").to_pylist() == [h.tolist() for h in ref.histories]


def test_validation_slices_cover_the_set_and_combine_to_the_whole():
    for n, w in ((33, 2), (10, 3), (7, 7), (100, 8)):
        bounds = [shard_bounds(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)  # rank 0 never gets less
    # the workers all-reduce sum_r n_r * metric_r and sum_r n_r: per-user means recombine exactly
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(33, 20))
    targets = rng.integers(0, 20, size=33)
    hist = Ragged.from_lists([rng.integers(0, 20, size=k).tolist() for k in rng.integers(0, 4, size=33)])
    whole = evaluate_both_protocols(scores, targets, hist)
    sums: dict = {}
    for r in range(2):
        a, b = shard_bounds(33, r, 2)
        part = evaluate_both_protocols(scores[a:b], targets[a:b], hist[a:b])
        for protocol, values in part.items():
            for k, v in values.items():
                sums[(protocol, k)] = sums.get((protocol, k), 0.0) + v * (b - a)
    for protocol in whole:
        for k, v in whole[protocol].items():
            assert sums[(protocol, k)] / 33 == pytest.approx(v, abs=1e-12)


def test_step_plan():
    t = TrainConfig(batch_size=16, grad_accum=2, epochs=3, max_steps=None, warmup_steps=1)
    # 1000 samples / 2 ranks = 500 each -> 31 micro-batches -> 15 steps per epoch
    assert plan_steps(1000, t, 2) == (15, 45)
    assert plan_steps(1000, TrainConfig(batch_size=16, grad_accum=2, epochs=3, max_steps=20, warmup_steps=1), 2) \
        == (15, 20)
    assert plan_steps(1000, t, 2, debug_steps=7) == (15, 7)
    with pytest.raises(ValueError, match="no full optimizer step"):
        plan_steps(40, t, 2)


def test_resumed_schedule_matches_an_uninterrupted_one():
    from deftrec.training.optim import build_scheduler, lr_factor

    cfg = load_deftrec_config(TINY, ["train.warmup_steps=3", "train.min_lr_ratio=0.1"])
    p = torch.nn.Parameter(torch.zeros(1))

    def sched():
        opt = torch.optim.AdamW([{"params": [p], "lr": 0.01}])
        return opt, build_scheduler(opt, cfg, total_steps=20)

    opt_a, a = sched()
    for _ in range(11):
        opt_a.step()
        a.step()
    opt_b, b = sched()
    _set_schedule_step(b, 11)
    assert b.last_epoch == a.last_epoch == 11
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(11, 3, 20, 0.1))


def test_config_fingerprint_ignores_run_length_only():
    base = load_deftrec_config(TINY)
    fp = config_fingerprint(base)
    assert config_fingerprint(load_deftrec_config(TINY, ["train.max_steps=999", "train.epochs=9",
                                                         "train.log_every=7", "eval.steps=1"])) == fp
    assert config_fingerprint(load_deftrec_config(TINY, ["train.lr=0.5"])) != fp
    assert config_fingerprint(load_deftrec_config(TINY, ["diffusion.hidden=64"])) != fp


# --------------------------------------------------------------------------------------------- Ray runs

TRAIN = ["collab.dim=16", "train.batch_size=8", "train.max_steps=8", "train.warmup_steps=2", "train.log_every=2",
         "train.validate_every=4", "train.valid_users=33", "eval.batch_size=8", "eval.steps=1",
         "diffusion.hidden=64", "train.epochs=3"]


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory) -> Path:
    """Preprocessed small synthetic log + collab artifact (LightGCN in-process: the job has its own tests)."""
    from deftrec.artifacts.collab import save_collab
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.data.samples import load_dataset
    from deftrec.end_to_end import run_pipeline
    from deftrec.training.collab_job import fit_collab

    d = tmp_path_factory.mktemp("dist_run")
    pcfg = load_pipeline_config(TINY, ["stages=[synth,preprocess]", "data.synth.users=300", "data.synth.items=120",
                                       "data.synth.mean_length=20", "collab.epochs=4", *TRAIN])
    run_pipeline(pcfg, d, log=lambda s: None)
    cfg = pcfg.model
    U, E, hist = fit_collab(cfg, load_dataset(d / "data"), log=None)
    save_collab(d / "collab", U, E, cfg.collab, hist)
    return d


def _recorder(events: Path, kill_marker: Path | None = None, kill_rank: int = 1, kill_step: int = 3):
    """step_callback: append "pid rank step" per step; optionally SIGKILL one worker once (marker file)."""
    events, marker = str(events), str(kill_marker) if kill_marker else None

    def callback(step: int, rank: int) -> None:
        with open(events, "a") as f:
            f.write(f"{os.getpid()} {rank} {step}\n")
        if marker and rank == kill_rank and step == kill_step and not os.path.exists(marker):
            import ray.train

            # Ray's controller registers a reported checkpoint asynchronously (it polls the workers);
            # wait until the last one is committed so that the resume step is exactly known.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            open(marker, "w").close()  # only the first attempt dies
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def _events(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()]


def _check_export_matches_checkpoint(run_dir: Path, result, data_dir: Path | None = None) -> None:
    """The exported model reproduces, on one process, the validation metrics the workers all-reduced."""
    from deftrec.artifacts.model import load_model
    from deftrec.data.samples import load_dataset
    from deftrec.training.validation import evaluate

    model = load_model(run_dir / "model")
    state = result.state
    best = next(v for v in state.validations if v["step"] == state.best_step)
    valid = load_dataset(data_dir or run_dir / "data").valid.sample(model.cfg.train.valid_users, model.cfg.train.seed)
    again = evaluate(model, valid, seed=model.cfg.eval.seed)
    for protocol in ("history_excluded", "history_kept"):
        for k in ("hr@10", "ndcg@10", "mrr"):
            assert again[protocol][k] == pytest.approx(best[protocol][k], abs=1e-9), (protocol, k)
    assert state.best_score == pytest.approx(best["history_excluded"]["ndcg@10"])


def test_killed_worker_resumes_from_latest_checkpoint(run_dir, tmp_path):
    cfg = load_deftrec_config(TINY, TRAIN)
    events, marker = tmp_path / "events.txt", tmp_path / "killed"
    dist = DistributedConfig(num_workers=2, zero_stage=2, checkpoint_every=2, max_failures=1, name="ft")
    res = train_distributed(cfg, dist, run_dir, step_callback=_recorder(events, marker), log=None)
    assert marker.exists()  # the kill happened
    ev = _events(events)
    pids = list(dict.fromkeys(pid for pid, _, _ in ev))  # in order of appearance
    assert len(pids) == 4  # 2 workers x 2 attempts
    first = [(r, s) for pid, r, s in ev if pid in pids[:2]]
    second = [(r, s) for pid, r, s in ev if pid in pids[2:]]
    assert max(s for _, s in first) == 3  # rank 1 died at step 3, after the checkpoint of step 2
    # the second attempt continued from the latest checkpoint (step 2), it did not restart at 1
    for rank in (0, 1):
        assert [s for r, s in second if r == rank] == [3, 4, 5, 6, 7, 8]
    st = res.state
    latest = read_trainer_state(res.latest_checkpoint)
    assert latest.step == 8 and latest.done and latest.attempts == 2 and latest.world_size == 2
    assert [v["step"] for v in latest.validations] == [4, 8]
    assert st.best_step in (4, 8)
    scores = [v["history_excluded"]["ndcg@10"] for v in latest.validations]
    assert latest.lr_decays == int(scores[1] <= scores[0])  # train.plateau_decay's count is checkpointed
    assert res.metrics["step"] == 8 and res.metrics["world_size"] == 2 and res.metrics["samples_per_s"] > 0
    # the exported model loads without DeepSpeed and reproduces the best checkpoint's validation
    _check_export_matches_checkpoint(run_dir, res)
    # kept checkpoints (num_to_keep=2, by validation NDCG@10; unvalidated ones score -1): the two
    # validated ones, which include the best and the latest
    kept = sorted(p.name[:19] for p in (run_dir / "ray_results" / "ft").glob("checkpoint_0*") if p.is_dir())
    assert kept == ["checkpoint_00000004", "checkpoint_00000008"]
    assert f"checkpoint_{st.best_step:08d}" in kept


def test_same_name_resumes_and_other_worker_count_continues(run_dir, tmp_path):
    events = tmp_path / "events.txt"
    cfg = load_deftrec_config(TINY, TRAIN)
    dist = DistributedConfig(num_workers=2, zero_stage=2, checkpoint_every=2, name="ft")
    if not (run_dir / "ray_results" / "ft").exists():  # run alone: make the finished run first
        train_distributed(cfg, dist, run_dir, log=None)
    # 1) the same command again: resumes the finished run, no step is trained twice
    res = train_distributed(cfg, dist, run_dir, step_callback=_recorder(events), log=None)
    assert _events(events) == [] and read_trainer_state(res.latest_checkpoint).step == 8
    attempts_before = read_trainer_state(res.latest_checkpoint).attempts  # 1 alone, 2 after the kill test
    # 2) a changed model/optimisation config under the same name is refused before any work
    with pytest.raises(ValueError, match="different configuration"):
        train_distributed(load_deftrec_config(TINY, [*TRAIN, "train.lr=0.1"]), dist, run_dir, log=None)
    # 3) more steps on ONE worker: resumes the 2-worker ZeRO-2 run from its consolidated weights
    longer = load_deftrec_config(TINY, [*TRAIN, "train.max_steps=10"])
    res = train_distributed(longer, DistributedConfig(num_workers=1, zero_stage=2, name="ft"), run_dir,
                            step_callback=_recorder(events), log=None)
    assert [(r, s) for _, r, s in _events(events)] == [(0, 9), (0, 10)]
    latest = read_trainer_state(res.latest_checkpoint)
    assert latest.step == 10 and latest.world_size == 1 and latest.attempts == attempts_before + 1
    assert [v["step"] for v in latest.validations] == [4, 8, 10]  # history carried over
    _check_export_matches_checkpoint(run_dir, res)


def test_zero3_two_workers_consolidates_validates_and_stops_in_lockstep(run_dir, tmp_path):
    # 33 validation users, eval batches of 8: slices of 17 and 16 users -> 3 and 2 batches, so
    # rank 1 must run a dummy batch to keep ZeRO-3's collective parameter gathers in step.
    # Validation after every step with patience 1: the first validation without an NDCG@10 gain
    # stops both ranks at the same step.
    events = tmp_path / "events.txt"
    cfg = load_deftrec_config(TINY, [*TRAIN, "train.max_steps=6", "train.validate_every=1", "train.patience=1"])
    res = train_distributed(cfg, DistributedConfig(num_workers=2, zero_stage=3, name="z3"), tmp_path / "z3run",
                            data_dir=run_dir / "data", collab_dir=run_dir / "collab",
                            step_callback=_recorder(events), log=None)
    latest = read_trainer_state(res.latest_checkpoint)
    assert latest.zero_stage == 3 and latest.done
    scores = [v["history_excluded"]["ndcg@10"] for v in latest.validations]
    assert [v["step"] for v in latest.validations] == list(range(1, latest.step + 1))
    improved = [b > max(scores[:i + 1]) for i, b in enumerate(scores[1:])]
    # early stopping rule: stop at the first validation without a gain, else run to max_steps
    assert latest.stopped_early == (not all(improved))
    assert latest.step == (improved.index(False) + 2 if not all(improved) else 6)
    steps = {r: max(s for _, rr, s in _events(events) if rr == r) for r in (0, 1)}
    assert steps == {0: latest.step, 1: latest.step}
    from safetensors.torch import load_file

    from deftrec.training.checkpoint import WEIGHTS_FILE

    w = load_file(str(Path(res.best_checkpoint) / WEIGHTS_FILE))
    # full (gathered) tensors, not the empty local partitions ZeRO-3 leaves on each rank
    den = [k for k in w if k.endswith("head.denoiser.out.weight")]
    assert den and w[den[0]].shape == (16, 64) and float(w[den[0]].abs().sum()) > 0
    _check_export_matches_checkpoint(tmp_path / "z3run", res, data_dir=run_dir / "data")


def test_both_sample_sources_give_the_library_samples(run_dir):
    """driver-built blocks and the lazy read_parquet -> map_batches stream hold the same rows."""
    from deftrec.data.samples import load_dataset
    from deftrec.training.dataset import build_train_dataset

    cfg = load_deftrec_config(TINY, TRAIN)
    data = load_dataset(run_dir / "data")
    ref = build_training_samples(data.train_sequences, data.users, **sample_options(cfg))
    expected = sorted(zip(ref.users.tolist(), ref.targets.tolist(), (tuple(h.tolist()) for h in ref.histories)))
    for source in ("driver", "stream"):
        ds = build_train_dataset(run_dir / "data", cfg, source=source, num_blocks=5)
        rows = ds.take_all()
        got = sorted((r["user"], r["target"], tuple(r["history"])) for r in rows)
        assert got == expected, source
