"""A training run is its config *and* the data and collab artifacts it trains on: a rerun under
the same run name on other data (another synth seed) or other LightGCN embeddings neither resumes
nor re-exports the old run, and says what changed. Real artifacts; the last test is a real Ray
Train run at toy size."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest
from deftrec.training.checkpoint import read_trainer_state, run_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def _artifact(path: Path, payload: bytes) -> Path:
    with atomic_directory(path, overwrite=True) as tmp:
        (tmp / "part.bin").write_bytes(payload)
        finish_manifest(tmp, {"stage": "test"})
    return path


def test_run_inputs_follow_the_contents_of_data_and_collab(tmp_path):
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.config.training import DistributedConfig
    from deftrec.training.driver import train_fingerprint

    data, collab = _artifact(tmp_path / "data", b"seed 1"), _artifact(tmp_path / "collab", b"E1")
    base = run_inputs(data, collab)
    cfg, dist = load_deftrec_config(TINY), DistributedConfig()
    fp = train_fingerprint(cfg, dist, data, collab)
    _artifact(tmp_path / "data2", b"seed 1")  # same content elsewhere: the same data
    assert run_inputs(tmp_path / "data2", collab) == base
    _artifact(data, b"seed 2")  # rebuilt from another seed, same place
    now = run_inputs(data, collab)
    assert now["data"] != base["data"] and now["collab"] == base["collab"]
    assert train_fingerprint(cfg, dist, data, collab) != fp
    _artifact(collab, b"E2")
    assert run_inputs(data, collab)["collab"] != base["collab"]
    (collab / "manifest.json").unlink()  # unfinished collab: no identity, no run
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_inputs(data, collab)


TRAIN = ["collab.dim=16", "train.batch_size=8", "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
         "train.validate_every=2", "train.valid_users=16", "eval.batch_size=8", "eval.steps=1",
         "diffusion.hidden=32", "train.epochs=1"]


def _prepared(run_dir: Path, seed: int) -> None:
    from deftrec.artifacts.collab import save_collab
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.data.samples import load_dataset
    from deftrec.end_to_end import run_pipeline
    from deftrec.training.collab_job import fit_collab

    pcfg = load_pipeline_config(TINY, ["stages=[synth,preprocess]", "data.synth.users=120", "data.synth.items=48",
                                       "data.synth.mean_length=16", f"data.synth.seed={seed}",
                                       "data.preprocess.item_core=1", "collab.epochs=1", *TRAIN])
    run_pipeline(pcfg, run_dir, log=lambda s: None)
    cfg = pcfg.model
    U, E, hist = fit_collab(cfg, load_dataset(run_dir / "data"), log=None)
    save_collab(run_dir / "collab", U, E, cfg.collab, hist)


def test_rerun_on_other_data_or_collab_neither_resumes_nor_reexports(ray_session, tmp_path):
    from deftrec.artifacts.collab import load_collab, save_collab
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.config.training import DistributedConfig
    from deftrec.core.artifacts import read_manifest
    from deftrec.training.driver import train_distributed

    run, other = tmp_path / "run", tmp_path / "other"
    _prepared(run, seed=1)
    cfg = load_deftrec_config(TINY, TRAIN)
    dist = DistributedConfig(num_workers=1, name="ft")
    res = train_distributed(cfg, dist, run, log=None)
    inputs = run_inputs(run / "data", run / "collab")
    assert read_trainer_state(res.latest_checkpoint).inputs == inputs
    exported = read_manifest(run / "model")
    assert exported["inputs"] == inputs
    events = str(tmp_path / "steps.txt")

    def record(step: int, rank: int) -> None:  # runs in the workers: a file, not a list
        with open(events, "a") as f:
            f.write(f"{step}\n")

    # other LightGCN embeddings (same shape, so only the identity can tell): refused before any work
    col = load_collab(run / "collab")
    save_collab(other / "collab_shifted", col.user_emb, col.item_emb + np.float32(0.5), cfg.collab, [])
    with pytest.raises(ValueError, match=r"changed: collab \(artifact ") as e:
        train_distributed(cfg, dist, run, collab_dir=other / "collab_shifted", step_callback=record, log=None)
    assert "data (" not in str(e.value) and f"{run / 'ray_results'}/ft" in str(e.value)
    # other data (another synth seed, same catalog size), with a larger budget that would resume
    _prepared(other, seed=2)
    longer = load_deftrec_config(TINY, [*TRAIN, "train.max_steps=4", "train.epochs=3"])
    with pytest.raises(ValueError, match=r"changed: data \(artifact .*collab \(artifact "):
        train_distributed(longer, dist, run, data_dir=other / "data", collab_dir=other / "collab",
                          step_callback=record, log=None)
    # the old collab artifact with the new data (only the data changed)
    shutil.copytree(run / "collab", other / "collab_same", dirs_exist_ok=False)
    assert load_collab(other / "collab").item_emb.shape == col.item_emb.shape  # every item kept by both seeds
    with pytest.raises(ValueError, match=r"changed: data \(artifact [0-9a-f]+ then, [0-9a-f]+ now\)\. "):
        train_distributed(longer, dist, run, data_dir=other / "data", collab_dir=other / "collab_same",
                          step_callback=record, log=None)
    assert not Path(events).exists()  # nothing trained
    assert read_manifest(run / "model") == exported  # nothing re-exported
    # the same inputs still re-export the finished run, and continue it with a larger budget (the
    # worker checks the identity of the checkpoint it restores as well)
    again = train_distributed(cfg, dist, run, log=None)
    assert again.best_checkpoint == res.best_checkpoint
    more = train_distributed(longer, dist, run, step_callback=record, log=None)
    assert Path(events).read_text().split() == ["3", "4"]
    latest = read_trainer_state(more.latest_checkpoint)
    assert (latest.step, latest.attempts, latest.inputs) == (4, 2, inputs)
