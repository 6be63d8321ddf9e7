"""Ray Serve application: FastAPI ingress + a batching recommender.

    serve run deftrec.serve:app run_dir=runs/tiny          # or DEFTREC_RUN_DIR=runs/tiny serve run deftrec.serve:app
    serve run deftrec.serve:app run_dir=runs/tiny topology=fused
    serve deploy cluster/serve_config.yaml                 # production

Routes: ``POST /recommend``, ``GET /items/{item_id}``, ``GET /healthz``, ``GET /openapi.json``
(docs at ``/docs``). The recommender runs generation/sampling once per ``@serve.batch`` batch.
A served version is one validated unit of model, index and catalog
(:class:`~deftrec.serve.version.ServedVersion`): a new one is named by ``user_config``
(``model_dir``, ``index_dir``, ``data_dir``) -> ``reconfigure``, refused with the reason when its
parts do not belong together, and swapped in whole after it has loaded and passed a warm-up, so
requests in flight finish on the old version and none fail. The recommender resolves the ids of
a request and describes the answer with the version of its batch; the ingress holds no catalog.

Back-pressure: every deployment bounds its queue (``max_queued_requests`` at each caller, on top
of ``max_ongoing_requests`` per replica) and the ingress waits at most ``request_timeout_s`` for
a recommendation, so overload answers 503 (with ``Retry-After``) at once instead of queueing
without bound.

Two topologies share this code:

* ``split`` (default): an ``Ingress`` deployment (HTTP, validation; CPU) calls a
  ``Recommender`` deployment (model + index; GPU on clusters) by handle. Each scales on its own.
* ``fused``: the ``Ingress`` replica holds the batching recommender itself. One hop fewer per
  request, which matters most on a small CPU host (``benchmarks/serve_load.py`` measures both).
"""

# No `from __future__ import annotations`: FastAPI must see the real types to read bodies.
import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI, HTTPException, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from deftrec.serve.engine import Query, UnknownId
from deftrec.serve.version import ServedVersion, version_identity
from deftrec.serve.schemas import (
    Health,
    Item,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)

MAX_BODY_BYTES = 64 * 1024
#: Requests each caller (the HTTP proxy, the ingress's handle) queues per deployment beyond
#: ``max_ongoing_requests``; more answer 503 at once.
MAX_QUEUED_REQUESTS = 256
#: Longest the ingress waits for a recommendation before answering 503.
REQUEST_TIMEOUT_S = 30.0

# max_body_size: FastAPI refuses larger bodies with 413 while reading them (chunked ones too),
# without the per-request cost of a BaseHTTPMiddleware.
api = FastAPI(title="DeftRec recommendations", version="1", max_body_size=MAX_BODY_BYTES,
              description="Generative recommendation with continuous-token diffusion (DeftRec).")


TOPOLOGIES = ("split", "fused")


class BatchedRecommender:
    """Holds one :class:`~deftrec.serve.version.ServedVersion` (model + index + catalog). Batches
    concurrent requests; swaps versions in reconfigure.

    The body of the ``Recommender`` deployment (split topology), or held in-process by the
    ingress (fused topology). ``wait_for_config``: load nothing until the first ``reconfigure``
    (Serve calls it right after construction when the deployment has a ``user_config``), so a
    replica never loads ``run_dir``'s version only to replace it; otherwise load ``run_dir``'s.
    """

    def __init__(self, run_dir: str, loader: Optional[Callable] = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01, ddim_steps: Optional[int] = None,
                 max_history: Optional[int] = None, wait_for_config: bool = False):
        self.run_dir = Path(run_dir)
        self.loader = loader
        self.ddim_steps = ddim_steps
        self.max_history = max_history
        self.current: Optional[ServedVersion] = None
        self.recommend_batch.set_max_batch_size(max_batch_size)
        self.recommend_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        if not wait_for_config:
            self.reconfigure({})

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {"model_dir", "index_dir", "data_dir", "ddim_steps"} (each defaults to the run
        directory's). A version whose contents differ from the served one is loaded, validated as
        one unit (:func:`~deftrec.serve.version.check_version_parts`: raises, and the old version
        keeps serving, when its parts do not belong together), warmed up, then swapped in."""
        dirs = [str(user_config.get(f"{k}_dir") or self.run_dir / k) for k in ("model", "index", "data")]
        ddim_steps = user_config["ddim_steps"] if "ddim_steps" in user_config else self.ddim_steps
        if self.current is not None and version_identity(*dirs, ddim_steps) == self.current.identity:
            return
        version = ServedVersion(*dirs, loader=self.loader, ddim_steps=ddim_steps, max_history=self.max_history)
        version.check()  # warm-up: the first real request should not pay for lazy initialisation
        # one assignment: batches in flight keep the version they started with
        self.current, self.ddim_steps = version, ddim_steps

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")
        self.current.check()

    def versions(self) -> dict:
        return self.current.versions

    def item(self, item_id: str) -> dict:
        """The served catalog's entry for ``item_id``, or ``{"status": 404, "detail"}``."""
        cat = self.current.catalog
        try:
            return cat.describe(int(cat.items([item_id])[0]))
        except UnknownId as e:
            return {"status": 404, "detail": str(e)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> list[dict]:
        """Per request: the described answer, or ``{"status", "detail"}`` for one this version
        cannot answer (404 unknown id, 422 an anonymous history to a user-token model); the others
        in the batch are served. Ids, model, index and titles all come from one pinned version."""
        v = self.current  # pin this batch to one version
        queries: list[Optional[Query]] = []
        errors: list[Optional[dict]] = []
        for req in requests:
            try:
                q = v.query(req)
            except UnknownId as e:
                q, err = None, {"status": 404, "detail": str(e)}
            else:
                why = v.engine.refusal(q)
                q, err = (None, {"status": 422, "detail": why}) if why is not None else (q, None)
            queries.append(q)
            errors.append(err)
        todo = [q for q in queries if q is not None]
        results, timings = ([], {}) if not todo else \
            await asyncio.get_running_loop().run_in_executor(None, v.engine.recommend, todo)
        served = iter(results)
        out = []
        for err in errors:
            if err is not None:
                out.append(err)
                continue
            r = next(served)
            out.append({"items": v.describe(r["items"]), "reasoning": r["reasoning"], "timings_ms": dict(timings),
                        "model_version": v.engine.model_version, "index_version": v.engine.index_version})
        return out

    async def recommend(self, req: RecommendRequest) -> dict:
        return await self.recommend_batch(req)


@serve.deployment(name="Recommender", max_ongoing_requests=64, max_queued_requests=MAX_QUEUED_REQUESTS)
class Recommender(BatchedRecommender):
    """Split topology: the model replica, called by the ingress through a deployment handle."""


@serve.deployment(name="Ingress", max_ongoing_requests=256, max_queued_requests=MAX_QUEUED_REQUESTS)
@serve.ingress(api)
class Ingress:
    """HTTP only: validation, back-pressure, status codes. Ids are resolved and answers described
    by the served version itself (the recommender), so a swap changes catalog, model and index at
    once."""

    def __init__(self, recommender, run_dir: str, local: Optional[dict] = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        """``recommender``: the Recommender's handle (split), or None with ``local`` holding the
        BatchedRecommender's arguments (fused)."""
        self.recommender = recommender
        self.request_timeout_s = request_timeout_s
        self.local = BatchedRecommender(run_dir, **local) if recommender is None else None

    @api.post("/recommend", response_model=RecommendResponse, responses={
        404: {"description": "unknown id"},
        422: {"description": "invalid request, or a history without user_id for a model with user tokens"},
        503: {"description": "overloaded: retry after the Retry-After seconds"}})
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        t0 = time.perf_counter()
        res = await self._bounded(lambda: self.local.recommend(req), lambda: self.recommender.recommend.remote(req))
        if "status" in res:  # decided by the version that took the batch (swaps included)
            raise HTTPException(status_code=res["status"], detail=res["detail"])
        timings = res["timings_ms"]
        timings["total"] = (time.perf_counter() - t0) * 1e3
        body = RecommendResponse(
            items=[ScoredItem(**x) for x in res["items"]],
            reasoning=res["reasoning"], model_version=res["model_version"], index_version=res["index_version"],
            timings_ms=timings)
        # Validated once above; a Response skips FastAPI's second validation + encoding pass.
        return Response(body.model_dump_json(), media_type="application/json")

    async def _bounded(self, local: Callable, remote: Callable) -> Any:
        """The recommender's answer (``local()`` fused, ``remote()`` split), or 503 when its queue is
        full or it takes longer than ``request_timeout_s`` (the request is then cancelled)."""
        call = remote() if self.local is None else None
        try:
            return await asyncio.wait_for(local() if call is None else call, self.request_timeout_s)
        except BackPressureError as e:
            raise HTTPException(status_code=503, detail=f"overloaded, try again later: {e.message}",
                                headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            if call is not None:
                call.cancel()
            raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                                detail=f"overloaded: no answer within {self.request_timeout_s:g} s") from None

    @api.get("/items/{item_id}", response_model=Item, responses={404: {"description": "unknown item"}})
    async def item(self, item_id: str) -> Item:
        async def here() -> dict:
            return self.local.item(item_id)

        res = await self._bounded(here, lambda: self.recommender.item.remote(item_id))
        if "status" in res:
            raise HTTPException(status_code=res["status"], detail=res["detail"])
        return Item(**res)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        v = self.local.versions() if self.local is not None else await self.recommender.versions.remote()
        return Health(status="ok", **v)

    def reconfigure(self, user_config: dict) -> None:
        if self.local is None:
            raise ValueError("user_config belongs to the Recommender deployment in the split topology")
        self.local.reconfigure(user_config)

    def check_health(self) -> None:
        if self.local is not None:
            self.local.check_health()


def build_app(run_dir: Optional[str] = None, loader: Optional[Callable] = None, num_cpus: float = 1.0,
              num_gpus: float = 0.0, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
              num_replicas: Any = 1, user_config: Optional[dict] = None, ingress_cpus: float = 0.0,
              ddim_steps: Optional[int] = None, topology: str = "split",
              max_ongoing_requests: Optional[int] = None, max_queued_requests: int = MAX_QUEUED_REQUESTS,
              request_timeout_s: float = REQUEST_TIMEOUT_S):
    """The application graph; ``loader(model_dir) -> DeftRec`` can be injected (tests, custom storage).

    ``num_cpus``/``num_gpus``/``num_replicas`` (an int, or a dict for autoscaling),
    ``max_ongoing_requests`` (default ``max(64, 2 x max_batch_size)``, 256 fused) and
    ``user_config`` apply to the replica that holds the model: the Recommender (split) or the
    Ingress (fused). ``ingress_cpus`` is the split topology's ingress reservation.
    ``max_queued_requests`` bounds every deployment's queue and ``request_timeout_s`` the wait
    for a recommendation: beyond either the answer is 503.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    if max_queued_requests < 1 or not request_timeout_s > 0:
        raise ValueError(f"max_queued_requests must be >= 1 and request_timeout_s > 0 (bounded queues), got "
                         f"{max_queued_requests} and {request_timeout_s}")
    if max_ongoing_requests is not None and max_ongoing_requests < max_batch_size:
        raise ValueError(f"max_ongoing_requests ({max_ongoing_requests}) must be >= max_batch_size "
                         f"({max_batch_size}), or batches never fill")
    run_dir = run_dir or os.environ.get("DEFTREC_RUN_DIR")
    if not run_dir:
        raise ValueError("no run directory: pass run_dir=DIR (serve run deftrec.serve:app run_dir=DIR) "
                         "or set DEFTREC_RUN_DIR")
    run_dir = str(Path(run_dir).resolve())
    for sub in ("data", "model", "index"):
        if not (Path(run_dir) / sub / "manifest.json").is_file():
            raise ValueError(f"{run_dir}/{sub} is missing or incomplete; run the pipeline first")
    model_opts: dict = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                        "max_ongoing_requests": max_ongoing_requests or max(64, 2 * max_batch_size),
                        "max_queued_requests": max_queued_requests}
    if isinstance(num_replicas, dict):
        model_opts["autoscaling_config"] = num_replicas
    else:
        model_opts["num_replicas"] = num_replicas
    if user_config is not None:
        model_opts["user_config"] = user_config
    # with a user_config a replica loads only its version (the flag stays the same when the
    # user_config changes, so a new version is still swapped in place by reconfigure)
    batching = dict(loader=loader, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                    ddim_steps=ddim_steps, wait_for_config=user_config is not None)
    if topology == "fused":
        model_opts["max_ongoing_requests"] = max_ongoing_requests or max(256, 2 * max_batch_size)
        return Ingress.options(**model_opts).bind(None, run_dir, local=batching, request_timeout_s=request_timeout_s)
    recommender = Recommender.options(**model_opts).bind(run_dir, **batching)
    return Ingress.options(ray_actor_options={"num_cpus": ingress_cpus}, max_queued_requests=max_queued_requests
                           ).bind(recommender, run_dir, request_timeout_s=request_timeout_s)


def app(args: dict):
    """Application builder for ``serve run deftrec.serve:app run_dir=DIR`` and ``serve deploy``."""
    args = dict(args or {})
    kwargs: dict = {"run_dir": args.pop("run_dir", None)}
    if "topology" in args:
        kwargs["topology"] = str(args.pop("topology"))
    for key, conv in (("num_cpus", float), ("num_gpus", float), ("max_batch_size", int),
                      ("batch_wait_timeout_s", float), ("ddim_steps", int), ("max_ongoing_requests", int),
                      ("max_queued_requests", int), ("request_timeout_s", float)):
        if key in args:
            kwargs[key] = conv(args.pop(key))
    if args:
        raise ValueError(f"unknown application argument(s) {sorted(args)}")
    return build_app(**kwargs)
