"""DeftRec: the model and its training task (method.md sections 2-5).

Three classes, as in torchrec's retrieval example (the first two here):

- :class:`DeftRec` (``nn.Module``) holds the LLM (with its text tokenizer and placeholder ids), the
  item (and optional user) continuous tokenizer, the diffusion head, and the LightGCN matrices E
  (and U) as buffers. The item space (``item_space``) is E itself (``fixed``) or a trainable W
  initialised from it (:class:`ItemKeys`); it is the tokenizer's input, the diffusion target space
  and the retrieval space. It builds batches from item ids, splices continuous tokens into the LLM
  input and pools the condition.
- :class:`DeftRecTask` (``nn.Module`` wrapping the model, so DDP can wrap the task) computes

      L = lambda_lm * L_lm + L_pos + lambda_neg * L_neg + lambda_ce * L_ce

  (L_ce: full-catalog cross-entropy of the x0 estimate's scores) over the last position of every
  sample (``train.positions: last``) or every history position (``all``), and returns the parts.
- :class:`~deftrec.retrieval.recommender.DeftRecRecommender` (inference): prompts with continuous
  tokens -> greedy reasoning (only when the condition needs it or an explanation is asked for) ->
  condition -> reverse diffusion -> scores against E -> top-K, all batched.

Conditions (``cfg.condition``), with h the LLM's last hidden states and r the response tokens:

- ``prompt_state``: c = h[last prompt position]; causal attention means the response (and so the
  target) cannot leak into it, and no text is generated at inference;
- ``response_embeddings``: c = mean_{j in r} emb(token_j) (the authors' choice);
- ``hidden_states``: c = mean_{j in r} h_j;
- ``item_states``: c = h at the newest history item's last continuous token (and, for all-position
  training, at every history item's: the condition of the prefix ending there).

Retrieval space. With ``diffusion.x0_norm = "std"`` the diffusion works on E / std(E) (a global
scalar, see :class:`~deftrec.config.components.DiffusionConfig`); scores are reported in the original space:
``-||x0_hat / s - E_i||^2`` (``l2``) or ``<x0_hat / s, E_i>`` (``ip``), which rank exactly like the
scaled ones.

Randomness at inference is keyed by (seed, user, step) through a counter-based hash
(:func:`keyed_normal`), so a user's recommendations do not depend on which other users share its
batch, and a fixed seed gives identical output.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deftrec.config.model import DeftRecConfig
from deftrec.data.samples import ItemCatalog
from deftrec.model.diffusion import DiffusionHead
from deftrec.model.keyed_noise import keyed_normal
from deftrec.model.softmax import draw_negatives, mixed_sampling_probs, sampled_softmax_ce, uses_sampled_softmax
from deftrec.model.prompts import (
    IGNORE_INDEX,
    build_generation_batch,
    build_inputs_embeds,
    build_training_batch,
    earlier_item_bags,
)
from deftrec.model.tokenizer import ContinuousTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from deftrec.model.llm import PlaceholderIds

__all__ = ["DeftRec", "DeftRecTask", "ItemKeys", "keyed_normal"]

Histories = Sequence[Any]  # one int array / list of item ids per user


# --------------------------------------------------------------------------------------------- model


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _cache_kwarg(decoder: nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """mean over dim 1 of x [B, L, H] where mask [B, L] is 1; rows without any 1 give 0."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class ItemKeys(nn.Module):
    """The trainable item matrix W [n_items, d_c] (``item_space: trainable``).

    A module (not a bare parameter of :class:`DeftRec`) so that ZeRO-3 gathers it when it is used:
    DeepSpeed gathers a module's parameters around its forward, and DeftRec's own forward never runs.
    """

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())

    def forward(self) -> Tensor:
        return self.weight.clone()  # a copy: ZeRO-3 may release the gathered storage after forward


class DeftRec(nn.Module):
    """LLM + continuous tokenizer(s) + diffusion head over a collaborative item space.

    Args:
        cfg: the model config; ``d_llm`` is filled from the LLM here when unset.
        llm, text_tokenizer, placeholders: from :func:`deftrec.model.llm.build_llm`.
        item_emb: E [n_items, d_c] (LightGCN); user_emb: U [n_users, d_c], needed with user tokens.
        catalog: item titles/categories for the prompts (default: "item i" titles).
    """

    def __init__(
        self,
        cfg: DeftRecConfig,
        llm: PreTrainedModel,
        text_tokenizer: PreTrainedTokenizerBase,
        placeholders: PlaceholderIds,
        item_emb: np.ndarray | Tensor,
        user_emb: np.ndarray | Tensor | None = None,
        catalog: ItemCatalog | None = None,
    ) -> None:
        super().__init__()
        d_llm = llm.get_input_embeddings().embedding_dim
        if cfg.d_llm is not None and cfg.d_llm != d_llm:
            raise ValueError(f"config d_llm={cfg.d_llm} but the LLM hidden size is {d_llm}")
        self.cfg = cfg.with_d_llm(d_llm)
        E = torch.as_tensor(np.asarray(item_emb), dtype=torch.float32)
        if E.dim() != 2 or E.shape[1] != self.cfg.d_c:
            raise ValueError(f"item_emb must be [n_items, d_c={self.cfg.d_c}], got {tuple(E.shape)}")
        if self.cfg.tokenizer.needs_user_ids and user_emb is None:
            raise ValueError("tokenizer.user_tokens needs user_emb (the LightGCN user matrix)")
        self.catalog = catalog if catalog is not None else ItemCatalog.synthetic(E.shape[0])
        if self.catalog.n_items != E.shape[0]:
            raise ValueError(f"catalog has {self.catalog.n_items} items, item_emb {E.shape[0]}")
        if len(placeholders.item) < self.cfg.tokenizer.K:
            raise ValueError(f"the LLM has {len(placeholders.item)} item placeholders, tokenizer.K={self.cfg.tokenizer.K}")

        self.llm = llm
        self.text_tokenizer = text_tokenizer
        self.placeholders = placeholders
        self.item_tokenizer = ContinuousTokenizer(self.cfg.tokenizer_config())
        self.user_tokenizer = ContinuousTokenizer(self.cfg.tokenizer_config()) if self.cfg.tokenizer.user_tokens else None
        self.head = DiffusionHead(self.cfg.diffusion_config())

        def scale_of(x: Tensor) -> float:
            if self.cfg.diffusion.x0_norm == "none":
                return 1.0
            std = float(x.std())
            return 1.0 / std if std > 0 else 1.0

        # Buffers: the retrieval space travels with .to() and is saved in state dicts.
        self.register_buffer("item_emb", E)
        self.register_buffer("x0_scale", torch.tensor(scale_of(E)))
        # item_space=trainable: W, initialised from E in the diffusion space (E * x0_scale).
        self.item_keys = ItemKeys(E * self.x0_scale) if self.cfg.item_space == "trainable" else None
        if user_emb is not None:
            U = torch.as_tensor(np.asarray(user_emb), dtype=torch.float32)
            if U.dim() != 2 or U.shape[1] != self.cfg.d_c:
                raise ValueError(f"user_emb must be [n_users, d_c={self.cfg.d_c}], got {tuple(U.shape)}")
            self.register_buffer("user_emb", U)
            self.register_buffer("user_scale", torch.tensor(scale_of(U)))
        else:
            self.register_buffer("user_emb", None)
            self.register_buffer("user_scale", None)

    @classmethod
    def from_config(
        cls,
        cfg: DeftRecConfig,
        item_emb: np.ndarray | Tensor,
        user_emb: np.ndarray | Tensor | None = None,
        catalog: ItemCatalog | None = None,
    ) -> DeftRec:
        """Load the LLM named by ``cfg.llm`` (placeholders added, LoRA applied) and build the model."""
        from deftrec.model.llm import build_llm

        llm, tok, ph = build_llm(cfg.llm, K=cfg.tokenizer.K, user_tokens=cfg.tokenizer.user_tokens)
        return cls(cfg, llm, tok, ph, item_emb, user_emb, catalog)

    # -- properties
    @property
    def device(self) -> torch.device:
        return self.item_emb.device

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0])

    @property
    def x0_table(self) -> Tensor:
        """The item matrix in the diffusion space [n_items, d_c]: E * x0_scale, or the trainable W.

        It is what the continuous tokenizer reads, what the diffusion generates (without gradient
        into W) and, divided by x0_scale, what retrieval ranks (:attr:`retrieval_keys`)."""
        if self.item_keys is not None:
            return self.item_keys()
        return self.item_emb * self.x0_scale

    @property
    def retrieval_keys(self) -> Tensor:
        """The keys retrieval ranks against, in the item space [n_items, d_c]: E, or W / x0_scale."""
        if self.item_keys is None:
            return self.item_emb
        return self.item_keys() / self.x0_scale

    @property
    def decoder(self) -> nn.Module:
        """The LLM's decoder stack (hidden states only; LoRA layers are injected in place)."""
        return self.llm.get_decoder()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into the LLM and the heads (tokenizers + diffusion)."""
        llm = [p for p in self.llm.parameters() if p.requires_grad]
        heads = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("llm.")]
        return {"llm": llm, "heads": heads}

    # -- batches
    def _titles(self, histories: Histories) -> tuple[list[list[str]], list[list[int]]]:
        max_h = self.cfg.prompt.max_history
        items = [np.asarray(h, dtype=np.int64).reshape(-1)[-max_h:] for h in histories]
        titles = self.catalog.titles
        return [titles[i].tolist() for i in items], [i.tolist() for i in items]

    def make_batch(
        self,
        histories: Histories,
        targets: Sequence[int] | np.ndarray | None = None,
        users: Sequence[int] | np.ndarray | None = None,
        generation: bool = False,
    ) -> dict[str, Tensor]:
        """Tokenised batch from item ids: training (``targets`` given, right padding, labels) or
        generation (left padding, prompt only). Adds ``targets`` / ``users`` LongTensors when given.
        """
        if len(histories) == 0:
            raise ValueError("empty batch")
        titles, items = self._titles(histories)
        if generation:
            batch = build_generation_batch(self.text_tokenizer, self.placeholders, titles, self.cfg.prompt, items)
        else:
            if targets is None:
                raise ValueError("a training batch needs targets (or pass generation=True)")
            t = np.asarray(targets, dtype=np.int64).reshape(-1)
            if t.size != len(histories):
                raise ValueError(f"got {t.size} targets for {len(histories)} histories")
            batch = build_training_batch(self.text_tokenizer, self.placeholders, titles,
                                         self.catalog.titles[t].tolist(), self.catalog.categories[t].tolist(),
                                         self.cfg.prompt, items)
        if "history_item_ids" not in batch:  # every history empty
            batch["history_item_ids"] = torch.zeros(0, dtype=torch.long)
        if targets is not None:
            batch["targets"] = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(-1))
        if users is not None:
            batch["users"] = torch.as_tensor(np.asarray(users, dtype=np.int64).reshape(-1))
        if self.cfg.tokenizer.needs_user_ids and "users" not in batch:
            raise ValueError("tokenizer.user_tokens is on: pass users")
        if self.cfg.tokenizer.reads_earlier_items:
            batch.update(earlier_item_bags(histories, self.cfg.prompt.max_history))
        return batch

    # -- forward pieces
    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """LLM input embeddings with continuous tokens spliced in (one index_put per batch)."""
        table = self.x0_table
        item_tokens = self.item_tokenizer(table[batch["history_item_ids"].to(self.device)])
        user_tokens = None
        if self.cfg.tokenizer.reads_earlier_items:  # the mean of the earlier items' rows (none: zero)
            user_tokens = self.user_tokenizer(F.embedding_bag(batch["earlier_item_ids"].to(self.device), table,
                                                              batch["earlier_offsets"].to(self.device), mode="mean"))
        elif self.user_tokenizer is not None:
            user_tokens = self.user_tokenizer(self.user_emb[batch["users"].to(self.device)] * self.user_scale)
        return build_inputs_embeds(self.llm.get_input_embeddings(), batch, item_tokens, user_tokens)

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(input embeddings [B, L, H], last hidden states [B, L, H]) of a batch."""
        batch = _to_device(batch, self.device)
        embeds = self.embed(batch)
        decoder_in = F.dropout(embeds, self.cfg.llm.dropout, self.training) if self.cfg.llm.dropout else embeds
        out = self.decoder(inputs_embeds=decoder_in, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False)
        return embeds, out.last_hidden_state

    def lm_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the response tokens (labels != -100), next-token shifted.

        The LM head runs only on the positions that predict a response token, so the [B, L, V]
        logits tensor is never materialised.
        """
        labels = labels.to(hidden.device)
        tgt = labels[:, 1:]
        sel = tgt != IGNORE_INDEX
        if not bool(sel.any()):
            return hidden.new_zeros((), dtype=torch.float32)
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][sel])
        return F.cross_entropy(logits.float(), tgt[sel])

    def item_states(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """h at the last continuous token of every history item [N_items, d_llm] (float32), in the
        batch's flat item order. A causal LLM's state there has read the prompt's lead-in and items
        1..j of the sample, nothing after: the condition of the prefix that ends with item j."""
        slots = self.cfg.prompt.slots
        last = batch["placeholder_branch"].to(hidden.device) == slots - 1
        positions = batch["placeholder_positions"].to(hidden.device)[last]
        return hidden.reshape(-1, hidden.shape[-1])[positions].float()

    def last_item_states(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """The ``item_states`` condition of each sample [B, d_llm]: the state after its newest history
        item; a sample without history items falls back to its last prompt position."""
        dev = hidden.device
        B = hidden.shape[0]
        rows = torch.arange(B, device=dev)
        fallback = hidden[rows, batch["prompt_last_index"].to(dev)].float()
        lengths = batch["history_lengths"].to(dev)
        if int(lengths.sum()) == 0:
            return fallback
        states = self.item_states(batch, hidden)
        last = (torch.cumsum(lengths, 0) - 1).clamp(min=0)
        return torch.where((lengths > 0)[:, None], states[last], fallback)

    def condition(self, batch: dict[str, Tensor], embeds: Tensor | None = None, hidden: Tensor | None = None,
                  kind: str | None = None) -> Tensor:
        """Condition vectors [B, d_llm] (float32) of a *training* batch (prompt + response).

        ``prompt_state`` reads h at ``prompt_last_index``; ``item_states`` at the newest history item's
        last continuous token; the other two pool over ``response_mask``.
        Pass ``embeds``/``hidden`` from :meth:`encode` to avoid a second forward.
        """
        kind = kind or self.cfg.condition
        if embeds is None or (hidden is None and kind != "response_embeddings"):
            embeds, hidden = self.encode(batch)
        dev = embeds.device
        if kind == "item_states":
            return self.last_item_states(batch, hidden)
        if kind == "prompt_state":
            rows = torch.arange(hidden.shape[0], device=dev)
            return hidden[rows, batch["prompt_last_index"].to(dev)].float()
        if "response_mask" not in batch:
            raise ValueError(f"condition {kind!r} pools response tokens: use a training batch, or the recommender")
        mask = batch["response_mask"].to(dev)
        if kind == "response_embeddings":
            return _masked_mean(embeds.float(), mask)
        if kind == "hidden_states":
            return _masked_mean(hidden.float(), mask)
        raise ValueError(f"unknown condition {kind!r}")


# --------------------------------------------------------------------------------------------- task


class DeftRecTask(nn.Module):
    """Training objective around a :class:`DeftRec` (wrap this module in DDP, not the model).

    L = lambda_lm * L_lm + L_pos + lambda_neg * L_neg, where L_pos/L_neg come from
    :meth:`DiffusionHead.loss` with x0 = E_s[target] and x0- the mean of ``n_neg`` uniformly drawn
    items other than the target (:meth:`DiffusionHead.sample_negative_mean`); with
    ``diffusion.batch_mul = R`` they average R independent draws per sample. With lambda_lm = 0
    the LM head is skipped entirely (only possible with the ``prompt_state`` condition).
    """

    def __init__(self, model: DeftRec, lambda_lm: float | None = None, item_counts: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.lambda_lm = float(model.cfg.train.lambda_lm if lambda_lm is None else lambda_lm)
        if self.lambda_lm < 0:
            raise ValueError(f"lambda_lm must be >= 0, got {self.lambda_lm}")
        # the sampled cross-entropy's draw probabilities (diffusion.ce_negative_sampler "mixed"); not saved
        probs = None
        if model.cfg.diffusion.ce_negative_sampler == "mixed":
            if item_counts is None:
                raise ValueError("diffusion.ce_negative_sampler=mixed needs the items' training counts")
            probs = mixed_sampling_probs(torch.as_tensor(item_counts))
        self.register_buffer("ce_neg_probs", probs, persistent=False)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Returns {"lm", "pos", "neg", "ce", "total"} (scalars; only "total" needs backward)."""
        m = self.model
        if "targets" not in batch or "labels" not in batch:
            raise ValueError("DeftRecTask needs a training batch (make_batch with targets)")
        embeds, hidden = m.encode(batch)
        lm = m.lm_loss(hidden, batch["labels"]) if self.lambda_lm > 0 else hidden.new_zeros((), dtype=torch.float32)
        if m.cfg.train.positions == "all":
            cond, targets = m.item_states(batch, hidden), self.next_items(batch).to(m.device)
        else:
            cond, targets = m.condition(batch, embeds, hidden), batch["targets"].to(m.device)
        R = m.cfg.diffusion.batch_mul
        if R > 1:  # R independent diffusion draws per condition (one LLM pass)
            cond, targets = cond.repeat(R, 1), targets.repeat(R)
        table = m.x0_table  # W (with gradient: tokens and scores train it) or the fixed E * scale
        fixed = table.detach()  # diffusion targets: the MSE must not shrink the space
        neg_x0 = None
        if m.head.cfg.lambda_neg > 0:
            neg_x0 = m.head.sample_negative_mean(fixed, targets.shape[0], exclude=targets, generator=generator)
        d = m.head.loss(fixed[targets], cond, neg_x0, generator=generator)
        if m.head.cfg.lambda_ce > 0 and m.head.cfg.ce_on == "generated":
            ce = self.catalog_ce(m.head.generated_x0(cond, generator), table, targets, generator)
        else:
            ce = self.catalog_ce(d["x0_hat"], table, targets, generator)
        total = self.lambda_lm * lm + d["loss"] + m.head.cfg.lambda_ce * ce
        return {"lm": lm, "pos": d["pos"], "neg": d["neg"], "ce": ce, "total": total}

    @staticmethod
    def next_items(batch: dict[str, Tensor]) -> Tensor:
        """The item after every history item of a batch [N_items] (flat item order): the next history
        item of the same sample, or the sample's target after its newest one."""
        items = batch["history_item_ids"]
        sample = batch["item_sample_index"]
        n = items.shape[0]
        last = torch.ones(n, dtype=torch.bool)
        if n > 1:
            last[:-1] = sample[1:] != sample[:-1]
        return torch.where(last, batch["targets"][sample], torch.roll(items, -1))

    def catalog_ce(self, x0_hat: Tensor, table: Tensor, targets: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
        """Catalog cross-entropy of the x0 estimates' scores (``eval.score``'s rule, in the diffusion
        space) over ``diffusion.ce_temperature``, and with ``ce_scale: normalised`` over the mean squared
        norm of the item matrix times a learned gain: over the full catalog, or against
        ``diffusion.ce_negatives`` sampled items (:mod:`deftrec.model.softmax`); 0 (and no work) when
        lambda_ce is 0."""
        head = self.model.head
        cfg = head.cfg
        if cfg.lambda_ce == 0:
            return x0_hat.new_zeros((), dtype=torch.float32)
        q, keys = x0_hat.float(), table.float()
        l2 = self.model.cfg.eval.score == "l2"  # -||q - k||^2 up to the per-row constant -||q||^2
        factor = 1.0 / cfg.ce_temperature
        if head.ce_log_gain is not None:  # scores are squared-norm sized: divide the scale out, learn the gain
            factor = factor * head.ce_log_gain.float().exp() / keys.pow(2).sum(1).mean().detach().clamp_min(1e-12)
        if not uses_sampled_softmax(cfg.ce_negatives, keys.shape[0]):
            scores = q @ keys.T
            if l2:
                scores = 2.0 * scores - keys.pow(2).sum(1)[None, :]
            return F.cross_entropy(scores * factor, targets)
        probs = None if self.ce_neg_probs is None else self.ce_neg_probs.float()
        neg_ids, neg_log_q = draw_negatives(keys.shape[0], cfg.ce_negatives, q.device, generator, probs)
        pos_keys, neg_keys = keys[targets], keys[neg_ids]
        pos, neg = (q * pos_keys).sum(1), q @ neg_keys.T
        if l2:
            pos, neg = 2.0 * pos - pos_keys.pow(2).sum(1), 2.0 * neg - neg_keys.pow(2).sum(1)[None, :]
        return sampled_softmax_ce(pos * factor, neg * factor, targets, neg_ids, neg_log_q, probs)
