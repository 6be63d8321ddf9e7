"""Serving export of a trained DeftRec: a self-contained directory that loads without DeepSpeed or Ray.

Layout (``RUN_DIR/model``)::

    llm/                      the LLM with LoRA merged into its weights (``save_pretrained``,
                              safetensors) and the text tokenizer with the placeholder tokens
    tokenizers.safetensors    item (``item.*``) and user (``user.*``) continuous tokenizers
    diffusion_head.safetensors
    collab.safetensors        E (``item_emb``), U (``user_emb``), their x0 scales and the retrieval
                              keys (``item_keys``: E, or the trained W / x0_scale)
    catalog.parquet           item, item_id, title, category (prompts need the titles)
    placeholders.json         token ids of <diff>, </diff>, <collab_k>, <user_collab_k>
    config.json               the DeftRecConfig (``llm`` points at ``llm/``; ``source_llm`` keeps
                              the original reference)
    manifest.json             written last: status, checksums of every file, provenance

The directory is built under a temporary name and renamed into place once the manifest is
complete (:func:`deftrec.core.artifacts.atomic_directory`), so an interrupted export is never mistaken for a
finished one; :func:`load_model` refuses a directory without a complete manifest.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.core.artifacts import (
    ArtifactError,
    atomic_directory,
    finish_manifest,
    read_manifest,
    require_files,
    verify_outputs,
)
from deftrec.core.config import from_dict, to_dict

if TYPE_CHECKING:
    from deftrec.data.samples import ItemCatalog
    from deftrec.model.deftrec import DeftRec
from typing import TYPE_CHECKING

if TYPE_CHECKING:

    from deftrec.data.samples import ItemCatalog
    from deftrec.model.deftrec import DeftRec

__all__ = ["EXPORT_FORMAT", "export_checkpoint", "export_model", "load_model"]

#: Bumped when the layout changes; load_model refuses other versions.
EXPORT_FORMAT = 1
#: Files of a training checkpoint that the export reads (deftrec.training.checkpoint writes them).
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
_FILES = ("tokenizers.safetensors", "diffusion_head.safetensors", "collab.safetensors", "catalog.parquet",
          "placeholders.json", "config.json")


def _state(module: torch.nn.Module | None, prefix: str) -> dict[str, torch.Tensor]:
    if module is None:
        return {}
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _merged_llm(model: DeftRec) -> torch.nn.Module:
    """A copy of the LLM with LoRA adapters merged (the live model is left untouched)."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):  # peft model
        return copy.deepcopy(llm).merge_and_unload()
    return llm


def _catalog_table(catalog: ItemCatalog):
    import pyarrow as pa

    n = catalog.n_items
    return pa.table({"item": pa.array(np.arange(n, dtype=np.int64)),
                     "item_id": pa.array([str(x) for x in catalog.item_ids], pa.string()),
                     "title": pa.array([str(x) for x in catalog.titles], pa.string()),
                     "category": pa.array([str(x) for x in catalog.categories], pa.string())})


def export_model(model: DeftRec, out_dir: str | Path, extra: dict[str, Any] | None = None,
                 overwrite: bool = True) -> dict:
    """Write ``model`` to ``out_dir`` in the serving layout (atomic); returns the manifest."""
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    cfg = model.cfg
    ph = model.placeholders
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        llm = _merged_llm(model)
        llm.save_pretrained(tmp / "llm", safe_serialization=True)
        model.text_tokenizer.save_pretrained(tmp / "llm")
        save_file({**_state(model.item_tokenizer, "item."), **_state(model.user_tokenizer, "user.")},
                  str(tmp / "tokenizers.safetensors"))
        save_file(_state(model.head, ""), str(tmp / "diffusion_head.safetensors"))
        # item_keys: what retrieval ranks against (E, or the trained W in the item space)
        collab = {"item_emb": model.item_emb, "x0_scale": model.x0_scale,
                  "item_keys": model.retrieval_keys.detach().clone()}  # E itself when fixed: its own copy
        if model.user_emb is not None:
            collab.update(user_emb=model.user_emb, user_scale=model.user_scale)
        save_file({k: v.detach().cpu().contiguous() for k, v in collab.items()}, str(tmp / "collab.safetensors"))
        pq.write_table(_catalog_table(model.catalog), tmp / "catalog.parquet")
        (tmp / "placeholders.json").write_text(json.dumps(
            {"diff_open": ph.diff_open, "diff_close": ph.diff_close, "item": list(ph.item), "user": list(ph.user)}))
        d = to_dict(cfg)
        source_llm = dict(d["llm"])
        d["llm"].update(name_or_path="llm", lora=False, cache_dir=None)  # relative: resolved by load_model
        d["source_llm"] = source_llm
        (tmp / "config.json").write_text(json.dumps(d, indent=2, default=str))
        dtype = str(next(llm.parameters()).dtype).replace("torch.", "")
        manifest = finish_manifest(tmp, {"artifact": "deftrec-model", "format": EXPORT_FORMAT,
                                         "llm_dtype": dtype, "n_items": model.n_items, **(extra or {})})
    return manifest


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, catalog: ItemCatalog,
                      extra: dict[str, Any] | None = None, item_emb: np.ndarray | None = None,
                      user_emb: np.ndarray | None = None) -> dict:
    """Export a training checkpoint of :mod:`deftrec.training` (consolidated weights + state).

    Rebuilds the model from the checkpoint's config (the base LLM named there must be loadable),
    loads the consolidated weights and writes the serving layout. Needs neither DeepSpeed nor Ray.
    ``item_emb`` / ``user_emb``: the float32 LightGCN matrices; the checkpoint holds E and U in the
    training precision (bf16 on GPUs), which would otherwise become the retrieval space.
    """
    from safetensors.torch import load_file

    from deftrec.model.deftrec import DeftRec

    ckpt = Path(checkpoint_dir)
    if not (ckpt / STATE_FILE).is_file() or not (ckpt / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"{ckpt}: not a DeftRec training checkpoint ({STATE_FILE} and {WEIGHTS_FILE} expected)")
    state = json.loads((ckpt / STATE_FILE).read_text())
    cfg = from_dict(DeftRecConfig, dict(state["config"]), "config")
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    exact = item_emb is not None
    E = torch.as_tensor(item_emb) if exact else weights["item_emb"].float()
    U = weights["user_emb"].float() if "user_emb" in weights else None
    if exact and U is not None and user_emb is not None:
        U = torch.as_tensor(user_emb)
    if E.shape != weights["item_emb"].shape:
        raise ValueError(f"item_emb {tuple(E.shape)} does not match the checkpoint's "
                         f"{tuple(weights['item_emb'].shape)}")
    with torch.random.fork_rng(devices=[]):  # same construction as training, caller's RNG untouched
        torch.manual_seed(cfg.train.seed)
        model = DeftRec.from_config(cfg, E, U, catalog)
    load_consolidated(model, weights)
    if not exact:  # with the float32 matrices DeftRec recomputes the scales exactly as training did
        for name in ("x0_scale", "user_scale"):
            if name in weights and getattr(model, name) is not None:
                getattr(model, name).copy_(weights[name])
    model.eval()
    info = {"step": state.get("step"), "best_step": state.get("best_step"), **(extra or {})}
    return export_model(model, out_dir, extra=info)


def retrieval_metric(path: str | Path) -> str:
    """The export's ranking rule (its ``eval.score``: ``l2`` or ``ip``), which the index must share."""
    root = Path(path)
    read_manifest(root, files=("config.json",))
    return json.loads((root / "config.json").read_text())["eval"]["score"]


def load_item_keys(path: str | Path) -> np.ndarray:
    """The export's retrieval keys [n_items, d_c] (float32): LightGCN's E, or the trained W.

    Reads ``collab.safetensors`` only: no LLM, no torch model is built.
    """
    from safetensors.numpy import load_file as load_numpy

    root = Path(path)
    read_manifest(root, files=("collab.safetensors",))
    tensors = load_numpy(str(root / "collab.safetensors"))
    return np.ascontiguousarray(tensors.get("item_keys", tensors["item_emb"]), dtype=np.float32)


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = False) -> DeftRec:
    """Load an export as a :class:`DeftRec` in eval mode (no DeepSpeed, no Ray).

    ``verify=True`` re-hashes every file against the manifest first (slow for large LLMs).
    Raises ArtifactError for a missing, unfinished or inconsistent directory.
    """
    import pyarrow.parquet as pq
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deftrec.data.samples import ItemCatalog
    from deftrec.model.deftrec import DeftRec
    from deftrec.model.llm import PlaceholderIds, torch_dtype

    root = Path(path)
    manifest = read_manifest(root)  # raises unless the export finished
    if manifest.get("artifact") != "deftrec-model" or manifest.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{root}: not a DeftRec export of format {EXPORT_FORMAT} "
                            f"(artifact={manifest.get('artifact')!r}, format={manifest.get('format')!r})")
    require_files(root, _FILES + ("llm/",))
    if verify:
        verify_outputs(root)
    d = json.loads((root / "config.json").read_text())
    d.pop("source_llm", None)
    d["llm"]["name_or_path"] = str(root / "llm")
    cfg = from_dict(DeftRecConfig, d, "config")
    llm = AutoModelForCausalLM.from_pretrained(str(root / "llm"), dtype=torch_dtype(cfg.llm))
    tok = AutoTokenizer.from_pretrained(str(root / "llm"))
    p = json.loads((root / "placeholders.json").read_text())
    ph = PlaceholderIds(diff_open=p["diff_open"], diff_close=p["diff_close"], item=tuple(p["item"]),
                        user=tuple(p["user"]))
    from deftrec.model.llm import DIFF_CLOSE, DIFF_OPEN, item_placeholder

    expected = [DIFF_OPEN, DIFF_CLOSE] + [item_placeholder(k) for k in range(len(ph.item))]
    if tok.convert_tokens_to_ids(expected) != [ph.diff_open, ph.diff_close, *ph.item]:
        raise ArtifactError(f"{root}: the saved tokenizer's placeholder ids disagree with placeholders.json")
    collab = load_file(str(root / "collab.safetensors"))
    catalog = ItemCatalog.from_table(pq.read_table(root / "catalog.parquet"))
    model = DeftRec(cfg, llm, tok, ph, collab["item_emb"], collab.get("user_emb"), catalog)
    toks = load_file(str(root / "tokenizers.safetensors"))
    model.item_tokenizer.load_state_dict({k[5:]: v for k, v in toks.items() if k.startswith("item.")})
    if model.user_tokenizer is not None:
        model.user_tokenizer.load_state_dict({k[5:]: v for k, v in toks.items() if k.startswith("user.")})
    model.head.load_state_dict(load_file(str(root / "diffusion_head.safetensors")))
    with torch.no_grad():
        model.x0_scale.copy_(collab["x0_scale"])
        if model.user_scale is not None and "user_scale" in collab:
            model.user_scale.copy_(collab["user_scale"])
        if model.item_keys is not None:  # W in the diffusion space
            model.item_keys.weight.copy_(collab["item_keys"] * collab["x0_scale"])
    return model.to(torch.device(device)).eval()


_ROWS_PREFIX = "_added_rows."


_BUFFERS = ("item_emb", "x0_scale", "user_emb", "user_scale")


def _frozen_embedding_weights(model: DeftRec) -> dict[str, torch.nn.Parameter]:
    """Frozen input/output embedding matrices: their placeholder rows are randomly initialised
    (mean resizing) and are not reproducible from the base model, so checkpoints carry them."""
    out = {}
    for kind, module in (("input", model.llm.get_input_embeddings()), ("output", model.llm.get_output_embeddings())):
        if module is not None and not module.weight.requires_grad:
            out[kind] = module.weight
    return out


def load_consolidated(model: DeftRec, weights: dict[str, torch.Tensor], trainable: bool = True) -> None:
    """Load :func:`consolidated_state` output into a (not yet DeepSpeed-wrapped) model.

    Always restores the placeholder rows of frozen embeddings; ``trainable=False`` skips the
    trainable weights (when DeepSpeed's own checkpoint restores them). Raises on unknown names.
    """
    ids = weights.get(f"{_ROWS_PREFIX}ids")
    frozen = _frozen_embedding_weights(model)
    with torch.no_grad():
        for kind, w in frozen.items():
            rows = weights.get(f"{_ROWS_PREFIX}{kind}")
            if rows is not None and ids is not None:
                w[ids.to(w.device)] = rows.to(device=w.device, dtype=w.dtype)
    if not trainable:
        return
    state = {k: v for k, v in weights.items() if not k.startswith(_ROWS_PREFIX) and k not in _BUFFERS}
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"checkpoint weights do not match the model: unknown {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            p = params[k]
            if p.shape != v.shape:
                raise ValueError(f"checkpoint weight {k} has shape {tuple(v.shape)}, the model {tuple(p.shape)}")
            p.copy_(v.to(device=p.device, dtype=p.dtype))
