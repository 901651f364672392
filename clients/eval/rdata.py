"""Read character vectors out of an installed R package's lazy-load data (`data/Rdata.rdb` + `.rdx`).

Why: Debian ships Jane Austen's novels only as the R package `r-cran-janeaustenr`, whose texts are R
objects in a lazy-load database. This reader understands just enough of R's XDR serialisation (version 2
and 3) to get plain vectors and lists out, so neither R nor an R-reading library is needed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

_NILVALUE, _REF, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENS, _MISSING, _UNBOUND = (
    254,
    255,
    253,
    242,
    241,
    247,
    251,
    252,
)
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19
_NA_INT = -(2**31)


class RDataError(ValueError):
    """The bytes are not an R serialisation this reader understands."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise RDataError("not an XDR R serialisation (expected 'X\\n')")
        self.buf = data
        self.pos = 2
        self.refs: list[Any] = []
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()  # then the native encoding's name
            self.pos += n
        elif version != 2:
            raise RDataError(f"unsupported serialisation version {version}")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENS, _MISSING, _UNBOUND):
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:  # pairlist -> dict (tagged) or list
            out: dict[Any, Any] = {}
            node_attr = has_attr
            node_tag = has_tag
            while True:
                if node_attr:
                    self.item()
                tag = self.item() if node_tag else len(out)
                out[tag] = self.item()
                nxt = self.int()
                if nxt & 0xFF != _LIST:
                    self.pos -= 4
                    self.item()  # the terminating CDR (normally NILVALUE)
                    return out
                node_attr, node_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return s
        if kind in (_LGL, _INT):
            n = self.length()
            vals = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
            value: Any = [None if v == _NA_INT else v for v in vals]
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif kind in (_STR, _VEC):
            value = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == _VEC and isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value, strict=True))
        return value


def unserialize(data: bytes) -> Any:
    """One R object: vectors become lists, named lists become dicts, NA becomes None."""
    return _Reader(data).item()


def _decompress(blob: bytes) -> bytes:
    # lazy-load entries: 4-byte big-endian raw length, then zlib; or a type byte first for bzip2/xz/none
    body = blob[4:]
    if body[:1] == b"2":
        return bz2.decompress(body[1:])
    if body[:1] == b"Z":
        return lzma.decompress(body[1:])
    if body[:1] == b"0":
        return body[1:]
    return zlib.decompress(body)


def read_lazyload(db: str | Path) -> dict[str, Any]:
    """Every object of a lazy-load database, given its path without extension (e.g. `.../data/Rdata`)."""
    db = Path(db)
    index = unserialize(gzip.decompress(db.with_suffix(".rdx").read_bytes()))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{db}.rdx: no 'variables' index")
    blob = db.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, size) in index["variables"].items():
        out[name] = unserialize(_decompress(blob[offset : offset + size]))
    return out
