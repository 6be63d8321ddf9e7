"""Serving export (deftrec.artifacts.model): round trip, LoRA merge, checkpoint export, atomicity, no DeepSpeed/Ray.

Everything here runs in-process on the tiny preset (no Ray cluster): the distributed path that
produces the checkpoints is covered by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deftrec.artifacts.model import (
    export_checkpoint,
    export_model,
    load_consolidated,
    load_model,
)
from deftrec.config.pipeline import load_deftrec_config
from deftrec.core.artifacts import ArtifactError, read_manifest, verify_outputs
from deftrec.data.samples import ItemCatalog, Ragged
from deftrec.model.deftrec import DeftRec
from deftrec.retrieval.recommender import DeftRecRecommender
from deftrec.training.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    TrainerState,
    consolidated_state,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"
N_ITEMS, N_USERS = 40, 12


def _catalog() -> ItemCatalog:
    ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=object)
    titles = np.array([f"Song {i} &amp; co" for i in range(N_ITEMS)], dtype=object)
    cats = np.array(["Rock" if i % 2 else "Jazz" for i in range(N_ITEMS)], dtype=object)
    return ItemCatalog(ids, titles, cats)


def _model(*overrides: str, user_tokens: bool = False, seed: int = 0) -> DeftRec:
    ov = ["eval.steps=3", *overrides] + (["tokenizer.user_tokens=true"] if user_tokens else [])
    cfg = load_deftrec_config(TINY, ov)
    rng = np.random.default_rng(seed)
    E = rng.normal(0, 0.1, (N_ITEMS, cfg.d_c)).astype(np.float32)
    U = rng.normal(0, 0.1, (N_USERS, cfg.d_c)).astype(np.float32)
    torch.manual_seed(seed)
    model = DeftRec.from_config(cfg, E, U if user_tokens else None, _catalog())
    with torch.no_grad():  # move the heads away from their initialisation, so a lost weight shows
        for p in model.param_groups()["heads"]:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model.eval()


HIST = Ragged.from_lists([[1, 2, 3], [4, 5], [7, 8, 9, 10], [0]])
USERS = np.array([0, 3, 5, 11])


def _scores(model: DeftRec) -> np.ndarray:
    return DeftRecRecommender(model).score_users(HIST, USERS, seed=5)


def test_round_trip_reproduces_scores_and_recommendations(tmp_path):
    model = _model(user_tokens=True)
    manifest = export_model(model, tmp_path / "model", extra={"note": "unit"})
    assert manifest["status"] == "complete" and manifest["note"] == "unit"
    for f in ("llm/config.json", "tokenizers.safetensors", "diffusion_head.safetensors", "collab.safetensors",
              "catalog.parquet", "config.json", "placeholders.json"):
        assert f in manifest["outputs"] or (tmp_path / "model" / f).exists(), f
    verify_outputs(tmp_path / "model")  # every file matches its checksum
    loaded = load_model(tmp_path / "model", verify=True)
    assert not loaded.training
    np.testing.assert_allclose(_scores(loaded), _scores(model), rtol=1e-5, atol=1e-5)
    a = DeftRecRecommender(model).recommend(HIST, USERS, k=5, seed=1)
    b = DeftRecRecommender(loaded).recommend(HIST, USERS, k=5, seed=1)
    np.testing.assert_array_equal(a.items, b.items)
    # the catalog (titles with entities, categories) and the placeholder tokens survive
    assert list(loaded.catalog.titles) == list(model.catalog.titles)
    assert loaded.placeholders == model.placeholders
    ids = loaded.text_tokenizer.convert_tokens_to_ids(["<diff>", "</diff>", "<collab_0>", "<collab_1>"])
    assert ids == [model.placeholders.diff_open, model.placeholders.diff_close, *model.placeholders.item]
    torch.testing.assert_close(loaded.user_emb, model.user_emb)
    assert float(loaded.x0_scale) == pytest.approx(float(model.x0_scale))


def test_lora_is_merged_and_gives_the_same_outputs(tmp_path):
    model = _model("llm.lora=true", "llm.lora_r=4")
    with torch.no_grad():  # LoRA B starts at 0: make the adapters matter
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    export_model(model, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["llm"]["lora"] is False and saved["source_llm"]["lora"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "llm" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if "lora" in n]  # merged: plain Llama weights only
    loaded = load_model(tmp_path / "model")
    assert not hasattr(loaded.llm, "peft_config")
    np.testing.assert_allclose(_scores(loaded), _scores(model), rtol=1e-4, atol=1e-4)
    assert hasattr(model.llm, "peft_config")  # the live model was not merged in place


def test_export_from_consolidated_checkpoint(tmp_path):
    """The training checkpoint format (consolidated weights + trainer state) exports without DeepSpeed."""
    from safetensors.torch import save_file

    from deftrec.core.config import to_dict

    src = _model("llm.lora=true", "llm.lora_r=4", seed=3)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weights = consolidated_state(src)
    assert "_added_rows.input" in weights  # LoRA freezes the embeddings: placeholder rows are carried
    save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt / WEIGHTS_FILE))
    (ckpt / STATE_FILE).write_text(json.dumps(TrainerState(step=7, best_step=5, config=to_dict(src.cfg)).to_json()))
    manifest = export_checkpoint(ckpt, tmp_path / "model", _catalog(), extra={"run": "unit"})
    assert manifest["step"] == 7 and manifest["best_step"] == 5
    loaded = load_model(tmp_path / "model")
    np.testing.assert_allclose(_scores(loaded), _scores(src), rtol=1e-4, atol=1e-4)


def test_load_consolidated_restores_every_trainable_weight_and_rejects_strangers():
    a, b = _model(seed=1), _model(seed=2)
    assert not torch.equal(a.head.denoiser.out.weight, b.head.denoiser.out.weight)
    load_consolidated(b, consolidated_state(a))
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa, pb, msg=n)
    with pytest.raises(ValueError, match="unknown"):
        load_consolidated(b, {"not.a.weight": torch.zeros(1)})


def test_interrupted_export_is_never_mistaken_for_a_finished_one(tmp_path, monkeypatch):
    import safetensors.torch as st

    model = _model()
    out = tmp_path / "model"
    export_model(model, out, extra={"version": 1})
    real = st.save_file
    calls = {"n": 0}

    def crash_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the LLM and one head are written, then the process "dies"
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        export_model(_model(seed=9), out, extra={"version": 2})
    monkeypatch.setattr(st, "save_file", real)
    assert read_manifest(out)["version"] == 1  # the previous export is untouched and still loads
    load_model(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no partial directory left behind
    # a directory whose manifest is missing or unfinished is refused
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(st, "save_file", crash_midway)
        calls["n"] = 0
        export_model(model, fresh)
    assert not fresh.exists()
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not 'complete'"):
        load_model(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_model(out)


def test_load_model_imports_neither_deepspeed_nor_ray(tmp_path):
    export_model(_model(), tmp_path / "model")
    code = (
        "import sys\n"
        "from deftrec.artifacts.model import load_model\n"
        f"m = load_model({str(tmp_path / 'model')!r})\n"
        "from deftrec.retrieval.recommender import DeftRecRecommender\n"
        "from deftrec.data.samples import Ragged\n"
        "r = DeftRecRecommender(m).recommend(Ragged.from_lists([[1, 2]]), k=3)\n"
        "assert r.items.shape == (1, 3)\n"
        "bad = sorted({k.split('.')[0] for k in sys.modules} & {'ray', 'deepspeed'})\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout
