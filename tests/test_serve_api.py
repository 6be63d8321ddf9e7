"""The HTTP API of the real Serve app (split topology, loopback, a briefly trained tiny export):
schemathesis against its own OpenAPI document (no 5xx, responses as documented, every request of
the wrong shape or type refused), and explanations kept out of the batches of requests that did
not ask for them."""

from __future__ import annotations

import concurrent.futures as cf
import zlib

import httpx
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from deftrec.config.jobs import IndexConfig
from deftrec.serve.app import api
from tests.helpers import copy_toy_run

URL = "http://127.0.0.1:8000/api"
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_trained):
    from deftrec.batch.index_job import run_index_job

    root = tmp_path_factory.mktemp("api")
    copy_toy_run(toy_trained, root)
    run_index_job(root, IndexConfig(), log=lambda s: None)
    return root


@pytest.fixture(scope="module")
def app_url(run):
    from ray import serve

    from deftrec.serve import build_app

    KNOWN.update(users=pq.read_table(run / "data" / "users.parquet").column("user_id").to_pylist(),
                 items=pq.read_table(run / "data" / "items.parquet").column("item_id").to_pylist())
    # a long batch wait, so that concurrent requests really share batches
    serve.run(build_app(str(run), num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.2), name="api",
              route_prefix="/api")
    yield URL
    serve.delete("api")


CHECKS = [not_a_server_error, negative_data_rejection, positive_data_acceptance, response_schema_conformance,
          status_code_conformance, content_type_conformance]
CONFIG = schemathesis.Config.from_dict({
    "request-timeout": 60,
    # examples, coverage (the deterministic boundary and wrong-type values of every field) and fuzzing;
    # valid and invalid data
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    "generation": {"mode": "all", "max-examples": 40, "deterministic": True, "database": "none"},
    "checks": {
        # refused means refused by validation: a 404 is a wrong-typed id that got as far as the lookup
        "negative_data_rejection": {"expected-statuses": [400, 413, 422]},
        # valid data is accepted: answered, or an id the catalog lacks (the schema cannot know the ids)
        "positive_data_acceptance": {"expected-statuses": ["2xx", 404]}}})
# The document of the very FastAPI app the Serve ingress serves (test_served_document_is_the_apps
# checks that it is what the server publishes); loaded at import, since parametrize needs it then
# (schemathesis's lazy pytest loader, from_fixture, does not run on pytest 9).
schema = schemathesis.openapi.from_dict(api.openapi(), config=CONFIG)
KNOWN: dict = {}  # the toy catalog's ids, filled by app_url
STATUSES: dict = {}


@schema.hook("map_case")
def with_known_ids(context, case):
    """Every other valid case with ids the catalog holds (still strings: still valid), so that the
    model answers it and the answer is checked against the schema too."""
    if case.meta is None or case.meta.generation.mode.is_negative or not KNOWN \
            or zlib.crc32(repr((case.body, case.path_parameters)).encode()) % 2:
        return case
    users, items = KNOWN["users"], KNOWN["items"]
    if isinstance(case.body, dict):
        if case.body.get("user_id") is not None:
            case.body["user_id"] = users[len(repr(case.body)) % len(users)]
        if isinstance(case.body.get("history"), list):
            case.body["history"] = [items[i % len(items)] for i in range(len(case.body["history"]))]
    if "item_id" in case.path_parameters:
        case.path_parameters["item_id"] = items[len(case.path_parameters["item_id"]) % len(items)]
    return case


@schema.hook("filter_case")
def no_integral_floats_as_valid(context, case):
    """JSON Schema counts 46.0 as an integer; the strict API refuses it (tests/test_eval_serve.py), so
    such a body is no valid data here."""
    return case.meta is None or case.meta.generation.mode.is_negative or not _integral_float_in(case.body)


def _integral_float_in(value) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_integral_float_in(v) for v in value)


def test_served_document_is_the_apps(app_url):
    served = httpx.get(f"{app_url}/openapi.json", timeout=30).json()
    assert {k: v for k, v in served.items() if k != "servers"} == api.openapi()
    assert sorted(served["paths"]) == ["/healthz", "/items/{item_id}", "/recommend"]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_keeps_its_schema_and_refuses_wrong_types(case, app_url):
    """Per operation, valid and invalid data: no 5xx (not even 503: nothing overloads it here), only
    documented status codes, content types and bodies, valid data accepted; every request the schema
    forbids (wrong types, extra keys, out of range, not JSON) refused by validation, none accepted."""
    response = case.call_and_validate(base_url=app_url, checks=CHECKS)
    STATUSES.setdefault(case.operation.label, set()).add(response.status_code)


def test_the_fuzzing_reached_the_model():
    """The run above answered requests (so the answers' schema was checked), not only refusals."""
    assert STATUSES, "reads what test_api_keeps_its_schema_and_refuses_wrong_types saw: run them together"
    assert {200, 404, 422} <= STATUSES.get("POST /recommend", set()), STATUSES
    assert {200, 404} <= STATUSES.get("GET /items/{item_id}", set()), STATUSES


def test_explain_requests_never_make_other_batches_generate(run, app_url):
    """Explained and plain requests in flight together: each batch holds one kind only, so no plain
    answer waited for text generation (its batch generated no text) and every explained one has its
    text. With one queue for both, the mixed batches would have generated text for everyone."""
    users = pq.read_table(run / "data" / "users.parquet").column("user_id").to_pylist()
    bodies = [{"user_id": users[i], "k": 5, "explain": i % 2 == 0} for i in range(24)]
    with httpx.Client(base_url=app_url, timeout=60) as client, cf.ThreadPoolExecutor(24) as ex:
        rs = list(ex.map(lambda b: client.post("/recommend", json=b), bodies))
    assert [r.status_code for r in rs] == [200] * len(bodies), [r.text for r in rs if r.status_code != 200]
    plain = [r.json() for b, r in zip(bodies, rs) if not b["explain"]]
    explained = [r.json() for b, r in zip(bodies, rs) if b["explain"]]
    for body in plain:
        assert body["reasoning"] is None and body["timings_ms"]["texts_generated"] == 0, body["timings_ms"]
    for body in explained:
        t = body["timings_ms"]
        assert isinstance(body["reasoning"], str) and t["texts_generated"] == t["batch_size"], t
    # both kinds were batched (so they were in flight together), yet never in one batch
    assert max(b["timings_ms"]["batch_size"] for b in plain) > 1
    assert max(b["timings_ms"]["batch_size"] for b in explained) > 1
