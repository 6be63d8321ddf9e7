"""Synthetic interaction logs with planted structure: the project's embedded default dataset.

What is planted (so that models have something real to learn):
- named categories with readable item titles ("Velvet Harbor Blues 12" in "Blues");
- every user has a primary and a secondary category; the secondary one drifts over time;
- item-to-item transitions: each item has 3 fixed successors (mostly in its own category);
  with probability ``p_transition`` the next interaction follows one of them. A last-item model
  therefore beats popularity by a wide margin, and a model that also knows the user's categories
  does better still.
- Zipf popularity inside each category, a few exact duplicate rows and timestamp ties (to exercise
  de-duplication and stable ordering), ratings 1-5.

Generation is vectorised over chunks of users and streams to CSV, so memory stays bounded for
tens of millions of rows. Output is a deterministic function of the config (seed included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from deftrec.config.data import SYNTH_CATEGORIES, SynthConfig
from deftrec.core.artifacts import atomic_directory, finish_manifest, stage_fingerprint
from deftrec.core.config import to_dict

CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    # category: (adjectives, nouns) — small word lists make titles readable and category-typical
    "Jazz": (["Blue", "Smoky", "Late", "Velvet", "Cool", "Swing"], ["Quartet", "Standards", "Nights", "Trumpet", "Lounge", "Bop"]),
    "Rock": (["Loud", "Electric", "Wild", "Iron", "Stone", "Burning"], ["Riffs", "Highway", "Amplifier", "Rebels", "Thunder", "Garage"]),
    "Classical": (["Baroque", "Grand", "Quiet", "Royal", "Golden", "Eternal"], ["Sonata", "Symphony", "Concerto", "Fugue", "Requiem", "Nocturne"]),
    "Electronic": (["Digital", "Neon", "Deep", "Pulse", "Synthetic", "Midnight"], ["Circuits", "Beats", "Waves", "Signals", "Grid", "Voltage"]),
    "Folk": (["Old", "Wandering", "Rustic", "Green", "Mountain", "River"], ["Ballads", "Fiddle", "Songs", "Harvest", "Tales", "Banjo"]),
    "HipHop": (["Street", "Fresh", "Urban", "Golden", "Heavy", "Real"], ["Rhymes", "Cypher", "Block", "Flow", "Mixtape", "Verses"]),
    "Blues": (["Delta", "Lonesome", "Muddy", "Slow", "Rainy", "Broken"], ["Guitar", "Harmonica", "Crossroads", "Shuffle", "Moan", "Train"]),
    "Pop": (["Bright", "Sweet", "Summer", "Shiny", "Lucky", "Candy"], ["Hearts", "Hits", "Dancefloor", "Stars", "Chorus", "Smiles"]),
    "Metal": (["Dark", "Steel", "Savage", "Black", "Molten", "Frozen"], ["Anvil", "Inferno", "Legion", "Hammer", "Abyss", "Skulls"]),
    "Reggae": (["Island", "Sunny", "Roots", "Easy", "Tropical", "Irie"], ["Riddim", "Dub", "Sound", "Shore", "Vibes", "Rhythm"]),
    "Soul": (["Warm", "Tender", "Sweet", "Motor", "Deep", "Silky"], ["Grooves", "Voices", "Feelings", "Gospel", "Soul", "Love"]),
    "Ambient": (["Drifting", "Calm", "Distant", "Soft", "Hollow", "Floating"], ["Drones", "Clouds", "Spaces", "Mist", "Horizons", "Echoes"]),
}


assert len(CATEGORIES) == SYNTH_CATEGORIES, "config.data.SYNTH_CATEGORIES must match CATEGORIES"


def item_catalog(cfg: SynthConfig) -> pa.Table:
    """Catalog: item_id (non-contiguous ints, so remapping is exercised), title, category."""
    rng = np.random.default_rng(cfg.seed)
    names = list(CATEGORIES)[: cfg.categories]
    cat = np.arange(cfg.items) % cfg.categories
    rng.shuffle(cat)
    titles = []
    counters: dict[tuple[int, int, int], int] = {}
    for i, c in enumerate(cat):
        adjs, nouns = CATEGORIES[names[c]]
        a, n = rng.integers(len(adjs)), rng.integers(len(nouns))
        k = counters.get((c, a, n), 0) + 1
        counters[(c, a, n)] = k
        titles.append(f"{adjs[a]} {nouns[n]} {names[c]} {k}")
    item_ids = 1000 + 7 * np.arange(cfg.items)
    return pa.table({
        "item_id": pa.array(item_ids, pa.int64()),
        "title": pa.array(titles),
        "category": pa.array([names[c] for c in cat]),
    })


def _planted_structure(cfg: SynthConfig, cat: np.ndarray, rng: np.random.Generator):
    """Per-category Zipf sampling tables and 3 successors per item."""
    C = cfg.categories
    members = [np.flatnonzero(cat == c) for c in range(C)]
    # Flattened per-category CDFs: category c occupies [c, c+1) so one searchsorted samples all users.
    flat_items, flat_cdf = [], []
    for c, m in enumerate(members):
        m = rng.permutation(m)
        w = 1.0 / np.arange(1, len(m) + 1) ** cfg.zipf
        flat_items.append(m)
        flat_cdf.append(c + np.cumsum(w) / w.sum())
    flat_items = np.concatenate(flat_items)
    flat_cdf = np.concatenate(flat_cdf)
    # Successors: 2 in the same category, 1 anywhere; fixed per item.
    succ = np.empty((cfg.items, 3), dtype=np.int64)
    for i in range(cfg.items):
        m = members[cat[i]]
        same = rng.choice(m[m != i], size=2, replace=len(m) - 1 < 2)
        succ[i] = [same[0], same[1], rng.integers(cfg.items)]
    return flat_items, flat_cdf, succ


def synth_fingerprint(cfg: SynthConfig) -> str:
    """The synthetic log's identity: its settings (the generator is deterministic for a seed)."""
    return stage_fingerprint(to_dict(cfg))


def generate(cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Write ``interactions.csv``, ``items.csv`` and ``manifest.json`` to ``out_dir`` atomically."""
    t0 = time.time()
    catalog = item_catalog(cfg)
    names = list(CATEGORIES)[: cfg.categories]
    cat = np.array([names.index(c) for c in catalog.column("category").to_pylist()])
    rng = np.random.default_rng(cfg.seed + 1)
    flat_items, flat_cdf, succ = _planted_structure(cfg, cat, rng)
    item_ids = catalog.column("item_id").to_numpy()
    succ_p = np.cumsum([0.6, 0.25, 0.15])
    rows_written = 0
    dup_written = 0
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        pacsv.write_csv(catalog, tmp / "items.csv")
        schema = pa.schema([("user_id", pa.string()), ("item_id", pa.int64()),
                            ("timestamp", pa.int64()), ("rating", pa.int64())])
        with pacsv.CSVWriter(tmp / "interactions.csv", schema) as writer:
            for start in range(0, cfg.users, cfg.chunk_users):
                n = min(cfg.chunk_users, cfg.users - start)
                crng = np.random.default_rng([cfg.seed, start])
                # Lengths: shifted geometric with the requested mean.
                extra = max(cfg.mean_length - cfg.min_length, 1e-9)
                lengths = cfg.min_length + crng.geometric(1.0 / (1.0 + extra), size=n) - 1
                L = int(lengths.max())
                primary = crng.integers(cfg.categories, size=n)
                secondary = crng.integers(cfg.categories, size=n)
                seq = np.empty((n, L), dtype=np.int64)
                last = np.full(n, -1)
                for t in range(L):
                    drift = crng.random(n) < cfg.p_drift
                    secondary = np.where(drift, crng.integers(cfg.categories, size=n), secondary)
                    use_primary = crng.random(n) < cfg.p_primary
                    c = np.where(use_primary, primary, secondary)
                    fresh = flat_items[np.minimum(np.searchsorted(flat_cdf, c + crng.random(n)), len(flat_items) - 1)]
                    follow = (last >= 0) & (crng.random(n) < cfg.p_transition)
                    k = np.searchsorted(succ_p, crng.random(n))
                    nxt = np.where(follow, succ[np.maximum(last, 0), np.minimum(k, 2)], fresh)
                    seq[:, t] = nxt
                    last = nxt
                # Flatten valid positions in (user, t) order, then timestamps with ties.
                mask = np.arange(L)[None, :] < lengths[:, None]
                uidx = np.broadcast_to(np.arange(n)[:, None], (n, L))[mask]
                items = seq[mask]
                step = crng.integers(60, 86400, size=items.size)
                step[crng.random(items.size) < cfg.p_tie] = 0
                first = np.r_[True, uidx[1:] != uidx[:-1]]
                t_start = 1_600_000_000 + crng.integers(0, 30 * 86400, size=n)
                step[first] = 0
                csum = np.cumsum(step)
                base = csum[first][uidx]  # cumulative sum at each user's first row
                ts = t_start[uidx] + (csum - base)
                ratings = np.clip(np.round(crng.normal(3.8, 1.0, size=items.size)), 1, 5).astype(np.int64)
                # Exact duplicates: re-emit some rows verbatim.
                dups = np.flatnonzero(crng.random(items.size) < cfg.p_duplicate)
                sel = np.concatenate([np.arange(items.size), dups])
                # Logs arrive out of user order: shuffle rows within the chunk.
                sel = sel[crng.permutation(sel.size)]
                user_ids = np.char.add("U", (start + uidx[sel]).astype(str))
                writer.write_table(pa.table({
                    "user_id": pa.array(user_ids, pa.string()),
                    "item_id": pa.array(item_ids[items[sel]]),
                    "timestamp": pa.array(ts[sel]),
                    "rating": pa.array(ratings[sel]),
                }, schema=schema))
                rows_written += sel.size
                dup_written += dups.size
                log(f"[synth] users {start + n}/{cfg.users}  rows {rows_written:,}  ({time.time() - t0:.1f}s)")
        manifest = {
            "kind": "synthetic_log",
            "schema_version": 1,
            "config": to_dict(cfg),
            "rows": rows_written,
            "exact_duplicates_planted": dup_written,
            "items": cfg.items,
            "users": cfg.users,
            "files": {"interactions": "interactions.csv", "items": "items.csv"},
            "seconds": round(time.time() - t0, 3),
        }
        manifest["fingerprint"] = synth_fingerprint(cfg)
        manifest = finish_manifest(tmp, manifest)
    return manifest
