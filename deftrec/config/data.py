"""Typed configuration of the preprocessing stage."""

from __future__ import annotations

import codecs
import dataclasses
from typing import Optional

#: Named categories the synthetic generator knows (deftrec.data.synth.CATEGORIES).
SYNTH_CATEGORIES = 12

FORMATS = ("csv", "tsv", "jsonl", "parquet", "movielens", "deftrec")


#: ASCII text every input encoding must decode back after encoding it, even fed a byte at a time.
_ENCODING_PROBE = 'user_id,item_id\t"1 2";3|4::5\r\n'


def check_encoding(name: str) -> None:
    """Refuse, naming the field, a codec Python does not know or that cannot decode a text file
    (the readers stream files, so a codec must decode in pieces what it encoded whole)."""
    try:
        data = _ENCODING_PROBE.encode(name)  # LookupError too for bytes-to-bytes codecs (base64, rot13, ...)
    except LookupError:
        raise ValueError(f"encoding: unknown text encoding {name!r} (any codec Python's codecs module decodes "
                         f"text with works, e.g. utf-8, latin-1, cp1252, utf-16, utf-32)") from None
    except UnicodeError:
        data = b""
    decoder = codecs.getincrementaldecoder(name)()
    try:
        text = "".join(decoder.decode(data[i:i + 1]) for i in range(len(data))) + decoder.decode(b"", final=True)
    except UnicodeError:
        text = ""
    if text.removeprefix("\ufeff") != _ENCODING_PROBE:
        raise ValueError(f"encoding: codec {name!r} cannot read a text file (it does not decode ASCII text it "
                         f"encoded, read in pieces)")


@dataclasses.dataclass
class ColumnsConfig:
    """Where the fields are. Names when the file has a header, else 0-based positions ("0", "1", ...)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: Optional[str] = "rating"  # None/"" = no rating column


@dataclasses.dataclass
class CatalogColumnsConfig:
    item: str = "item_id"
    title: str = "title"
    category: Optional[str] = "category"  # None = no categories ("unknown")


@dataclasses.dataclass
class PreprocessConfig:
    input: list[str] = dataclasses.field(default_factory=list)  # files, or a folder for format deftrec
    format: str = "csv"
    items: Optional[str] = None  # item catalog file (deftrec: item_list.txt found in the input folder)
    output: str = ""
    columns: ColumnsConfig = dataclasses.field(default_factory=ColumnsConfig)
    catalog_columns: CatalogColumnsConfig = dataclasses.field(default_factory=CatalogColumnsConfig)
    delimiter: Optional[str] = None  # default per format: "," csv, "\t" tsv, "::" movielens
    header: Optional[bool] = None  # default: True for csv/tsv, False for movielens
    encoding: Optional[str] = None  # default: utf-8 (movielens: latin-1, which is how MovieLens ships)
    timestamp_format: str = "auto"  # auto | unix | unix_ms | a strptime format
    rating_threshold: Optional[float] = None  # keep rows with rating >= threshold
    user_core: Optional[int] = None  # k-core; default 5 (deftrec format: 0 = keep as published)
    item_core: Optional[int] = None
    min_sequence_length: int = 3  # leave-one-out needs train + valid + test items
    max_history: int = 20
    id_mapping: Optional[str] = None  # "sorted" (contiguous, by original id) | "preserve" (deftrec indices)
    num_buckets: int = 0  # user-hash partitions; 0 = from input size
    chunk_mb: float = 64.0  # input MiB per read task (fractions allowed, for tests)
    max_reject_fraction: float = 1.0  # fail when more than this fraction of rows is rejected
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("input: at least one input path is required")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if not self.output:
            raise ValueError("output: an output directory is required")
        defaults = {"csv": (",", True), "tsv": ("\t", True), "movielens": ("::", False),
                    "jsonl": (None, True), "parquet": (None, True), "deftrec": (" ", False)}
        d_delim, d_header = defaults[self.format]
        if self.delimiter is None:
            self.delimiter = d_delim
        if self.delimiter == "":
            raise ValueError("delimiter must not be empty")
        if self.header is None:
            self.header = d_header
        if self.encoding is None:
            self.encoding = "latin-1" if self.format == "movielens" else "utf-8"
        check_encoding(self.encoding)
        if self.format == "movielens" and self.columns == ColumnsConfig():
            # ratings.dat: UserID::MovieID::Rating::Timestamp
            self.columns = ColumnsConfig(user="0", item="1", rating="2", timestamp="3")
        if self.format == "movielens" and self.catalog_columns == CatalogColumnsConfig():
            self.catalog_columns = CatalogColumnsConfig(item="0", title="1", category="2")
        published = self.format == "deftrec"
        if self.user_core is None:
            self.user_core = 0 if published else 5
        if self.item_core is None:
            self.item_core = 0 if published else 5
        if self.id_mapping is None:
            self.id_mapping = "preserve" if published else "sorted"
        if self.id_mapping not in ("sorted", "preserve"):
            raise ValueError(f"id_mapping must be 'sorted' or 'preserve', got {self.id_mapping!r}")
        if self.id_mapping == "preserve" and not published:
            raise ValueError("id_mapping 'preserve' needs format 'deftrec' (the only format with published indices)")
        if self.user_core < 0 or self.item_core < 0:
            raise ValueError("user_core and item_core must be >= 0")
        if self.min_sequence_length < 3:
            raise ValueError("min_sequence_length must be >= 3: leave-one-out needs a train, a valid and a test item")
        if self.max_history < 1:
            raise ValueError("max_history must be >= 1")
        if self.num_buckets < 0 or self.chunk_mb <= 0:
            raise ValueError("num_buckets must be >= 0 and chunk_mb > 0")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError("max_reject_fraction must be in [0, 1]")
        if not self.columns.user or not self.columns.item or not self.columns.timestamp:
            if self.format != "deftrec":
                raise ValueError("columns.user, columns.item and columns.timestamp are required")
        if self.columns.rating == "":
            self.columns.rating = None


@dataclasses.dataclass
class SynthConfig:
    users: int = 2000
    items: int = 500
    interactions: int = 0  # 0 = users * mean_length
    mean_length: float = 30.0
    min_length: int = 5
    categories: int = 12
    p_transition: float = 0.6  # chance the next item follows a planted successor of the last item
    p_primary: float = 0.7  # otherwise: primary category with this probability, else secondary
    p_drift: float = 0.03  # per step, the secondary category is replaced
    zipf: float = 1.0
    p_duplicate: float = 0.002  # exact duplicate rows written (de-duplication must remove them)
    p_tie: float = 0.05  # consecutive events sharing a timestamp (stable ordering must keep them)
    seed: int = 42
    chunk_users: int = 20000

    def __post_init__(self):
        if self.users < 1 or self.items < 2:
            raise ValueError(f"need users >= 1 and items >= 2 (got users={self.users}, items={self.items})")
        if not 1 <= self.categories <= SYNTH_CATEGORIES:
            raise ValueError(f"categories must be in 1..{SYNTH_CATEGORIES}, got {self.categories}")
        if self.items < self.categories * 4:
            raise ValueError(f"items ({self.items}) must be at least 4 per category ({self.categories} categories)")
        for name in ("p_transition", "p_primary", "p_drift", "p_duplicate", "p_tie"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability, got {v}")
        if self.interactions < 0:
            raise ValueError("interactions must be >= 0")
        if self.interactions:
            self.mean_length = self.interactions / self.users
        if self.mean_length < self.min_length:
            raise ValueError(f"mean length {self.mean_length:.1f} is below min_length {self.min_length}")
        if self.min_length < 3:
            raise ValueError("min_length must be >= 3 (leave-one-out needs train, valid and test items)")
