"""Ray Serve application: FastAPI ingress + a batching recommender.

    serve run deftrec.serve:app run_dir=runs/tiny          # or DEFTREC_RUN_DIR=runs/tiny serve run deftrec.serve:app
    serve run deftrec.serve:app run_dir=runs/tiny topology=fused
    serve deploy cluster/serve_config.yaml                 # production

Routes: ``POST /recommend``, ``GET /items/{item_id}``, ``GET /healthz``, ``GET /openapi.json``
(docs at ``/docs``). The recommender runs generation/sampling once per ``@serve.batch`` batch.
Requests with ``explain`` wait in a queue and batch of their own: text generation is the slow
part, and a batch that runs it never holds a request that did not ask for it (``timings_ms``
reports ``texts_generated`` per batch).

A served version is one validated unit of model, index and catalog
(:class:`~deftrec.serve.version.ServedVersion`): a new one is named by ``user_config``
(``model_dir``, ``index_dir``, ``data_dir`` and ``version``, the content id of the three, which
:func:`build_app` fills in at deploy time) -> ``reconfigure``, refused with the reason when its
parts do not belong together or the folders no longer hold that content (rewritten in place: see
:mod:`deftrec.serve.version`), and swapped in whole after it has loaded and passed a warm-up, so
requests in flight finish on the old version and none fail. A replica that already serves a
version keeps serving it when it refuses an update: the refusal is logged (warning) and
``/healthz`` reports it next to the served version (``refused_version``, ``refused_reason``) until
a ``user_config`` it accepts arrives. Serve then counts the update as applied, so a replica that
starts later (scale-up, restart) gets the refused ``user_config`` and, having no version to keep,
refuses to start with that reason (the deployment's status shows it), as any replica does on
its first ``user_config``. (Running replicas get an update only from a config deploy, ``serve
deploy``, that changes just the ``user_config``; ``serve run``, or ``serve.run`` in Python, starts
new replicas for every deploy, so there a refused one is a replica that does not start.) The
recommender resolves the ids of a request and describes the answer with the version of its batch;
the ingress holds no catalog.

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
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI, HTTPException, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from deftrec.core.artifacts import ArtifactError
from deftrec.serve.engine import Query, UnknownId
from deftrec.serve.version import ServedVersion, content_version, served_dirs
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

#: Serve's own logger: its records go to the replica's log, tagged with the replica.
log = logging.getLogger("ray.serve")

# max_body_size: FastAPI refuses larger bodies with 413 while reading them (chunked ones too),
# without the per-request cost of a BaseHTTPMiddleware.
api = FastAPI(title="DeftRec recommendations", version="1", max_body_size=MAX_BODY_BYTES,
              description="Generative recommendation with continuous-token diffusion (DeftRec).")


TOPOLOGIES = ("split", "fused")
OVERLOADED = {"description": "overloaded: retry after the Retry-After seconds"}


class BatchedRecommender:
    """Holds one :class:`~deftrec.serve.version.ServedVersion` (model + index + catalog). Batches
    concurrent requests; swaps versions in reconfigure.

    The body of the ``Recommender`` deployment (split topology), or held in-process by the
    ingress (fused topology). ``wait_for_config``: load nothing until the first ``reconfigure``
    (Serve calls it right after construction when the deployment has a ``user_config``), so a
    replica never loads ``run_dir``'s version only to replace it; otherwise load ``run_dir``'s.
    ``require_version``: refuse a ``user_config`` without ``version`` (every Serve deployment:
    the folders alone do not say which content the other replicas serve).
    """

    def __init__(self, run_dir: str, loader: Optional[Callable] = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01, ddim_steps: Optional[int] = None,
                 max_history: Optional[int] = None, wait_for_config: bool = False, require_version: bool = False):
        self.run_dir = Path(run_dir)
        self.loader = loader
        self.ddim_steps = ddim_steps
        self.max_history = max_history
        self.require_version = require_version
        self.current: Optional[ServedVersion] = None
        #: the last refused update while a version was served: {"refused_version", "refused_reason"}
        self.refused: Optional[dict] = None
        for batched in (self.recommend_batch, self.explain_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        if not wait_for_config:
            self.reconfigure({})

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {"model_dir", "index_dir", "data_dir", "version", "ddim_steps"} (the folders
        default to the run directory's; ``version``, their :func:`~deftrec.serve.version.content_version`,
        to what they hold now unless ``require_version``). A version other than the served one is
        loaded only if the folders hold that content, validated as one unit
        (:func:`~deftrec.serve.version.check_version_parts`), warmed up, then swapped in.

        A refused user_config (its folders do not hold the named content, its parts do not belong
        together, it names no version, the load or warm-up fails) raises only while no version is
        served (a starting replica: it refuses to start, with the reason). A replica that serves a
        version keeps serving it and does not raise (Serve stops a replica whose reconfigure raises):
        it logs a warning and records the refusal for ``/healthz`` (:meth:`health`) until a
        user_config it accepts (a new version, or the served one again) clears it."""
        try:
            self._swap(user_config)
        except Exception as e:
            if self.current is None:
                raise
            named = user_config.get("version")
            reason = str(e) if isinstance(e, (ArtifactError, ValueError)) else f"{type(e).__name__}: {e}"
            self.refused = {"refused_version": None if named is None else str(named), "refused_reason": reason}
            log.warning("refused the user_config update to version %s, still serving version %s: %s",
                        named, self.current.version_id, reason,
                        exc_info=not isinstance(e, (ArtifactError, ValueError)))
        else:
            self.refused = None

    def _swap(self, user_config: dict) -> None:
        """:meth:`reconfigure`'s work: raises for a refused user_config, leaving ``current`` as it was."""
        dirs = served_dirs(self.run_dir, user_config)
        ddim_steps = user_config["ddim_steps"] if "ddim_steps" in user_config else self.ddim_steps
        want = user_config.get("version")
        if want is None and self.require_version:
            raise ValueError(f"the user_config names no version, so the content of {', '.join(dirs)} is not "
                             f"pinned: add \"version\": \"{content_version(*dirs)}\" (what they hold now; "
                             "python -m deftrec.serve.version prints the whole user_config)")
        want = str(want) if want is not None else content_version(*dirs)
        if self.current is not None and (want, ddim_steps) == self.current.identity:
            return  # the served content, whatever the folders hold now
        version = ServedVersion(*dirs, loader=self.loader, ddim_steps=ddim_steps, max_history=self.max_history,
                                expect=want)
        version.check()  # warm-up: the first real request should not pay for lazy initialisation
        # one assignment: batches in flight keep the version they started with
        self.current, self.ddim_steps = version, ddim_steps

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")
        self.current.check()

    def versions(self) -> dict:
        return self.current.versions

    def health(self) -> dict:
        """The :class:`~deftrec.serve.schemas.Health` fields: the served version's ids and the last
        refused update (None when the last user_config was accepted)."""
        refused = self.refused or {"refused_version": None, "refused_reason": None}
        return {"status": "ok", **self.versions(), **refused}

    def item(self, item_id: str) -> dict:
        """The served catalog's entry for ``item_id``, or ``{"status": 404, "detail"}``."""
        cat = self.current.catalog
        try:
            return cat.describe(int(cat.items([item_id])[0]))
        except UnknownId as e:
            return {"status": 404, "detail": str(e)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> list[dict]:
        return await self._answer(requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def explain_batch(self, requests: list[RecommendRequest]) -> list[dict]:
        return await self._answer(requests)

    async def recommend(self, req: RecommendRequest) -> dict:
        # Two queues: one explain request would otherwise make its whole batch generate text.
        return await (self.explain_batch if req.explain else self.recommend_batch)(req)

    async def _answer(self, requests: list[RecommendRequest]) -> list[dict]:
        """Per request of one batch: the described answer, or ``{"status", "detail"}`` for one this
        version cannot answer (404 unknown id, 422 an anonymous history to a user-token model); the
        others in the batch are served. Ids, model, index and titles all come from one pinned version."""
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
        400: {"description": "a body that is not text (FastAPI cannot decode it)"},
        404: {"description": "unknown id"},
        413: {"description": f"body over {MAX_BODY_BYTES // 1024} KiB"},
        422: {"description": "invalid request, or a history without user_id for a model with user tokens"},
        503: OVERLOADED})
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

    @api.get("/items/{item_id}", response_model=Item,
             responses={404: {"description": "unknown item"}, 503: OVERLOADED})
    async def item(self, item_id: str) -> Item:
        async def here() -> dict:
            return self.local.item(item_id)

        res = await self._bounded(here, lambda: self.recommender.item.remote(item_id))
        if "status" in res:
            raise HTTPException(status_code=res["status"], detail=res["detail"])
        return Item(**res)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        h = self.local.health() if self.local is not None else await self.recommender.health.remote()
        return Health(**h)

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
    Ingress (fused); its ``version`` defaults to the content its folders hold now (pinned here).
    ``ingress_cpus`` is the split topology's ingress reservation.
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
    # The content is pinned now, at deploy time: a replica started later (autoscaling, a restart)
    # serves it or refuses, even when the folders were rewritten in between; a redeploy re-pins and
    # only changes the user_config, so every replica swaps in place.
    user_config = dict(user_config or {})
    if "version" not in user_config:
        user_config["version"] = content_version(*served_dirs(run_dir, user_config))
    model_opts["user_config"] = user_config
    # each replica loads only its user_config's version (reconfigure, right after construction)
    batching = dict(loader=loader, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                    ddim_steps=ddim_steps, wait_for_config=True, require_version=True)
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
