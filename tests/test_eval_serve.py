"""Index job, batch evaluation and the Serve endpoint on one small trained run (real Ray, FAISS, HTTP)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deftrec.config.jobs import EvaluateJobConfig, IndexConfig
from deftrec.core.artifacts import read_manifest

REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
pytestmark = pytest.mark.usefixtures("ray_session")


def _train_and_export(data_dir, out_dir, seed: int):
    """The tiny preset briefly trained by the pipeline's training job (one worker) and exported to ``out_dir``."""
    import shutil

    from deftrec.config.pipeline import load_deftrec_config
    from tests.helpers import train_and_export

    cfg = load_deftrec_config(REPO / "pipelines/configs/tiny.yaml", [
        "train.max_steps=6", "train.warmup_steps=2", "train.validate_every=6", "train.valid_users=40",
        "collab.epochs=2",
        f"train.seed={seed}", "eval.steps=5"])
    work = Path(out_dir).parent / f"train-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        (work / "data").symlink_to(Path(data_dir).resolve(), target_is_directory=True)
    model, _ = train_and_export(work, cfg)
    if Path(out_dir) != work / "model":
        shutil.copytree(work / "model", out_dir)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_small):
    """data/ (preprocessed synthetic log), model/ (a briefly trained tiny export), index/ (Flat)."""
    from deftrec.batch.index_job import run_index_job
    from deftrec.config.data import PreprocessConfig
    from deftrec.core.config import from_dict
    from deftrec.data.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("run")
    run_preprocess(from_dict(PreprocessConfig, {"input": [str(synth_small / "interactions.csv")],
                                                "items": str(synth_small / "items.csv"),
                                                "output": str(root / "data")}), log=lambda s: None)
    _train_and_export(root / "data", root / "model", seed=1)
    run_index_job(root, IndexConfig(), log=lambda s: None)
    return root


# ------------------------------------------------------------------------------ index job


def test_index_job_keys_manifest_and_idempotence(run):
    from deftrec.artifacts.model import load_model
    from deftrec.batch.index_job import run_index_job

    m = read_manifest(run / "index")
    model = load_model(run / "model")
    assert m["factory"] == "Flat" and m["items"] == model.n_items and m["dim"] == model.item_emb.shape[1]
    assert m["recall@10"] == 1.0 and m["search_params"] == {}
    keys = pq.read_table(run / "index" / "item_keys.parquet").sort_by("item")
    # the keys are what the model retrieves against: LightGCN's E, or the trained W (item_space)
    np.testing.assert_array_equal(np.stack(keys.column("key").to_numpy(zero_copy_only=False)),
                                  model.retrieval_keys.detach().numpy())
    before = (run / "index" / "items.faiss").stat().st_mtime_ns
    assert run_index_job(run, IndexConfig(), log=lambda s: None)["fingerprint"] == m["fingerprint"]
    assert (run / "index" / "items.faiss").stat().st_mtime_ns == before  # nothing rebuilt
    hnsw = run_index_job(run, IndexConfig(factory="HNSW32,Flat"), log=lambda s: None, out_dir=run / "index_hnsw")
    assert hnsw["search_params"] == {"efSearch": 128} and hnsw["fingerprint"] != m["fingerprint"]


# ------------------------------------------------------------------------------ evaluation


def _hand_metrics(lists: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float]:
    hr, nd = 0.0, 0.0
    for row, t in zip(lists, targets):
        hits = np.flatnonzero(row[:k] == t)
        if hits.size:
            hr += 1
            nd += 1 / math.log2(hits[0] + 2)
    return hr / len(targets), nd / len(targets)


def test_evaluation_metrics_recs_and_determinism(run):
    from deftrec.artifacts.model import load_model
    from deftrec.batch.evaluate import run_evaluation
    from deftrec.config.jobs import EvaluateJobConfig
    from deftrec.data.samples import load_dataset
    from deftrec.retrieval.recommender import DeftRecRecommender

    m1 = run_evaluation(run, EvaluateJobConfig(limit=60, batch_size=16, seed=3), log=lambda s: None)
    out = run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(m1))
    assert set(metrics) >= {"split", "users", "sampler", "steps", "seconds", "coverage", "results"}
    assert list(metrics["results"]) == ["deftrec", "popularity", "markov", "ease", "sasrec"]  # all four by default
    for r in metrics["results"].values():
        assert set(r) == {"history_excluded", "history_kept"}
        assert set(r["history_excluded"]) == {f"{m}@{k}{se}" for m in ("hr", "ndcg") for k in (5, 10, 20)
                                              for se in ("", "_se")}  # each with its standard error
        assert 0 < r["history_excluded"]["ndcg@10_se"] < 0.2 or r["history_excluded"]["ndcg@10"] == 0
    assert metrics["baselines_not_run"] == {}
    assert metrics["users"] == 60 and metrics["sampler"] == "ddim" and metrics["steps"] == 5
    assert (out / "report.md").read_text().count("| deftrec |") == 2 and (out / "report.png").stat().st_size > 1000
    # metrics equal an independent computation from recs.parquet
    recs = pq.read_table(out / "recs.parquet").sort_by("user")
    targets = recs.column("target").to_numpy()
    for proto, col in (("history_excluded", "items_excluded"), ("history_kept", "items_kept")):
        lists = np.stack(recs.column(col).to_numpy(zero_copy_only=False))
        for k in (5, 10, 20):
            hr, nd = _hand_metrics(lists, targets, k)
            assert metrics["results"]["deftrec"][proto][f"hr@{k}"] == pytest.approx(hr)
            assert metrics["results"]["deftrec"][proto][f"ndcg@{k}"] == pytest.approx(nd)
    # the Ray Data + FAISS pipeline recommends what the in-process recommender recommends
    data = load_dataset(run / "data")
    es = data.test.subset(np.arange(60))
    model = load_model(run / "model")
    rec = DeftRecRecommender(model, __import__("dataclasses").replace(model.cfg.eval, seed=3))
    ref = rec.recommend(es.histories, users=es.users, k=20, exclude_history=True, exclude=es.exclusions)
    got = np.stack(recs.column("items_excluded").to_numpy(zero_copy_only=False))[:, :10]
    got_scores = np.stack(recs.column("scores_excluded").to_numpy(zero_copy_only=False))[:, :10]
    # FAISS (float32 distances) and torch may order near-ties differently: same scores, rare swaps
    np.testing.assert_allclose(got_scores, ref.scores[:, :10], rtol=1e-4, atol=1e-3)
    assert (got == ref.items[:, :10]).mean() > 0.98
    # history excluded means excluded
    for row, h in zip(np.stack(recs.column("items_excluded").to_numpy(zero_copy_only=False)), es.exclusions):  # the whole history
        assert not set(row.tolist()) & set(h.tolist())
    # a fixed seed gives identical metrics and lists twice
    m2 = run_evaluation(run, EvaluateJobConfig(limit=60, batch_size=16, seed=3, actors=1), log=lambda s: None,
                        force=True)
    assert m2["results"] == m1["results"]
    recs2 = pq.read_table(out / "recs.parquet").sort_by("user")
    np.testing.assert_array_equal(np.stack(recs2.column("items_excluded").to_numpy(zero_copy_only=False)),
                                  np.stack(recs.column("items_excluded").to_numpy(zero_copy_only=False)))


def test_every_model_and_validation_exclude_the_whole_history(run):
    """DeftRec (batch job), the baselines and validation leave out the same items for a user: the whole
    sequence before the target, items older than the prompt's max_history window included."""
    from deftrec.artifacts.model import load_model
    from deftrec.batch.baselines import run_baselines
    from deftrec.batch.registry import build_baselines
    from deftrec.batch.evaluate import run_evaluation
    from deftrec.config.jobs import EvaluateJobConfig
    from deftrec.data.samples import load_dataset
    from deftrec.retrieval.metrics import evaluate_both_protocols
    from deftrec.retrieval.recommender import DeftRecRecommender
    from deftrec.training.validation import evaluate

    data = load_dataset(run / "data")
    es = data.test.subset(np.arange(60))
    max_history = data.manifest["config"]["max_history"]
    long = [i for i, h in enumerate(es.histories) if len(es.exclusions[i]) > len(h)]
    assert long and all(len(es.histories[i]) == max_history for i in long)
    for i in range(len(es)):  # the exclusion set is everything before the target
        np.testing.assert_array_equal(es.exclusions[i], data.sequences[i][:-1])
    # DeftRec through the batch job (FAISS): no excluded list holds any item of the whole history
    m = run_evaluation(run, EvaluateJobConfig(limit=60, batch_size=16), log=lambda s: None, force=True)
    recs = pq.read_table(run / "eval" / "recs.parquet").sort_by("user")
    for row, seen in zip(recs.column("items_excluded").to_numpy(zero_copy_only=False), es.exclusions):
        assert not set(row.tolist()) & set(seen.tolist())
    # the baselines in the report are the baselines scored and masked with that same set
    names = [n for n in m["results"] if n != "deftrec"]
    ref = run_baselines(list(data.sequences_before("test")), list(es.exclusions), es.targets, data.n_items,
                        models=build_baselines(names, EvaluateJobConfig().sasrec))
    for n in names:
        for proto in ("history_excluded", "history_kept"):
            for key, value in m["results"][n][proto].items():
                assert value == pytest.approx(ref[n][proto][key]), (n, proto, key)
    # validation masks the same set: its metrics equal exact scores masked with the whole history
    model = load_model(run / "model")
    got = evaluate(model, es, seed=3)
    scores = DeftRecRecommender(model).score_users(es.histories, es.users, seed=3)
    want = evaluate_both_protocols(scores, es.targets, es.exclusions, ks=model.cfg.eval.k)
    for proto in want:
        for key, value in want[proto].items():
            assert got[proto][key] == pytest.approx(value), (proto, key)
    assert 0 < got["history_excluded"]["ndcg@10_se"] < 0.2  # the standard error comes with it


def test_a_baseline_that_crashes_natively_leaves_metrics_complete(run, tmp_path):
    """A baseline whose process dies (here: SIGSEGV in its own fit, as a native crash does) ends only
    that baseline: metrics.json has DeftRec and every other baseline, and names it as not run."""
    import os
    import shutil
    import signal

    from deftrec.batch.baselines import Popularity
    from deftrec.batch.evaluate import run_evaluation
    from deftrec.config.jobs import EvaluateJobConfig

    class CrashesNatively(Popularity):
        def fit(self, train_sequences, n_items):
            os.kill(os.getpid(), signal.SIGSEGV)

    copy = tmp_path / "run"
    for d in ("data", "model", "index"):
        shutil.copytree(run / d, copy / d)
    m = run_evaluation(copy, EvaluateJobConfig(limit=30, batch_size=16), log=lambda s: None,
                       baselines={"popularity": Popularity(), "crasher": CrashesNatively()})
    assert set(m["results"]) == {"deftrec", "popularity"}
    assert list(m["baselines_not_run"]) == ["crasher"] and m["baselines_not_run"]["crasher"]
    on_disk = json.loads((copy / "eval" / "metrics.json").read_text())
    assert on_disk["baselines_not_run"] == m["baselines_not_run"]
    assert "crasher: not run" in (copy / "eval" / "report.md").read_text()


def test_evaluation_refuses_missing_stages(tmp_path):
    from deftrec.batch.evaluate import run_evaluation
    from deftrec.config.jobs import EvaluateJobConfig
    from deftrec.core.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="model export"):
        run_evaluation(tmp_path, EvaluateJobConfig())
    with pytest.raises(ValueError, match="split"):
        EvaluateJobConfig(split="train")


# ------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def server(run):
    import httpx
    from ray import serve

    from deftrec.serve import build_app

    serve.run(build_app(str(run), num_cpus=0, max_batch_size=16, batch_wait_timeout_s=0.05), route_prefix="/")
    client = httpx.Client(base_url=URL, timeout=60)
    yield client
    client.close()
    serve.shutdown()


def _users(run) -> list[str]:
    return pq.read_table(run / "data" / "users.parquet").column("user_id").to_pylist()


def test_endpoint_matches_batch_evaluation(run, server):
    from deftrec.batch.evaluate import run_evaluation
    from deftrec.config.jobs import EvaluateJobConfig

    run_evaluation(run, EvaluateJobConfig(limit=8, batch_size=4), log=lambda s: None)  # the model's own seed
    recs = pq.read_table(run / "eval" / "recs.parquet").sort_by("user")
    recs = [{"user": u, "items_excluded": list(a), "items_kept": list(b)} for u, a, b in zip(
        recs.column("user").to_pylist(), recs.column("items_excluded").to_numpy(zero_copy_only=False),
        recs.column("items_kept").to_numpy(zero_copy_only=False))]
    items = pq.read_table(run / "data" / "items.parquet").sort_by("item").column("item_id").to_pylist()
    users = dict(zip(pq.read_table(run / "data" / "users.parquet").column("user").to_pylist(), _users(run)))
    # the whole sequence before the test target: the prompt reads its newest max_history items (the
    # split's window), and the ranking excludes all of it, as batch evaluation does
    seqs = {r["user"]: r["items"][:-1] for r in pq.read_table(run / "data" / "sequences.parquet").to_pylist()}
    max_history = read_manifest(run / "data")["config"]["max_history"]
    assert any(len(seqs[r["user"]]) > max_history for r in recs[:4])  # items older than the window count too
    for r in recs[:4]:
        body = {"user_id": users[r["user"]], "history": [items[i] for i in seqs[r["user"]]], "k": 10}
        got = server.post("/recommend", json=body)
        assert got.status_code == 200, got.text
        assert [x["item_id"] for x in got.json()["items"]] == [items[i] for i in r["items_excluded"][:10]]
        assert not {x["item_id"] for x in got.json()["items"]} & {items[i] for i in seqs[r["user"]]}
        kept = server.post("/recommend", json={**body, "exclude_history": False}).json()
        assert [x["item_id"] for x in kept["items"]] == [items[i] for i in r["items_kept"][:10]]


def test_endpoint_response_and_routes(run, server):
    r = server.post("/recommend", json={"user_id": _users(run)[0], "k": 5, "explain": True})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 5 and isinstance(body["reasoning"], str)
    assert set(body["timings_ms"]) >= {"condition", "sample", "search", "total"}
    assert body["model_version"] == server.get("/healthz").json()["model_version"]
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    item = body["items"][0]
    assert server.get(f"/items/{item['item_id']}").json() == {k: item[k] for k in ("item_id", "title", "category")}
    assert "/recommend" in server.get("/openapi.json").json()["paths"]


def test_endpoint_excludes_a_history_longer_than_the_prompt(run, server):
    items = pq.read_table(run / "data" / "items.parquet").sort_by("item").column("item_id").to_pylist()
    history = items[:60]  # far more than max_history (20): the prompt reads the newest 20
    got = server.post("/recommend", json={"history": history, "k": 50}).json()["items"]
    assert len(got) == 50 and not {x["item_id"] for x in got} & set(history)
    kept = server.post("/recommend", json={"history": history, "k": 100, "exclude_history": False}).json()["items"]
    assert {x["item_id"] for x in kept} & set(history[:40])  # without exclusion the old items do come back


@pytest.mark.parametrize("body,status,needle", [
    ({"user_id": "no-such-user"}, 404, "no-such-user"),
    ({"history": ["1000", "no-such-item"]}, 404, "no-such-item"),
    ({"k": 5}, 422, "user_id or history"),
    ({"user_id": "U1", "k": 0}, 422, "greater than or equal to 1"),
    ({"user_id": "U1", "k": 101}, 422, "less than or equal to 100"),
    ({"user_id": "U1", "k": "ten"}, 422, "valid integer"),
    ({"history": []}, 422, "at least 1"),
    ({"history": ["1000"] * 501}, 422, "at most 500"),
    ({"user_id": "U1", "surprise": 1}, 422, "Extra inputs"),
    ({"user_id": {"nested": 1}}, 422, "user_id"),
    # strict types: a value of the wrong JSON type is refused, never coerced
    ({"user_id": True}, 422, "user_id"),
    ({"user_id": 1.0}, 422, "user_id"),
    ({"user_id": "U1", "k": True}, 422, "valid integer"),
    ({"user_id": "U1", "k": 5.0}, 422, "valid integer"),
    ({"user_id": "U1", "k": "5"}, 422, "valid integer"),
    ({"user_id": "U1", "exclude_history": 0}, 422, "valid boolean"),
    ({"user_id": "U1", "explain": "yes"}, 422, "valid boolean"),
    ({"history": ["1000", True]}, 422, "history"),
    ({"history": [1.5]}, 422, "history"),
    ({"history": [1.0]}, 422, "history"),
])
def test_bad_input_never_500(server, body, status, needle):
    r = server.post("/recommend", json=body)
    assert r.status_code == status and needle in r.text


def test_catalog_refuses_booleans_and_floats_as_ids(run):
    from deftrec.serve.engine import ServingCatalog, UnknownId

    catalog = ServingCatalog(run / "data")
    user = _users(run)[0]
    assert catalog.user(user) == catalog.user(str(user))
    for bad in (True, 1.0, None, [user]):
        with pytest.raises(UnknownId):
            catalog.user(bad)
        with pytest.raises(UnknownId):
            catalog.items([catalog.item_ids[0], bad])


def test_malformed_and_oversized_bodies(server):
    assert server.post("/recommend", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    r = server.post("/recommend", content=b"[" + b"1," * 40000 + b"1]", headers={"content-type": "application/json"})
    assert r.status_code == 413
    chunks = (b"1," * 1000 for _ in range(100))  # no content-length: refused while it streams in
    assert server.post("/recommend", content=chunks, headers={"content-type": "application/json"}).status_code == 413
    assert server.get("/items/definitely-not-an-item").status_code == 404


def test_concurrent_requests_are_batched(run, server):
    users = _users(run)
    with cf.ThreadPoolExecutor(50) as ex:
        rs = list(ex.map(lambda i: server.post("/recommend", json={"user_id": users[i % len(users)]}), range(50)))
    assert all(r.status_code == 200 for r in rs)
    assert max(r.json()["timings_ms"]["batch_size"] for r in rs) > 1


def test_overload_answers_503_quickly_and_nothing_else_fails(run, server):
    """Bounded queues: beyond max_ongoing + max_queued the answer is 503 at once (the ingress's
    handle refuses), a request slower than request_timeout_s is 503 too; no other 5xx, no hang."""
    from collections import Counter

    from ray import serve

    from deftrec.serve import build_app

    users = _users(run)

    def deploy(**kw):
        serve.run(build_app(str(run), num_cpus=0, max_batch_size=2, batch_wait_timeout_s=0.01, max_ongoing_requests=2,
                            max_queued_requests=2, **kw), name="tight", route_prefix="/tight")

    def post(i: int):
        t0 = time.perf_counter()
        r = server.post("/tight/recommend", json={"user_id": users[i % len(users)], "explain": True})
        return r, time.perf_counter() - t0

    deploy()
    try:
        with cf.ThreadPoolExecutor(24) as ex:
            rs = list(ex.map(post, range(48)))
        codes = Counter(r.status_code for r, _ in rs)
        assert set(codes) <= {200, 503} and codes[200] >= 1 and codes[503] >= 1, codes
        # refused by the proxy (the ingress's queue) or by the ingress (the recommender's queue)
        assert all("backpressure" in r.text for r, _ in rs if r.status_code == 503)
        assert max(dt for r, dt in rs if r.status_code == 503) < 10
        deploy(request_timeout_s=0.001)  # no recommendation is that fast
        r = server.post("/tight/recommend", json={"user_id": users[0]})
        assert r.status_code == 503 and "no answer within" in r.text and r.headers["retry-after"] == "1"
    finally:
        serve.delete("tight")
    with pytest.raises(ValueError, match="bounded queues"):
        build_app(str(run), max_queued_requests=-1)


def test_replica_kill_is_survived(run, server):
    import ray

    users = _users(run)
    assert server.post("/recommend", json={"user_id": users[0]}).status_code == 200
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "Recommender" in a["name"] and "SERVE_REPLICA" in a["name"]]
    assert actors, ray.util.list_named_actors(all_namespaces=True)
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    deadline = time.time() + 120
    ok = False
    while time.time() < deadline:
        try:
            ok = server.post("/recommend", json={"user_id": users[1]}).status_code == 200
        except Exception:
            ok = False
        if ok:
            break
        time.sleep(1)
    assert ok, "no successful request within 120 s of killing the replica"


@pytest.fixture(scope="module")
def v2(run):
    """A second model version (another training seed) and its index."""
    from deftrec.batch.index_job import run_index_job

    v2_model, v2_index = run / "model_v2", run / "index_v2"
    _train_and_export(run / "data", v2_model, seed=2)
    run_index_job(run, IndexConfig(), log=lambda s: None, model_dir=v2_model, out_dir=v2_index)
    return v2_model, v2_index


def _swap_under_load(run, client, prefix: str, redeploy, v2_model) -> None:
    """Four clients post continuously while ``redeploy()`` swaps in v2; every request must succeed."""
    from deftrec.core.artifacts import artifact_version

    old = client.get(f"{prefix}/healthz").json()["model_version"]
    assert artifact_version(v2_model) != old
    users = _users(run)
    stop, statuses, versions = threading.Event(), [], set()

    def load():
        while not stop.is_set():
            r = client.post(f"{prefix}/recommend", json={"user_id": users[len(statuses) % len(users)]})
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.add(r.json()["model_version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    redeploy()
    deadline = time.time() + 120
    while time.time() < deadline and client.get(f"{prefix}/healthz").json()["model_version"] == old:
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert statuses and all(s == 200 for s in statuses), {s for s in statuses}
    assert artifact_version(v2_model) in versions and client.get(f"{prefix}/healthz").json()["model_version"] != old


def test_version_swap_under_load_drops_nothing(run, server, v2):
    from ray import serve

    from deftrec.serve import build_app

    user_config = {"model_dir": str(v2[0]), "index_dir": str(v2[1])}
    _swap_under_load(run, server, "", lambda: serve.run(build_app(
        str(run), num_cpus=0, max_batch_size=16, batch_wait_timeout_s=0.05, user_config=user_config),
        route_prefix="/"), v2[0])


def test_fused_topology_answers_batches_and_swaps(run, server, v2):
    """topology=fused (the ingress holds the model): same answers as split, batching, in-place swap."""
    from ray import serve

    from deftrec.serve import build_app

    def deploy(user_config=None):
        serve.run(build_app(str(run), num_cpus=0, max_batch_size=16, batch_wait_timeout_s=0.05, topology="fused",
                            user_config=user_config), name="fused", route_prefix="/fused")

    from deftrec.serve.engine import Query, RecommenderEngine, ServingCatalog

    engine = RecommenderEngine(run / "model", run / "index")  # the same model, in this process
    catalog = ServingCatalog(run / "data")
    assert catalog.max_history == read_manifest(run / "data")["config"]["max_history"]  # preprocessing's length
    deploy()
    try:
        users = _users(run)
        for u in users[:3]:
            got = server.post("/fused/recommend", json={"user_id": u, "k": 10})
            assert got.status_code == 200, got.text
            idx = catalog.user(u)
            res, _ = engine.recommend([Query(catalog.stored_history(idx), key=idx, user=idx, k=10,
                                             exclude_history=True, explain=False)])
            assert [x["item_id"] for x in got.json()["items"]] == [catalog.describe(i)["item_id"]
                                                                   for i, _ in res[0]["items"]]
        with cf.ThreadPoolExecutor(20) as ex:
            rs = list(ex.map(lambda i: server.post("/fused/recommend", json={"user_id": users[i]}), range(20)))
        assert all(r.status_code == 200 for r in rs)
        assert max(r.json()["timings_ms"]["batch_size"] for r in rs) > 1
        _swap_under_load(run, server, "/fused",
                         lambda: deploy({"model_dir": str(v2[0]), "index_dir": str(v2[1])}), v2[0])
    finally:
        serve.delete("fused")


def test_build_app_refuses_unknown_topology(run):
    from deftrec.serve import build_app
    from deftrec.serve.app import app

    with pytest.raises(ValueError, match="topology"):
        build_app(str(run), topology="sideways")
    with pytest.raises(ValueError, match="unknown application argument"):
        app({"run_dir": str(run), "topolgy": "fused"})


def test_evaluation_actors_are_sized_from_the_cluster_unless_set():
    from deftrec.batch.evaluate import evaluation_actors

    auto = EvaluateJobConfig(batch_size=10)
    assert evaluation_actors(auto, 1000, {"CPU": 16.0}) == 15  # one CPU left to Ray Data's own tasks
    assert evaluation_actors(auto, 1000, {"CPU": 2.0}) == 1
    assert evaluation_actors(auto, 25, {"CPU": 16.0}) == 3  # no more actors than batches
    gpu = EvaluateJobConfig(batch_size=10, gpus_per_actor=0.5)
    assert evaluation_actors(gpu, 1000, {"CPU": 64.0, "GPU": 4.0}) == 8
    assert evaluation_actors(EvaluateJobConfig(actors=3), 1000, {"CPU": 64.0}) == 3
