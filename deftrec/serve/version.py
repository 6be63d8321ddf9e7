"""A served version: model, index and catalog, validated together and swapped as one object.

The Serve replicas hold exactly one :class:`ServedVersion` at a time and pin every batch to it:
the ids of a request are resolved, the query answered and the answer described (titles) by the
same version, so a swap can never pair a new index with an old catalog. Its parts must belong
together (:func:`check_version_parts`), otherwise it is refused before it is loaded.

A version is named by its content, not its folders: :func:`content_version` is the fingerprint of
the three artifacts' ids (their manifests' output checksums). The deployment's ``user_config``
carries that id as ``version`` next to the folders (``build_app`` fills it in at deploy time;
``python -m deftrec.serve.version RUN_DIR`` prints the whole ``user_config`` for a deploy file),
and a replica serves those folders only while they hold that content. So a model retrained or
re-indexed in place under an unchanged ``user_config`` is never picked up by some replicas only
(Serve calls no ``reconfigure`` for an unchanged ``user_config``, but starts new replicas from
the folders): a replica started after the rewrite refuses to start, naming both ids, while the
running ones keep serving the version the ``user_config`` names. Rolling the new content out is a
new ``version`` (a redeploy of ``build_app``, or the printed id in the deploy file): every replica
then swaps in place, or, if it refuses the new version, keeps serving its old one and reports the
refusal (:mod:`deftrec.serve.app`). The id is read again after loading, so a folder replaced while a replica
loads it is refused too, never half read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow.parquet as pq

from deftrec.core.artifacts import ArtifactError, artifact_id, artifact_version, fingerprint, read_manifest
from deftrec.serve.engine import Query, RecommenderEngine, ServingCatalog, UnknownId, history_key

__all__ = ["ServedVersion", "UnknownId", "VersionMismatch", "check_version_parts", "content_version"]


class VersionMismatch(ArtifactError):
    """The model, index and catalog of a version do not belong together."""


def check_version_parts(model_dir: str | Path, index_dir: str | Path, data_dir: str | Path,
                        catalog: ServingCatalog) -> None:
    """Raise :class:`VersionMismatch` naming every way the parts disagree.

    The index must be built for this model (its ``model_version``, which pins the model's whole
    content, item keys included) over as many items as the model has; the catalog must hold the
    model's items, by id and in order (the export keeps its own ``catalog.parquet``), and be the
    data artifact the model was trained on when the export records it (``inputs.data``).
    """
    mm, im = read_manifest(model_dir), read_manifest(index_dir)
    version, n = artifact_version(model_dir), mm.get("n_items")
    problems = []
    if im.get("model_version") not in (None, version):
        problems.append(f"the index was built for model {im.get('model_version')}, the model is {version}")
    if n is not None and im.get("items") is not None and int(im["items"]) != int(n):
        problems.append(f"the index holds {im['items']} items, the model {n}")
    if n is not None and catalog.n_items != int(n):
        problems.append(f"the catalog holds {catalog.n_items} items, the model {n}")
    elif (Path(model_dir) / "catalog.parquet").is_file():
        ids = [str(x) for x in pq.read_table(Path(model_dir) / "catalog.parquet").sort_by("item")
               .column("item_id").to_pylist()]
        diff = next((i for i, (a, b) in enumerate(zip(ids, catalog.item_ids)) if a != b), None)
        if diff is not None:
            problems.append(f"item {diff} is {catalog.item_ids[diff]!r} in the catalog, {ids[diff]!r} in the model")
    recorded = (mm.get("inputs") or {}).get("data")
    if recorded and recorded != artifact_id(data_dir):
        problems.append(f"the model was trained on data artifact {recorded}, the catalog is {artifact_id(data_dir)}")
    if problems:
        raise VersionMismatch(f"model {model_dir}, index {index_dir} and data {data_dir} do not belong together: "
                              + "; ".join(problems) + ". Nothing was swapped in.")


class ServedVersion:
    """Model + index (:class:`RecommenderEngine`) + catalog (:class:`ServingCatalog`) of one version."""

    def __init__(self, model_dir: str | Path, index_dir: str | Path, data_dir: str | Path,
                 loader: Optional[Callable] = None, ddim_steps: Optional[int] = None,
                 max_history: Optional[int] = None, expect: Optional[str] = None):
        """``expect``: the :func:`content_version` the folders must hold (else :class:`VersionMismatch`,
        before anything is loaded); None serves whatever they hold."""
        dirs = (model_dir, index_dir, data_dir)
        found = content_version(*dirs)
        if expect is not None and found != expect:
            raise VersionMismatch(
                f"{', '.join(map(str, dirs))} hold version {found}, not the version {expect} that the user_config "
                f"names: they were rewritten (retrained or re-indexed in place?). Nothing was loaded; to serve "
                f"their new content, set the user_config's version to {found}.")
        catalog = ServingCatalog(data_dir, max_history)
        check_version_parts(model_dir, index_dir, data_dir, catalog)  # before the (slow) model load
        self.engine = RecommenderEngine(model_dir, index_dir, loader=loader, ddim_steps=ddim_steps)
        if content_version(*dirs) != found:  # an export renamed into place mid-load: parts of two versions
            raise VersionMismatch(f"{', '.join(map(str, dirs))} changed while they were loaded (from version "
                                  f"{found}); nothing was swapped in, try again")
        self.catalog = catalog
        self.user_offset = len(catalog.user_index) + 1  # anonymous noise keys never collide with users
        self.version_id = found
        self.identity = (found, ddim_steps)  # what makes two versions the same: content + inference override

    @property
    def versions(self) -> dict:
        e = self.engine
        return {"version": self.version_id, "model_version": e.model_version, "index_version": e.index_version,
                "items": self.catalog.n_items}

    def query(self, req: Any) -> Query:
        """The :class:`Query` of a validated request (``user_id``, ``history``, ``k``,
        ``exclude_history``, ``explain``); raises :class:`UnknownId` for an id this catalog lacks."""
        cat = self.catalog
        user = cat.user(req.user_id) if req.user_id is not None else None
        # the model reads the whole history (its prompt the newest prompt.max_history items), as in
        # batch evaluation; exclusion covers all of it
        seen = cat.items(req.history) if req.history is not None else cat.seen_items(user)
        key = user if user is not None else history_key(seen[-cat.max_history:], self.user_offset)
        return Query(history=seen, key=key, user=user, k=min(req.k, cat.n_items),
                     exclude_history=req.exclude_history, explain=req.explain, exclude=seen)

    def describe(self, items: list[tuple[int, float]]) -> list[dict]:
        return [{**self.catalog.describe(i), "score": s} for i, s in items]

    def check(self) -> None:
        self.engine.check()


def content_version(model_dir: str | Path, index_dir: str | Path, data_dir: str | Path) -> str:
    """The id of the version these folders hold: their contents (their output checksums, so any
    rewrite is a new id, also one that keeps a declared ``version``) and the versions they declare
    (which the parts are matched by), never their paths."""
    return fingerprint({k: [artifact_id(d), artifact_version(d)]
                        for k, d in (("model", model_dir), ("index", index_dir), ("data", data_dir))})


def served_dirs(run_dir: str | Path, user_config: dict) -> list[str]:
    """The model, index and data folders a ``user_config`` names (each defaults to ``run_dir``'s)."""
    return [str(user_config.get(f"{k}_dir") or Path(run_dir) / k) for k in ("model", "index", "data")]


def main(argv: Optional[list[str]] = None) -> None:
    """Print the ``user_config`` that serves a run's current content (for a deploy file)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m deftrec.serve.version", description=main.__doc__)
    p.add_argument("run_dir")
    for k in ("model", "index", "data"):
        p.add_argument(f"--{k}-dir", help=f"default RUN_DIR/{k}")
    a = p.parse_args(argv)
    given = {f"{k}_dir": str(Path(v).resolve()) for k in ("model", "index", "data") if (v := getattr(a, f"{k}_dir"))}
    dirs = served_dirs(Path(a.run_dir).resolve(), given)
    print(json.dumps({"model_dir": dirs[0], "index_dir": dirs[1], "data_dir": dirs[2],
                      "version": content_version(*dirs)}, indent=2))


if __name__ == "__main__":
    main()
