"""The collaborative-embedding job: LightGCN on Ray Train (TorchTrainer, DDP) -> RUN_DIR/collab.

Ray jobs share the session's Ray instance (conftest ``ray_session``, 2 CPUs); the data is a small
synthetic log preprocessed once for the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deftrec.artifacts.collab import collab_fingerprint, load_collab, save_collab
from deftrec.batch.baselines import Popularity
from deftrec.config.components import LightGCNConfig
from deftrec.config.training import DistributedConfig
from deftrec.core.artifacts import ArtifactError
from deftrec.data.samples import load_dataset, training_pairs
from deftrec.retrieval.metrics import evaluate_both_protocols
from deftrec.training.collab_job import train_collab_distributed
from deftrec.training.lightgcn import train_lightgcn

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"
SMALL = ["stages=[synth,preprocess]", "data.synth.users=300", "data.synth.items=120", "data.synth.mean_length=20"]
CFG = LightGCNConfig(dim=16, layers=2, epochs=8, eval_every=4, batch_size=1024, seed=3)


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory) -> Path:
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.end_to_end import run_pipeline

    d = tmp_path_factory.mktemp("collab_run")
    run_pipeline(load_pipeline_config(TINY, SMALL), d, log=lambda s: None)
    return d


def _valid_hr10(U: np.ndarray, E: np.ndarray, data) -> float:
    v = data.valid
    scores = U[v.users] @ E.T
    return evaluate_both_protocols(scores, v.targets, v.exclusions, ks=(10,))["history_excluded"]["hr@10"]


def test_one_worker_job_equals_the_in_process_run(run_dir):
    data = load_dataset(run_dir / "data")
    users, items = training_pairs(data)
    v = data.valid
    U_ref, E_ref, hist_ref = train_lightgcn(users, items, data.n_users, data.n_items, CFG,
                                            valid=(v.users, v.exclusions, v.targets), log=None)
    art = train_collab_distributed(CFG, run_dir / "data", run_dir / "collab1", DistributedConfig(num_workers=1),
                                   run_name="c1", log=None)
    # same seed, one DDP rank = the same optimisation, step for step
    np.testing.assert_allclose(art.item_emb, E_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(art.user_emb, U_ref, rtol=0, atol=1e-6)
    assert [h["epoch"] for h in art.history] == [h["epoch"] for h in hist_ref]
    assert art.history[-1]["hr@10"] == pytest.approx(hist_ref[-1]["hr@10"])
    m = art.manifest
    assert m["status"] == "complete" and m["workers"] == 1
    assert m["fingerprint"] == collab_fingerprint(CFG, run_dir / "data")
    assert (m["n_users"], m["n_items"], m["dim"]) == (data.n_users, data.n_items, CFG.dim)
    assert set(m["outputs"]) == {"user_emb.npy", "item_emb.npy", "config.json", "history.json"}


def test_two_worker_cli_job_beats_popularity_and_is_skipped_when_up_to_date(run_dir, capsys):
    from pipelines.collab import main

    sets = ["--set", "collab.dim=16", "--set", "collab.epochs=12", "--set", "collab.eval_every=4",
            "--set", "collab.batch_size=1024"] + [a for s in SMALL for a in ("--set", s)]
    argv = ["--run-dir", str(run_dir), "--config", str(TINY), "--num-workers", "2", "--name", "c2", *sets]
    assert main(argv) == 0
    art = load_collab(run_dir / "collab")
    assert art.manifest["workers"] == 2
    data = load_dataset(run_dir / "data")
    assert art.user_emb.shape == (data.n_users, 16) and art.item_emb.shape == (data.n_items, 16)
    pop = Popularity().fit(data.sequences_before("valid"), data.n_items)
    v = data.valid
    pop_hr = evaluate_both_protocols(pop.score(v.histories), v.targets, v.exclusions, ks=(10,))
    ours = _valid_hr10(art.user_emb, art.item_emb, data)
    assert ours > pop_hr["history_excluded"]["hr@10"], (ours, pop_hr)
    assert ours == pytest.approx(art.best_hr10)  # the artifact holds the best validated embeddings
    capsys.readouterr()
    assert main(argv) == 0  # same config and data: no second job
    assert "up to date" in capsys.readouterr().out
    assert load_collab(run_dir / "collab").manifest["finished_at"] == art.manifest["finished_at"]


def test_artifact_checks(tmp_path):
    rng = np.random.default_rng(0)
    U, E = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    cfg = LightGCNConfig(dim=4)
    save_collab(tmp_path / "c", U, E, cfg, [{"epoch": 1, "loss": 0.5, "hr@10": 0.25}])
    art = load_collab(tmp_path / "c")
    np.testing.assert_array_equal(art.user_emb, U)
    np.testing.assert_array_equal(art.item_emb, E)
    assert art.config == cfg and art.best_hr10 == 0.25
    with pytest.raises(ValueError, match="config dim"):
        save_collab(tmp_path / "d", U, E, LightGCNConfig(dim=8), [])
    with pytest.raises(ValueError, match="non-finite"):
        save_collab(tmp_path / "d", U * np.nan, E, cfg, [])
    assert not (tmp_path / "d").exists()
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["status"] = "running"  # what a crashed writer would leave if it wrote in place
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_collab(tmp_path / "c")
