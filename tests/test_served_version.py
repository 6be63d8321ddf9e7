"""A served version is one validated unit of model, index and catalog: parts that do not belong
together are refused by name before anything is swapped, and a swap replaces the catalog with the
model and index (ids resolved and titles described by the version that answers). Real artifacts,
a briefly trained tiny export, the batching recommender of the Serve app in this process; the
Serve/HTTP swap under load is tests/test_eval_serve.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deftrec.config.jobs import IndexConfig
from deftrec.core.artifacts import finish_manifest, read_manifest
from tests.conftest import toy_run

pytestmark = pytest.mark.usefixtures("ray_session")


def _edit_items(src: Path, dst: Path, edit) -> Path:
    """A copy of the data artifact ``src`` whose items.parquet is ``edit(table)`` (manifest redone)."""
    shutil.copytree(src, dst)
    pq.write_table(edit(pq.read_table(dst / "items.parquet")), dst / "items.parquet")
    finish_manifest(dst, read_manifest(dst))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_small):
    """data/, model/ + index/, model_b/ + index_b/ (the same weights under another version), and
    data copies: renamed titles (belongs to the model) and one item fewer (does not)."""
    from deftrec.artifacts.model import export_model
    from deftrec.batch.index_job import run_index_job

    root = tmp_path_factory.mktemp("served")
    model = toy_run(root, synth_small)
    export_model(model, root / "model_b", extra={"version": "b"})
    export_model(model, root / "model_c", extra={"inputs": {"data": "0123456789abcdef"}})
    run_index_job(root, IndexConfig(), log=lambda s: None)
    run_index_job(root, IndexConfig(), log=lambda s: None, model_dir=root / "model_b", out_dir=root / "index_b")

    def renamed(t: pa.Table) -> pa.Table:
        titles = pa.array([f"renamed {x}" for x in t.column("title").to_pylist()])
        return t.set_column(t.schema.get_field_index("title"), "title", titles)

    _edit_items(root / "data", root / "data_renamed", renamed)
    _edit_items(root / "data", root / "data_short", lambda t: t.sort_by("item").slice(0, t.num_rows - 1))
    return root


@pytest.mark.parametrize("parts,needles", [
    (("model", "index_b", "data"), ["the index was built for model"]),
    (("model_b", "index", "data"), ["the index was built for model"]),
    (("model", "index", "data_short"), ["the catalog holds", "items, the model"]),
    (("model_c", "index", "data"), ["trained on data artifact 0123456789abcdef"]),
])
def test_parts_that_do_not_belong_together_are_refused_by_name(run, parts, needles):
    from deftrec.serve.engine import ServingCatalog
    from deftrec.serve.version import ServedVersion, VersionMismatch, check_version_parts

    dirs = [run / p for p in parts]
    with pytest.raises(VersionMismatch) as e:
        check_version_parts(*dirs, ServingCatalog(dirs[2]))
    for needle in needles:
        assert needle in str(e.value)
    assert str(dirs[0]) in str(e.value) and "do not belong together" in str(e.value)
    loaded = []
    with pytest.raises(VersionMismatch):  # refused before the model is loaded
        ServedVersion(*dirs, loader=lambda d: loaded.append(d))
    assert loaded == []
    check_version_parts(run / "model", run / "index", run / "data_renamed", ServingCatalog(run / "data_renamed"))


def test_refused_version_leaves_the_served_one_whole(run):
    from deftrec.serve.app import BatchedRecommender
    from deftrec.serve.version import VersionMismatch

    loads: list[str] = []

    def loader(d: str):
        from deftrec.artifacts.model import load_model

        loads.append(Path(d).name)
        return load_model(d)

    br = BatchedRecommender(str(run), loader=loader, wait_for_config=True)  # as Serve builds it with a user_config
    assert loads == [] and br.current is None
    br.reconfigure({"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b")})
    assert loads == ["model_b"]  # the configured version only, not run_dir/model first
    served = br.current
    br.reconfigure({"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b")})
    assert br.current is served and loads == ["model_b"]  # the same contents: nothing reloaded
    for bad in ({"model_dir": str(run / "model"), "index_dir": str(run / "index_b")},
                {"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b"),
                 "data_dir": str(run / "data_short")}):
        with pytest.raises(VersionMismatch, match="do not belong together"):
            br.reconfigure(bad)
    assert br.current is served and loads == ["model_b"] and br.versions()["model_version"] == "b"
    assert br.item("no-such-item")["status"] == 404


def test_served_swap_brings_its_catalog(run):
    """Over Serve (fused topology, HTTP): after a swap to a version with another catalog, ids and
    titles come from the new catalog, with the new model and index."""
    import httpx
    from ray import serve

    from deftrec.serve import build_app

    user = str(pq.read_table(run / "data" / "users.parquet").column("user_id")[0])

    def deploy(user_config: dict) -> None:
        serve.run(build_app(str(run), num_cpus=0, max_batch_size=4, batch_wait_timeout_s=0.01, topology="fused",
                            user_config=user_config), name="served", route_prefix="/served")

    deploy({"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b")})
    try:
        with httpx.Client(base_url="http://127.0.0.1:8000/served", timeout=60) as client:
            before = client.post("/recommend", json={"user_id": user, "k": 5}).json()
            assert before["model_version"] == "b" and not before["items"][0]["title"].startswith("renamed ")
            deploy({"data_dir": str(run / "data_renamed")})  # run_dir's model and index, the renamed catalog
            after = client.post("/recommend", json={"user_id": user, "k": 5})
            assert after.status_code == 200, after.text
            assert after.json()["model_version"] != "b"
            assert all(x["title"].startswith("renamed ") for x in after.json()["items"])
            item = client.get(f"/items/{after.json()['items'][0]['item_id']}").json()
            assert item["title"].startswith("renamed ")
            assert client.get("/healthz").json()["items"] == pq.read_metadata(
                run / "data_renamed" / "items.parquet").num_rows
            r = client.post("/recommend", json={"history": ["no-such-item"]})
            assert r.status_code == 404 and "no-such-item" in r.text
    finally:
        serve.delete("served")
