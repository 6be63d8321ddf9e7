"""Validation chooses the settings: the tune stage runs a real Ray Tune search whose trials are the
pipeline's training job, and the train stage exports the better trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tiny.yaml"
TOY = ["data.synth.users=120", "data.synth.items=48", "data.synth.mean_length=16", "data.preprocess.item_core=1",
       "collab.epochs=1", "collab.dim=16", "diffusion.hidden=32", "eval.steps=1", "train.batch_size=8",
       "train.max_steps=4", "train.warmup_steps=1", "train.validate_every=2", "train.valid_users=16",
       "train.log_every=2", "train.patience=null", "distributed.checkpoint_every=null"]


def test_two_trial_search_exports_the_better_trial(ray_session, tmp_path):
    """Each trial's workers may take every CPU of the cluster (2 workers on the session's 2 CPUs):
    the trial itself holds none."""
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.core.artifacts import read_manifest
    from deftrec.end_to_end import run_pipeline

    cfg = load_pipeline_config(TINY, [*TOY, "stages=[synth,preprocess,collab,tune,train]", "distributed.num_workers=2",
                                      "tune.space={train.lr: [0.00001, 0.01]}", "tune.grace_validations=2"])
    summary = run_pipeline(cfg, tmp_path, log=lambda s: None)
    assert not summary["stages"]["tune"]["skipped"]
    trials = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [t["overrides"] for t in trials] == [["train.lr=1e-05"], ["train.lr=0.01"]]
    assert all(t["validations"] >= 1 and t["valid_ndcg@10"] is not None for t in trials), trials
    best = max(trials, key=lambda t: t["valid_ndcg@10"])
    assert read_manifest(tmp_path / "tune")["best"]["trial"] == best["trial"]
    # the export is the better trial's best checkpoint, with its settings in the model config
    exported = read_manifest(tmp_path / "model")
    assert exported["run"].endswith(best["run_name"])
    assert exported["valid_ndcg@10"] == pytest.approx(best["valid_ndcg@10"])
    model_cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert model_cfg["train"]["lr"] == pytest.approx(float(best["overrides"][0].split("=")[1]))
    # a rerun finds both stages up to date
    again = run_pipeline(cfg, tmp_path, log=lambda s: None)
    assert again["stages"]["tune"]["skipped"] and again["stages"]["train"]["skipped"]


def test_a_group_of_settings_is_one_value_of_the_search():
    """A ``tune.space`` entry whose values are mappings sets its fields together (``{}``: the preset's),
    and every trial's config is checked at load."""
    from deftrec.config.jobs import TuneConfig
    from deftrec.config.pipeline import load_pipeline_config

    earlier = {"tokenizer.user_tokens": True, "tokenizer.user_vector": "earlier_items"}
    tune = TuneConfig(space={"user slot": [{}, earlier], "llm.dropout": [0.0, 0.2]})
    assert tune.trials(0) == [
        ["llm.dropout=0.0"], ["llm.dropout=0.0", "tokenizer.user_tokens=true", "tokenizer.user_vector=earlier_items"],
        ["llm.dropout=0.2"], ["llm.dropout=0.2", "tokenizer.user_tokens=true", "tokenizer.user_vector=earlier_items"]]
    with pytest.raises(ValueError, match="mixes values and groups"):
        TuneConfig(space={"user slot": [False, earlier]})
    # each group must make a valid config on its own: the earlier items need the user slot
    with pytest.raises(ValueError, match="tune.space: the trial .*user_vector"):
        load_pipeline_config(TINY, ["stages=[synth,preprocess,collab,tune,train]",
                                    "tune.space={user slot: [{}, {tokenizer.user_vector: earlier_items}]}"])
