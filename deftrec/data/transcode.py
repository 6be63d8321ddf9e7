"""Text encodings the byte-chunked reader cannot split, and a streamed UTF-8 copy for them.

The log reader cuts a file into byte ranges at ``b"\\n"`` and decodes each range, even each line,
on its own. That is right only for an encoding in which every ASCII character is its own byte
and no other character's bytes hold a control byte (UTF-8, Latin-1, cp1252, Shift-JIS,
GB18030, ...): :func:`splits_on_newline_bytes`. A file in any other encoding Python reads
(UTF-16 and UTF-32 in every byte order, UTF-7, EBCDIC, ISO-2022, ...) is copied once to UTF-8
(:func:`transcode_to_utf8`) and the copy is read instead. A line ends at a decoded ``"\\n"`` in
both, so the copy's line numbers are the original's. A byte order mark is dropped.

Bytes that are not valid in the declared encoding never vanish: the decode error handler
:data:`BAD_BYTES` turns each such byte b into the lone surrogate U+DC00+b (for b >= 0x80 that is
what ``surrogateescape`` writes). Written with ``surrogatepass`` they are invalid UTF-8, so the
reader rejects their lines like any undecodable line; :func:`show_bad_bytes` shows them as
``\\xNN`` in a reject's ``raw``.
"""

from __future__ import annotations

import codecs
import functools
import os
import re
import time
from typing import Callable, Iterator

BAD_BYTES = "deftrec.bad-bytes"  # codec error handler name (registered below)
_BLOCK = 1 << 20  # bytes decoded at a time when streaming
_SURROGATE = re.compile("[\ud800-\udfff]")
# Escape codecs (raw_unicode_escape) decode these to a newline: they must not pass as ASCII.
_ASCII_PROBE = "".join(map(chr, range(128))) + "\\u000a\\x0a\\n"


def _bad_bytes(e: UnicodeError):
    if not isinstance(e, UnicodeDecodeError):
        raise e
    return "".join(chr(0xDC00 + b) for b in e.object[e.start:e.end]), e.end


codecs.register_error(BAD_BYTES, _bad_bytes)


@functools.lru_cache(maxsize=None)
def splits_on_newline_bytes(encoding: str) -> bool:
    """Whether a file in ``encoding`` can be cut at ``b"\\n"`` and decoded line by line: ASCII
    encodes and decodes as itself, and no other character's bytes hold a control byte (an ESC
    shift of ISO-2022 would make a line's meaning depend on the lines before it)."""
    try:
        ascii_bytes = _ASCII_PROBE.encode("ascii")
        if _ASCII_PROBE.encode(encoding) != ascii_bytes or ascii_bytes.decode(encoding) != _ASCII_PROBE:
            return False
        # the BMP is enough: multi-byte encodings place their lead and trail bytes there already
        others = "".join(chr(c) for c in range(0x80, 0x10000) if not 0xD800 <= c < 0xE000)
        encoded = others.encode(encoding, "ignore")
    except (LookupError, UnicodeError):
        return False
    return re.search(rb"[\x00-\x1f]", encoded) is None


def has_bad_bytes(text: str) -> bool:
    """Whether decoded text holds bytes that were not valid in its encoding (:data:`BAD_BYTES`), or
    a lone surrogate some codecs (UTF-7, the escape codecs) decode: neither is text UTF-8 can hold."""
    return _SURROGATE.search(text) is not None


def show_bad_bytes(text: str) -> str:
    """Undecodable bytes as ``\\xNN`` and any other lone surrogate as ``\\uNNNN``: text Arrow can hold."""
    def show(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xDC00:02x}" if 0xDC00 <= c <= 0xDCFF else f"\\u{c:04x}"
    return _SURROGATE.sub(show, text)


def decode_text(data: bytes, encoding: str) -> str:
    """Whole-file decode: undecodable bytes kept as :data:`BAD_BYTES` surrogates, byte order mark dropped."""
    return data.decode(encoding, BAD_BYTES).removeprefix("\ufeff")


def _decoded_blocks(path: str, encoding: str) -> Iterator[str]:
    """The file decoded a block at a time (a character split across blocks is held back by the decoder)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors=BAD_BYTES)
    at_start = True
    with open(path, "rb") as f:
        while True:
            data = f.read(_BLOCK)
            text = decoder.decode(data, final=not data)
            if at_start and text:
                text, at_start = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not data:
                return


def decoded_lines(path: str, encoding: str) -> Iterator[str]:
    """The file's lines in any encoding, each ending at a decoded ``"\\n"`` (kept, as a byte reader keeps it)."""
    rest = ""
    for text in _decoded_blocks(path, encoding):
        *lines, rest = (rest + text).split("\n")
        for line in lines:
            yield line + "\n"
    if rest:
        yield rest


def transcode_to_utf8(path: str, encoding: str, dest: str, log: Callable[[str], None] = print) -> str:
    """Stream ``path`` (in ``encoding``) into ``dest`` as UTF-8 for the byte-chunked reader; -> ``dest``."""
    size = os.path.getsize(path)
    log(f"[preprocess] {path}: {encoding} cannot be split into byte ranges; transcoding "
        f"{size / (1 << 20):,.1f} MiB to UTF-8 in {dest}")
    t0 = time.time()
    with open(dest, "wb") as out:
        for text in _decoded_blocks(path, encoding):
            out.write(text.encode("utf-8", "surrogatepass"))
    log(f"[preprocess] {path}: transcoded to UTF-8 ({time.time() - t0:.1f}s)")
    return dest
