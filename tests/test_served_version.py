"""A served version is one validated unit of model, index and catalog: parts that do not belong
together are refused by name before anything is swapped, and a swap replaces the catalog with the
model and index (ids resolved and titles described by the version that answers). Real artifacts,
a briefly trained tiny export, the batching recommender of the Serve app in this process; the
Serve/HTTP swap under load is tests/test_eval_serve.py. A version is named by its content: after a
retrain in place (same folders, new contents) a replica refuses the folders until the user_config
names the new content, so replicas never mix versions. A replica that serves a version keeps
serving it when it refuses an update, and reports the refusal (/healthz, a warning); only a replica
with no version yet refuses to start."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deftrec.config.jobs import IndexConfig
from deftrec.core.artifacts import finish_manifest, read_manifest
from tests.helpers import copy_toy_run

pytestmark = pytest.mark.usefixtures("ray_session")


@contextlib.contextmanager
def _serve_warnings():
    """The warnings logged on the ``ray.serve`` logger meanwhile (a handler of its own: Serve may
    stop that logger from propagating to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _edit_items(src: Path, dst: Path, edit) -> Path:
    """A copy of the data artifact ``src`` whose items.parquet is ``edit(table)`` (manifest redone)."""
    shutil.copytree(src, dst)
    pq.write_table(edit(pq.read_table(dst / "items.parquet")), dst / "items.parquet")
    finish_manifest(dst, read_manifest(dst))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_trained):
    """data/, model/ + index/, model_b/ + index_b/ (the same weights under another version), and
    data copies: renamed titles (belongs to the model) and one item fewer (does not)."""
    from deftrec.artifacts.model import export_model
    from deftrec.batch.index_job import run_index_job

    root = tmp_path_factory.mktemp("served")
    model = copy_toy_run(toy_trained, root)
    # the same weights re-exported without the record of the data they trained on (an export made
    # outside the pipeline): the catalog is then matched by its items, so renamed titles belong to it
    shutil.rmtree(root / "model")
    export_model(model, root / "model")
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
    from deftrec.serve.version import VersionMismatch, content_version

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
    assert br.health()["refused_version"] is None and br.health()["refused_reason"] is None
    for bad in ({"model_dir": str(run / "model"), "index_dir": str(run / "index_b")},
                {"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b"),
                 "data_dir": str(run / "data_short"),
                 "version": content_version(run / "model_b", run / "index_b", run / "data_short")}):
        with _serve_warnings() as warned:
            br.reconfigure(bad)  # refused, but the replica keeps serving: no raise (Serve would stop it)
        health = br.health()
        assert "do not belong together" in health["refused_reason"], health
        assert health["refused_version"] == bad.get("version")
        assert health["version"] == served.version_id and health["model_version"] == "b"
        assert [r.levelno for r in warned] == [logging.WARNING]
        assert f"still serving version {served.version_id}" in warned[0].getMessage()
        assert "do not belong together" in warned[0].getMessage()
        br.check_health()  # a real check of the served model, which the refusal does not fail
    assert br.current is served and loads == ["model_b"] and br.versions()["model_version"] == "b"
    assert br.item("no-such-item")["status"] == 404
    br.reconfigure({"model_dir": str(run / "model_b"), "index_dir": str(run / "index_b")})
    assert br.current is served and br.health()["refused_reason"] is None  # named the served one again: cleared
    fresh = BatchedRecommender(str(run), loader=loader, wait_for_config=True)
    with pytest.raises(VersionMismatch, match="do not belong together"):  # no version yet: refuses to start
        fresh.reconfigure({"model_dir": str(run / "model"), "index_dir": str(run / "index_b")})
    assert fresh.current is None and loads == ["model_b"]


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


# ------------------------------------------------------------------------------ retrain in place


def _inplace_copy(run: Path, root: Path) -> Path:
    """A run of its own (data, model, index copied from ``run``) to rewrite in place."""
    for sub in ("data", "model", "index"):
        shutil.copytree(run / sub, root / sub)
    return root


def _retrain_in_place(root: Path) -> None:
    """What a retrain into the same run does: a new export over root/model, the index rebuilt over
    root/index (both renamed into place); the paths stay the same, the contents change."""
    import torch

    from deftrec.artifacts.model import export_model, load_model
    from deftrec.batch.index_job import run_index_job

    model = load_model(root / "model")
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05)  # other weights: another training
    export_model(model, root / "model")
    run_index_job(root, IndexConfig(), log=lambda s: None)


def test_retrain_in_place_is_refused_until_the_user_config_names_it(run, tmp_path):
    """Serve calls no reconfigure for an unchanged user_config, but starts new replicas from the
    folders: a replica started after a retrain in place refuses to serve the rewritten folders,
    the running one keeps serving what its user_config names, and naming the new content swaps it."""
    from deftrec.serve.app import BatchedRecommender
    from deftrec.serve.version import VersionMismatch, content_version

    root = _inplace_copy(run, tmp_path / "inplace")
    dirs = [root / p for p in ("model", "index", "data")]
    v1 = content_version(*dirs)

    def replica() -> BatchedRecommender:  # as build_app's deployments build it
        return BatchedRecommender(str(root), wait_for_config=True, require_version=True)

    running = replica()
    with pytest.raises(ValueError, match=f'add "version": "{v1}"'):
        running.reconfigure({})  # the folders alone do not say what the other replicas serve
    running.reconfigure({"version": v1})
    before = running.versions()
    assert before["version"] == v1
    _retrain_in_place(root)
    v2 = content_version(*dirs)
    assert v2 != v1
    running.reconfigure({"version": v1})  # (Serve would not even call it) nothing reloaded, nothing mixed
    assert running.versions() == before
    wrong = "0" * len(v1)
    for update, why in (({"version": wrong}, f"hold version {v2}, not the version {wrong}"),
                        ({}, "names no version")):
        running.reconfigure(update)  # refused: the running replica keeps v1 and says why
        health = running.health()
        assert {k: health[k] for k in before} == before, health
        assert health["refused_version"] == update.get("version") and why in health["refused_reason"], health
    late = replica()
    with pytest.raises(VersionMismatch) as e:
        late.reconfigure({"version": v1})
    assert f"hold version {v2}, not the version {v1}" in str(e.value) and "rewritten" in str(e.value)
    assert late.current is None  # refused before anything was loaded
    running.reconfigure({"version": v2})  # the rollout: a new version id
    after = running.versions()
    assert after["version"] == v2 and after["model_version"] != before["model_version"]
    assert after["index_version"] != before["index_version"]


def test_cli_prints_the_user_config_of_the_current_content(run, capsys):
    import json

    from deftrec.serve.version import content_version, main

    main([str(run), "--model-dir", str(run / "model_b"), "--index-dir", str(run / "index_b")])
    dirs = [(run / p).resolve() for p in ("model_b", "index_b", "data")]
    assert json.loads(capsys.readouterr().out) == {
        "model_dir": str(dirs[0]), "index_dir": str(dirs[1]), "data_dir": str(dirs[2]),
        "version": content_version(*dirs)}
    assert content_version(*dirs) != content_version(run / "model", run / "index", run / "data")  # declared "b"


def test_folders_rewritten_while_they_load_are_refused(run, tmp_path):
    """A replica never serves parts of two contents: the id is read again once everything is loaded."""
    from deftrec.artifacts.model import load_model
    from deftrec.serve.version import ServedVersion, VersionMismatch

    root = _inplace_copy(run, tmp_path / "midload")

    def loader(d: str):  # meanwhile another data artifact is renamed over root/data
        shutil.copytree(root / "data", tmp_path / "data_new")
        (tmp_path / "data_new" / "notes.txt").write_text("another preprocessing run")
        finish_manifest(tmp_path / "data_new", read_manifest(tmp_path / "data_new"))
        shutil.rmtree(root / "data")
        (tmp_path / "data_new").rename(root / "data")
        return load_model(d)

    with pytest.raises(VersionMismatch, match="changed while they were loaded"):
        ServedVersion(root / "model", root / "index", root / "data", loader=loader)


def test_served_retrain_in_place_never_mixes_replicas(run, tmp_path):
    """Over Serve (fused topology, HTTP), deployed as ``serve deploy`` does (a config: a user_config
    change is reconfigure on the running replicas, not new replicas): an update the running replica
    refuses leaves it serving (200s, the deployment stays healthy) and /healthz says why; after a
    retrain in place, a replica added under the same user_config refuses the rewritten folders (the
    deployment's status says why) and every answer still comes from the pinned version; naming the
    new content swaps the running replica in place and the added one starts on it."""
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from deftrec.serve.version import content_version

    root = _inplace_copy(run, tmp_path / "served_inplace")
    dirs = [root / p for p in ("model", "index", "data")]
    user = str(pq.read_table(root / "data" / "users.parquet").column("user_id")[0])
    serve.start()  # the Serve instance of the other tests, if any (127.0.0.1:8000)

    def deploy(replicas: int, user_config: dict, blocking: bool = False) -> None:
        """What ``serve deploy`` of a config file does: the same import path and args every time."""
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [{
            "name": "inplace", "route_prefix": "/inplace", "import_path": "deftrec.serve:app",
            "args": {"run_dir": str(root), "topology": "fused", "num_cpus": 0, "max_batch_size": 4,
                     "batch_wait_timeout_s": 0.01},
            "deployments": [{"name": "Ingress", "num_replicas": replicas, "user_config": user_config}]}]}),
            _blocking=blocking)

    def answers(client, n: int = 8) -> set:
        rs = [client.post("/recommend", json={"user_id": user, "k": 3}) for _ in range(n)]
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return {r.json()["model_version"] for r in rs}

    def ingress():
        return serve.status().applications["inplace"].deployments["Ingress"]

    v1 = content_version(*dirs)
    deploy(1, {"version": v1}, blocking=True)
    try:
        with httpx.Client(base_url="http://127.0.0.1:8000/inplace", timeout=60) as client:
            health = client.get("/healthz").json()
            assert health["version"] == v1 and health["refused_version"] is None
            m1 = health["model_version"]
            # an update the running replica refuses (an index built for another model): it keeps
            # answering with v1 throughout, is not stopped (the deployment stays healthy), says why
            mixed = content_version(root / "model", run / "index_b", root / "data")
            deploy(1, {"version": mixed, "index_dir": str(run / "index_b")})
            deadline = time.time() + 120
            while time.time() < deadline and (client.get("/healthz").json()["refused_version"] != mixed
                                              or ingress().status != "HEALTHY"):
                assert answers(client, 2) == {m1}
                time.sleep(0.5)
            health = client.get("/healthz").json()
            assert health["version"] == v1 and health["model_version"] == m1, health
            assert health["refused_version"] == mixed, health
            assert "the index was built for model b" in health["refused_reason"], health
            assert ingress().status == "HEALTHY" and ingress().replica_states == {"RUNNING": 1}, ingress()
            deploy(1, {"version": v1})  # naming the served version again is accepted: the refusal is cleared
            deadline = time.time() + 120
            while time.time() < deadline and client.get("/healthz").json()["refused_version"] is not None:
                assert answers(client, 2) == {m1}
                time.sleep(0.5)
            assert client.get("/healthz").json()["refused_reason"] is None
            _retrain_in_place(root)
            v2 = content_version(*dirs)
            deploy(2, {"version": v1})  # scale up, same user_config: the added replica finds v2 and refuses
            deadline, message = time.time() + 120, ""
            while time.time() < deadline and v2 not in message:
                message = ingress().message
                assert answers(client, 2) == {m1}
                time.sleep(0.5)
            assert f"hold version {v2}, not the version {v1}" in message, message
            assert answers(client) == {m1} and client.get("/healthz").json()["version"] == v1
            deploy(2, {"version": v2})  # the rollout: the running replica swaps in place, the added one starts
            deadline = time.time() + 120
            while time.time() < deadline and (client.get("/healthz").json()["version"] != v2
                                              or ingress().replica_states != {"RUNNING": 2}
                                              or ingress().status != "HEALTHY"):
                time.sleep(0.5)
            assert ingress().replica_states == {"RUNNING": 2} and ingress().status == "HEALTHY", ingress()
            assert answers(client, 16) == {client.get("/healthz").json()["model_version"]} != {m1}
            assert client.get("/healthz").json()["version"] == v2
    finally:
        serve.delete("inplace")


def test_a_model_that_reads_earlier_items_is_given_the_whole_history(run, tmp_path):
    """A served query carries the whole history, longer than the window, to every model (a window
    model's prompt reads the newest max_history of it), so one that reads the items before its
    window (tokenizer.user_vector: earlier_items) gets them; it also answers an anonymous history."""
    from types import SimpleNamespace

    from deftrec.artifacts.model import export_model, load_model
    from deftrec.config.model import DeftRecConfig
    from deftrec.core.config import from_dict, to_dict
    from deftrec.model.deftrec import DeftRec
    from deftrec.batch.index_job import run_index_job
    from deftrec.serve.version import ServedVersion

    base = load_model(run / "model")
    cfg = to_dict(base.cfg)
    cfg["tokenizer"].update(user_tokens=True, user_vector="earlier_items")
    cfg["prompt"]["user_tokens"] = True
    earlier = DeftRec.from_config(from_dict(DeftRecConfig, cfg), base.item_emb.numpy(), None, base.catalog)
    export_model(earlier, tmp_path / "model")
    run_index_job(run, IndexConfig(), log=lambda s: None, model_dir=tmp_path / "model", out_dir=tmp_path / "index")
    window_version = ServedVersion(run / "model", run / "index", run / "data")
    earlier_version = ServedVersion(tmp_path / "model", tmp_path / "index", run / "data")
    cat = window_version.catalog
    lengths = {u: cat.seen_items(i).size for u, i in cat.user_index.items()}
    user = max(lengths, key=lengths.get)
    assert lengths[user] > cat.max_history  # a history longer than the window
    req = SimpleNamespace(user_id=user, history=None, k=5, exclude_history=True, explain=False)
    seen = cat.seen_items(cat.user(user))
    assert window_version.query(req).history.tolist() == seen.tolist()
    assert earlier_version.query(req).history.tolist() == seen.tolist()
    anonymous = SimpleNamespace(user_id=None, history=cat.item_ids[:3], k=5, exclude_history=True, explain=False)
    assert earlier_version.engine.refusal(earlier_version.query(anonymous)) is None
