"""The library's layering and its one fingerprint rule.

- The structure check (import cycles, module and function lengths) passes on deftrec/ and pipelines/.
- Serving and the model export import no training module; configs import no torch; the index
  job reads the export's item matrix without loading the LLM.
- A stage run on its own and ``pipelines.end_to_end`` recognise each other's artifacts; a change
  inside an input folder reruns preprocessing, a bare ``touch`` does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STRUCTURE = REPO.parent / "shared" / "tools" / "structure.py"
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"
SMALL = ["data.synth.users=200", "data.synth.items=80", "data.synth.mean_length=15"]
COLLAB = ["collab.dim=8", "collab.epochs=2", "collab.eval_every=2", "collab.batch_size=1024"]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_structure_check_passes():
    out = subprocess.run([sys.executable, str(STRUCTURE), "--root", str(REPO)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_deftrec_trains_in_one_loop():
    """DeftRec has one training loop, the Ray Train worker's: no other library, entry-point or
    benchmark module takes a gradient step (LightGCN and SASRec train their own, different models;
    the GPU benchmark counts one backward pass's FLOPs and steps nothing)."""
    import re

    allowed = {"deftrec/training/worker.py", "deftrec/training/lightgcn.py", "deftrec/batch/sasrec.py",
               "benchmarks/gpu_train.py"}
    stepping = set()
    for folder in ("deftrec", "pipelines", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if re.search(r"\.backward\(", path.read_text()):
                stepping.add(path.relative_to(REPO).as_posix())
    assert stepping <= allowed, sorted(stepping - allowed)
    assert "deftrec/training/worker.py" in stepping


def test_configs_import_no_torch_and_serving_no_training():
    code = (
        "import sys\n"
        "import deftrec.config.pipeline, deftrec.config.jobs, deftrec.config.data\n"
        "print('CONFIG', sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))\n"
        "import deftrec.serve, deftrec.serve.app, deftrec.artifacts.model, deftrec.artifacts.served\n"
        "print('SERVE', sorted(m for m in sys.modules if m.startswith('deftrec.training') or m == 'deepspeed'))\n"
    )
    lines = dict(line.split(" ", 1) for line in _python(code).splitlines() if line.startswith(("CONFIG", "SERVE")))
    assert lines["CONFIG"] == "[]"
    assert lines["SERVE"] == "[]"


def test_index_job_reads_item_keys_without_the_llm(tmp_path):
    import numpy as np

    from deftrec.artifacts.model import export_model
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.data.samples import ItemCatalog
    from deftrec.model.deftrec import DeftRec

    cfg = load_deftrec_config(TINY, ["collab.dim=8"])
    rng = np.random.default_rng(0)
    E = rng.normal(size=(30, 8)).astype(np.float32)
    model = DeftRec.from_config(cfg, E, None, ItemCatalog.synthetic(30))
    export_model(model, tmp_path / "model")
    code = (
        "import sys, numpy as np\n"
        "from deftrec.batch.index_job import ItemKeyEmbedder\n"
        f"emb = ItemKeyEmbedder({str(tmp_path / 'model')!r})\n"
        "out = emb({'item': np.arange(30)})\n"
        "print('KEYS', float(np.stack(out['key']).sum()))\n"
        "print('LLM', sorted(m for m in ('transformers', 'peft', 'deepspeed') if m in sys.modules))\n"
    )
    lines = dict(line.split(" ", 1) for line in _python(code).splitlines() if line.startswith(("KEYS", "LLM")))
    assert lines["LLM"] == "[]"
    assert float(lines["KEYS"]) == pytest.approx(float(model.item_emb.sum()), rel=1e-5)


def _stage_state(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "manifest.json").read_text())


def test_standalone_collab_and_end_to_end_share_one_fingerprint(ray_session, tmp_path, capsys):
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.end_to_end import run_pipeline
    from pipelines.collab import main as collab_main

    run = tmp_path / "run"
    overrides = SMALL + COLLAB
    run_pipeline(load_pipeline_config(TINY, ["stages=[synth,preprocess]", *overrides]), run, log=lambda s: None)
    argv = ["--run-dir", str(run), "--config", str(TINY), "--num-workers", "1", "--name", "alone"]
    assert collab_main(argv + [a for s in overrides for a in ("--set", s)]) == 0
    made = _stage_state(run, "collab")["finished_at"]
    summary = run_pipeline(load_pipeline_config(TINY, ["stages=[synth,preprocess,collab]", *overrides]), run,
                           log=lambda s: None)
    assert summary["stages"]["collab"]["skipped"] is True
    assert _stage_state(run, "collab")["finished_at"] == made
    # ... and the other way round: what end_to_end wrote, the standalone job recognises
    capsys.readouterr()
    assert collab_main(argv + [a for s in overrides for a in ("--set", s)]) == 0
    assert "up to date" in capsys.readouterr().out
    # another LightGCN setting is another artifact
    summary = run_pipeline(load_pipeline_config(TINY, ["stages=[synth,preprocess,collab]", *overrides,
                                                       "collab.seed=5"]), run, log=lambda s: None)
    assert summary["stages"]["collab"]["skipped"] is False


def test_a_change_inside_an_input_folder_reruns_preprocessing(ray_session, tmp_path):
    from deftrec.config.data import SynthConfig
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.data.synth import generate
    from deftrec.end_to_end import run_pipeline

    generate(SynthConfig(users=120, items=60, mean_length=12, seed=3), tmp_path / "synth", log=lambda s: None)
    logs = tmp_path / "logs"
    logs.mkdir(parents=True)
    part = logs / "part-0.csv"
    shutil.copy(tmp_path / "synth" / "interactions.csv", part)
    cfg = load_pipeline_config(TINY, ["stages=[preprocess]", f"data.preprocess.input=[{logs}]",
                                      f"data.preprocess.items={tmp_path / 'synth' / 'items.csv'}",
                                      "data.preprocess.format=csv"])
    run = tmp_path / "run"
    first = run_pipeline(cfg, run, log=lambda s: None)
    assert first["stages"]["preprocess"]["skipped"] is False
    os.utime(part, (1, 1))  # a touch: same content
    assert run_pipeline(cfg, run, log=lambda s: None)["stages"]["preprocess"]["skipped"] is True
    lines = part.read_text().splitlines()
    with open(part, "a", encoding="utf-8") as f:  # the folder's own mtime does not change
        f.write(lines[-1].replace(lines[-1].split(",")[0], "appended-user", 1) + "\n")
    again = run_pipeline(cfg, run, log=lambda s: None)
    assert again["stages"]["preprocess"]["skipped"] is False
    assert again["stages"]["preprocess"]["counts"]["rows_in"] == first["stages"]["preprocess"]["counts"]["rows_in"] + 1
