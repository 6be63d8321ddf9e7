"""The config rules and plan of commit 3cbbf06, pinned cheaply (no training, no Ray):

- cross-section rules of ``PipelineConfig`` (each violation is a ConfigError naming both fields);
- one ranking rule: the index has no metric of its own, it ranks by the metric it is given
  (the export's ``eval.score``);
- prompt K / user_tokens / combine_sum are derived from the tokenizer section, an explicit
  contradicting value is refused, and a saved config reads back equal;
- ``--dry-run`` prints a JSON plan (run/skip per stage, Ray resources) and touches nothing;
- the standalone stages default to the config recorded in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deftrec.config.pipeline import (
    RUN_CONFIG_FILE,
    load_pipeline_config,
    load_run_config,
    pipeline_config_from_dict,
    preset_dict,
    save_run_config,
)
from deftrec.core.config import ConfigError, to_dict

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"
SMALL = REPO / "pipelines" / "configs" / "small.yaml"
PRESETS = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))


def _refused(overrides: list[str], path: Path | None = TINY) -> str:
    """The ConfigError message of loading ``path`` with ``overrides`` (fails the test if it loads)."""
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path, overrides)
    return str(e.value)


# ------------------------------------------------------------------ cross-section rules


def test_data_window_must_hold_the_prompt_window():
    """data.preprocess.max_history < prompt.max_history is refused naming both; equal or larger is fine."""
    msg = _refused(["data.preprocess.max_history=10"])
    assert "data.preprocess.max_history" in msg and "prompt.max_history" in msg
    # the preprocessing default (20) counts when the preset leaves data.preprocess.max_history out
    msg = _refused(["prompt.max_history=30"])
    assert "data.preprocess.max_history (20)" in msg and "prompt.max_history (30)" in msg
    assert load_pipeline_config(TINY, ["data.preprocess.max_history=20", "prompt.max_history=20"])
    assert load_pipeline_config(TINY, ["data.preprocess.max_history=50", "prompt.max_history=30"])


def test_collab_on_cuda_needs_ray_train_gpus():
    """collab.device=cuda needs distributed.use_gpu=true (the workers reserve no GPU otherwise)."""
    msg = _refused(["collab.device=cuda"])
    assert "collab.device" in msg and "distributed.use_gpu" in msg
    cfg = load_pipeline_config(TINY, ["collab.device=cuda", "distributed.use_gpu=true"])
    assert cfg.model.collab.device == "cuda" and cfg.distributed.use_gpu


def test_train_device_is_gone():
    """train.device no longer exists (the Ray Train worker decides the device): an unknown field."""
    msg = _refused(["train.device=cuda"])
    assert "train" in msg and "unknown" in msg and "'device'" in msg


def test_index_has_no_metric_of_its_own():
    """The ranking rule is one setting (eval.score): index.metric is an unknown field."""
    from deftrec.config.jobs import IndexConfig

    assert "metric" not in {f for f in IndexConfig.__dataclass_fields__}
    msg = _refused(["index.metric=ip"])
    assert "index" in msg and "unknown" in msg and "'metric'" in msg
    assert load_pipeline_config(TINY, ["eval.score=ip"]).model.eval.score == "ip"


def test_index_ranks_by_the_metric_it_is_given():
    """build_index(keys, cfg, "ip") ranks by inner product (not l2), and describe() reports that metric."""
    from deftrec.config.jobs import IndexConfig
    from deftrec.retrieval.index import build_index, describe, exact_topk, search

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 8)).astype(np.float32) * rng.uniform(0.2, 3.0, (500, 1)).astype(np.float32)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    ip_ids, ip_scores = search(build_index(keys, IndexConfig(), "ip"), q, 10, "ip")
    assert (ip_ids == exact_topk(keys, q, 10, "ip")).all()
    np.testing.assert_allclose(ip_scores[0], keys[ip_ids[0]] @ q[0], rtol=1e-4, atol=1e-4)
    l2_ids, _ = search(build_index(keys, IndexConfig(), "l2"), q, 10, "l2")
    assert (l2_ids != ip_ids).any()  # the metric passed decides the ranking

    cfg = IndexConfig(recall_queries=20)
    assert describe(build_index(keys, cfg, "ip"), cfg, keys, "ip")["metric"] == "ip"
    assert describe(build_index(keys, cfg, "l2"), cfg, keys, "l2")["metric"] == "l2"


# ------------------------------------------------------------------ derived prompt fields


def test_prompt_layout_follows_the_tokenizer():
    """tokenizer.K / user_tokens / combine alone set the prompt's K / user_tokens / combine_sum; a bare
    PromptConfig leaves them unset (None, not a default that could be taken for a choice)."""
    from deftrec.config.components import PromptConfig

    bare = PromptConfig()
    assert (bare.K, bare.user_tokens, bare.combine_sum) == (None, None, None)
    with pytest.raises(ValueError, match="tokenizer.K"):
        bare.slots
    p = load_pipeline_config(TINY, ["tokenizer.K=3"]).model.prompt
    assert p.K == 3 and p.slots == 3
    p = load_pipeline_config(TINY, ["tokenizer.user_tokens=true", "tokenizer.combine=sum"]).model.prompt
    assert p.user_tokens is True and p.combine_sum is True and p.slots == 1


@pytest.mark.parametrize("tokenizer,prompt,names", [
    # each explicit prompt value is the old default, which the old code took for "unset" and rewrote
    ("tokenizer.K=3", "prompt.K=2", ("prompt.K", "tokenizer.K")),
    ("tokenizer.user_tokens=true", "prompt.user_tokens=false", ("prompt.user_tokens", "tokenizer.user_tokens")),
    ("tokenizer.combine=sum", "prompt.combine_sum=false", ("prompt.combine_sum", "tokenizer.combine")),
], ids=["K", "user_tokens", "combine_sum"])
def test_explicit_prompt_value_contradicting_the_tokenizer_is_refused(tokenizer, prompt, names):
    """An explicit prompt value that differs from the tokenizer's is a ConfigError naming both fields,
    even when it equals the old default; an explicit equal value is accepted."""
    msg = _refused([tokenizer, prompt])
    assert all(n in msg for n in names), msg
    same = {"prompt.K=2": "prompt.K=3", "prompt.user_tokens=false": "prompt.user_tokens=true",
            "prompt.combine_sum=false": "prompt.combine_sum=true"}[prompt]
    assert load_pipeline_config(TINY, [tokenizer, same])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_saved_config_reads_back_equal(preset):
    """preset_dict -> pipeline_config_from_dict (also through JSON, as the run directory stores it) gives
    an equal config, for every preset and with non-default derived prompt fields."""
    for overrides in ([], ["tokenizer.K=3", "tokenizer.user_tokens=true", "tokenizer.combine=sum"]):
        cfg = load_pipeline_config(preset, overrides)
        d = preset_dict(cfg)
        assert "model" not in d and "tokenizer" in d and "d_llm" not in d
        assert to_dict(pipeline_config_from_dict(d)) == to_dict(cfg)
        assert to_dict(pipeline_config_from_dict(json.loads(json.dumps(d)))) == to_dict(cfg)


# ------------------------------------------------------------------ --dry-run


def _dry_run(capsys, *args: str) -> tuple[int, dict | None, str]:
    """``python -m pipelines.end_to_end ARGS --dry-run`` in-process: (exit code, parsed plan or None, stderr)."""
    from pipelines.end_to_end import main

    rc = main([*map(str, args), "--dry-run"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def _gpus(resources: dict) -> float:
    return resources.get("gpus_per_worker", resources.get("gpus_per_actor", resources.get("gpus_per_task", 0)))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_dry_run_plans_every_stage_and_touches_nothing(preset, tmp_path, capsys, monkeypatch):
    """The plan is one JSON document listing every configured stage (run/skip, resources); the run
    directory is not created and Ray is not started."""
    import ray
    import yaml

    import deftrec.core.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("the dry run connected to Ray")

    monkeypatch.chdir(REPO)  # the presets' relative input paths
    monkeypatch.setattr(ray, "init", no_ray)  # other tests may have started Ray in this process already
    monkeypatch.setattr(deftrec.core.cluster, "ensure_ray", no_ray)
    run_dir = tmp_path / "run"
    rc, plan, err = _dry_run(capsys, "--config", preset, "--run-dir", run_dir)
    assert rc == 0, err
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    stages = yaml.safe_load(preset.read_text())["stages"]
    assert list(plan["stages"]) == stages
    for name, entry in plan["stages"].items():
        assert entry["action"] in ("run", "skip"), name
        assert isinstance(entry["resources"], dict) and entry["resources"].get("kind"), name
    assert plan["stages"][stages[0]]["action"] == "run"  # nothing exists yet
    assert plan["run_dir"] == str(run_dir) and plan["config"]["name"] == preset.stem
    assert plan["uses_gpu"] == any(_gpus(e["resources"]) > 0 for e in plan["stages"].values())


def test_dry_run_gpu_preset_requests_gpus(tmp_path, capsys, monkeypatch):
    """The gpu preset: collab and train on >= 2 NCCL workers with a GPU each, GPU scoring actors."""
    monkeypatch.chdir(REPO)
    rc, plan, err = _dry_run(capsys, "--config", REPO / "pipelines/configs/gpu.yaml", "--run-dir", tmp_path / "r")
    assert rc == 0, err
    for name in ("collab", "train"):
        res = plan["stages"][name]["resources"]
        assert res["gpus_per_worker"] >= 1 and res["workers"] >= 2 and res["backend"] == "nccl", (name, res)
    assert plan["stages"]["evaluate"]["resources"]["gpus_per_actor"] >= 1
    assert plan["uses_gpu"] is True


def test_dry_run_tiny_preset_requests_no_gpu(tmp_path, capsys):
    """The tiny preset runs on CPUs only: no stage asks for a GPU, collectives on gloo."""
    rc, plan, err = _dry_run(capsys, "--config", TINY, "--run-dir", tmp_path / "r")
    assert rc == 0, err
    assert all(_gpus(e["resources"]) == 0 for e in plan["stages"].values())
    assert plan["stages"]["train"]["resources"]["backend"] == "gloo"
    assert plan["uses_gpu"] is False


def test_dry_run_skips_a_complete_stage_and_reruns_a_changed_one(tmp_path, capsys):
    """After a real (synth-only) run the plan says skip for synth with its recorded fingerprint; the
    plan writes nothing; a changed data.synth.seed makes it run again."""
    from deftrec.core.artifacts import read_manifest
    from deftrec.end_to_end import run_pipeline

    run_dir = tmp_path / "run"
    only_synth = ["stages=[synth]"]
    run_pipeline(load_pipeline_config(TINY, only_synth), run_dir, log=lambda line: None)
    files = sorted(p for p in run_dir.rglob("*"))

    rc, plan, err = _dry_run(capsys, "--config", TINY, "--run-dir", run_dir, "--set", *only_synth)
    assert rc == 0, err
    synth = plan["stages"]["synth"]
    assert synth["action"] == "skip" and synth["fingerprint"] == read_manifest(run_dir / "synth")["fingerprint"]
    assert plan["uses_gpu"] is False

    # the full preset on the same directory: synth is done, the pipeline resumes at preprocess
    rc, plan, err = _dry_run(capsys, "--config", TINY, "--run-dir", run_dir)
    assert rc == 0, err
    assert plan["stages"]["synth"]["action"] == "skip" and plan["stages"]["preprocess"]["action"] == "run"

    rc, plan, err = _dry_run(capsys, "--config", TINY, "--run-dir", run_dir, "--set", *only_synth,
                             "--set", "data.synth.seed=43")
    assert rc == 0, err
    assert plan["stages"]["synth"]["action"] == "run" and plan["stages"]["synth"]["fingerprint"] != synth["fingerprint"]
    assert sorted(p for p in run_dir.rglob("*")) == files  # the plans wrote nothing


def test_dry_run_bad_config_is_one_error_line(tmp_path, capsys):
    """A config that breaks a rule: exit code 2, nothing on stdout, one `error:` line naming the fields."""
    rc, plan, err = _dry_run(capsys, "--config", TINY, "--run-dir", tmp_path / "r",
                             "--set", "data.preprocess.max_history=10")
    assert rc == 2 and plan is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data.preprocess.max_history" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the recorded run config


def test_standalone_stages_read_the_recorded_config(tmp_path):
    """load_run_config: the config recorded in the run directory by default, --config wins over it,
    overrides apply on top (a tokenizer.* override re-derives the prompt layout); no record: defaults."""
    cfg = load_pipeline_config(TINY, ["evaluate.batch_size=48", "tokenizer.K=3", "index.factory=HNSW32,Flat"])
    path = save_run_config(cfg, tmp_path)
    assert path == tmp_path / RUN_CONFIG_FILE and path.is_file()
    assert to_dict(load_run_config(tmp_path, None, [])) == to_dict(cfg)
    assert to_dict(load_run_config(tmp_path, SMALL, [])) == to_dict(load_pipeline_config(SMALL))
    over = load_run_config(tmp_path, None, ["evaluate.batch_size=16", "tokenizer.K=4"])
    assert over.evaluate.batch_size == 16 and over.model.prompt.K == 4
    assert over.index.factory == "HNSW32,Flat" and over.name == "tiny"  # the rest stays the recorded run's
    empty = tmp_path / "no_record"
    empty.mkdir()
    assert to_dict(load_run_config(empty, None, [])) == to_dict(load_pipeline_config(None))


def test_run_pipeline_records_its_config(tmp_path):
    """run_pipeline writes RUN_DIR/pipeline_config.json, which load_run_config reads back equal."""
    from deftrec.end_to_end import run_pipeline

    cfg = load_pipeline_config(TINY, ["stages=[synth]", "data.synth.users=50", "data.synth.items=60"])
    run_pipeline(cfg, tmp_path, log=lambda line: None)
    assert (tmp_path / RUN_CONFIG_FILE).is_file()
    assert to_dict(load_run_config(tmp_path, None, [])) == to_dict(cfg)


class _Captured(Exception):
    pass


def test_evaluate_flags_left_out_keep_the_recorded_values(tmp_path, monkeypatch, no_console_setup):
    """pipelines.evaluate: a flag given overrides its evaluate.* field, a flag left out keeps the
    recorded config's value (the old flag defaults, split=test and batch_size=32, no longer win)."""
    import deftrec.batch.evaluate
    from pipelines.evaluate import main

    seen = {}

    def fake_run_evaluation(run_dir, cfg, **kwargs):
        seen["cfg"] = cfg
        raise _Captured

    monkeypatch.setattr(deftrec.batch.evaluate, "run_evaluation", fake_run_evaluation)
    save_run_config(load_pipeline_config(TINY, ["evaluate.split=valid", "evaluate.batch_size=48",
                                                "evaluate.baselines=[popularity]"]), tmp_path)
    with pytest.raises(_Captured):
        main(["--run-dir", str(tmp_path), "--limit", "5"])
    ev = seen["cfg"]
    assert (ev.split, ev.batch_size, ev.baselines, ev.limit) == ("valid", 48, ["popularity"], 5)
    with pytest.raises(_Captured):
        main(["--run-dir", str(tmp_path), "--batch-size", "8", "--split", "test", "--set", "evaluate.actors=2"])
    ev = seen["cfg"]
    assert (ev.split, ev.batch_size, ev.actors, ev.limit) == ("test", 8, 2, None)


def test_evaluate_without_model_is_an_artifact_error_not_a_config_error(tmp_path, capsys, no_console_setup):
    """pipelines.evaluate on a run directory with a recorded config but no model: exit 2 naming the
    missing model export; a corrupt record is a config error instead (so the record is what is read)."""
    from pipelines.evaluate import main

    save_run_config(load_pipeline_config(TINY), tmp_path)
    assert main(["--run-dir", str(tmp_path), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "model export" in err and "Traceback" not in err, err

    (tmp_path / RUN_CONFIG_FILE).write_text("{not json")
    assert main(["--run-dir", str(tmp_path), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert RUN_CONFIG_FILE in err and "not valid JSON" in err and "--config" in err, err


def test_zero3_with_a_generated_condition_is_refused_at_load_naming_both_fields():
    """ZeRO-3 gathers parameters collectively in every forward; greedy generation during validation
    stops at data-dependent lengths, so the two cannot be combined: refused before any work."""
    with pytest.raises(ConfigError, match=r"condition='response_embeddings'.*distributed.zero_stage=3"):
        load_pipeline_config(TINY, ["distributed.zero_stage=3", "condition=response_embeddings", "train.lambda_lm=0.1",
                                    "train.positions=last"])
    ok = load_pipeline_config(TINY, ["distributed.zero_stage=2", "condition=response_embeddings", "train.lambda_lm=0.1",
                                     "train.positions=last"])
    assert ok.distributed.zero_stage == 2
