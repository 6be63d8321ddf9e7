"""A model trained with user tokens (``tokenizer.user_tokens``) conditions every query on a LightGCN
user embedding. An anonymous ``history`` request has no user: it is refused with a 422 naming the
reason (it used to be answered silently as stored user 0), while known users, with or without a
history, are served, also when they share a batch with a refused request. Real Ray Serve over
HTTP on a briefly trained tiny export."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deftrec.config.jobs import IndexConfig
from tests.helpers import toy_run

URL = "http://127.0.0.1:8000/usertok"
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_small):
    """data/, model/ (tiny export with user tokens), index/ (Flat)."""
    from deftrec.batch.index_job import run_index_job

    root = tmp_path_factory.mktemp("usertok")
    model = toy_run(root, synth_small, "tokenizer.user_tokens=true")
    assert model.cfg.tokenizer.user_tokens
    run_index_job(root, IndexConfig(), log=lambda s: None)
    return root


def _ids(run: Path, name: str, column: str) -> list[str]:
    return [str(x) for x in pq.read_table(run / "data" / name).column(column).to_pylist()]


def test_engine_refuses_anonymous_queries_instead_of_using_user_zero(run):
    from deftrec.serve.engine import NeedsKnownUser, Query, RecommenderEngine, ServingCatalog

    engine = RecommenderEngine(run / "model", run / "index")
    catalog = ServingCatalog(run / "data")
    hist = catalog.stored_history(0)
    anon = Query(hist, key=12345, user=None, k=5, exclude_history=True, explain=False)
    assert "tokenizer.user_tokens" in engine.refusal(anon)
    with pytest.raises(NeedsKnownUser, match="anonymous history"):
        engine.recommend([Query(hist, key=0, user=0, k=5, exclude_history=True, explain=False), anon])
    known = [Query(hist, key=u, user=u, k=5, exclude_history=True, explain=False) for u in (0, 1)]
    assert all(engine.refusal(q) is None for q in known)
    res, _ = engine.recommend(known)
    assert [len(r["items"]) for r in res] == [5, 5]


def test_endpoint_answers_422_for_anonymous_history_and_serves_known_users(run):
    import httpx
    from ray import serve

    from deftrec.serve import build_app

    users, items = _ids(run, "users.parquet", "user_id"), _ids(run, "items.parquet", "item_id")
    serve.run(build_app(str(run), num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.2, topology="fused"),
              name="usertok", route_prefix="/usertok")
    try:
        with httpx.Client(base_url=URL, timeout=60) as client:
            r = client.post("/recommend", json={"history": items[:4], "k": 5})
            assert r.status_code == 422, r.text
            assert "user tokens" in r.json()["detail"] and "user_id" in r.json()["detail"]
            for body in ({"user_id": users[0], "k": 5}, {"user_id": users[1], "history": items[:4], "k": 5}):
                r = client.post("/recommend", json=body)
                assert r.status_code == 200, r.text
                assert len(r.json()["items"]) == 5
            # refused and served requests in the same batches: the refusal costs the others nothing
            bodies = [{"history": items[i:i + 3]} if i % 2 else {"user_id": users[i]} for i in range(12)]
            with cf.ThreadPoolExecutor(12) as ex:
                rs = list(ex.map(lambda b: client.post("/recommend", json=b), bodies))
            assert [r.status_code for r in rs] == [422 if i % 2 else 200 for i in range(12)]
            served = [r.json() for i, r in enumerate(rs) if not i % 2]
            assert max(b["timings_ms"]["batch_size"] for b in served) > 1
            assert np.all([len(b["items"]) == 10 for b in served])
    finally:
        serve.delete("usertok")
