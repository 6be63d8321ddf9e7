"""Helpers the test modules share: the pipeline's training job at toy size, and copies of its runs."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_and_export(root: Path, cfg, **kwargs):
    """The pipeline's training job on one Ray Train worker over ``root/data``: LightGCN in-process
    (the function the collab job's workers run) saved as ``root/collab``, then ``train_distributed``
    exporting the best checkpoint to ``root/model``. Returns (loaded export, DistributedResult)."""
    from deftrec.artifacts.collab import save_collab
    from deftrec.artifacts.model import load_model
    from deftrec.config.training import DistributedConfig
    from deftrec.data.samples import load_dataset
    from deftrec.training.collab_job import fit_collab
    from deftrec.training.driver import train_distributed

    U, E, hist = fit_collab(cfg, load_dataset(root / "data"), log=None)
    save_collab(root / "collab", U, E, cfg.collab, hist)
    res = train_distributed(cfg, DistributedConfig(num_workers=1, name="toy"), root, log=None, **kwargs)
    return load_model(root / "model"), res


def toy_run(root: Path, synth: Path, *overrides: str):
    """``root/data`` (``synth`` preprocessed) and ``root/model``: the tiny preset trained for 3 steps
    (plus ``overrides``) and exported. Returns the trained model; callers build the indexes they need."""
    from deftrec.config.data import PreprocessConfig
    from deftrec.config.pipeline import load_deftrec_config
    from deftrec.core.config import from_dict
    from deftrec.data.preprocess import run_preprocess

    run_preprocess(from_dict(PreprocessConfig, {"input": [str(synth / "interactions.csv")],
                                                "items": str(synth / "items.csv"),
                                                "output": str(root / "data")}), log=lambda s: None)
    cfg = load_deftrec_config(REPO / "pipelines/configs/tiny.yaml", [
        *overrides, "train.max_steps=3", "train.warmup_steps=1", "train.validate_every=3", "train.valid_users=20",
        "collab.epochs=1", "diffusion.hidden=32", "eval.steps=1"])
    model, _ = train_and_export(root, cfg)
    return model


def copy_toy_run(src: Path, dst: Path):
    """``src``'s data, collab and model artifacts copied into ``dst``; returns the loaded model."""
    import shutil

    from deftrec.artifacts.model import load_model

    for name in ("data", "collab", "model"):
        shutil.copytree(src / name, dst / name)
    return load_model(dst / "model")
