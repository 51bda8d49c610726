"""The one JSONL line reader: every JSON-lines input (manifests, stage inputs, sources) goes through it.

    for number, record in read_records(url, skips):     # skips: anything with .add(reason, detail)
        ...                                              # record: a dict; bad lines counted, not raised

A file is read as bytes, split on ``\\n`` only, and each line is decoded and parsed on its own, so
one bad line costs that line, never the file. ``parse_record`` raises :class:`BadLine` (a
ValueError) with one of these reasons, and nothing else, for any input:

=================  ==============================================================================
``bad_json``       not JSON (syntax), or JSON but not an object (``[1, 2]``, ``null``, ``42``)
``bad_encoding``   bytes that are not UTF-8, or a ``\\ud800``-style escape of a lone surrogate (a
                   string that could never be written back as UTF-8)
``too_deep``       nesting deeper than ``MAX_DEPTH`` (a 100k-deep list would exhaust the stack of
                   the parser or of any later ``json.dumps``)
``bad_number``     ``NaN``/``Infinity`` (not JSON), a float that overflows to infinity, or an
                   integer of more than ``MAX_INT_DIGITS`` digits (``float()`` of it overflows)
``line_too_long``  a line over ``max_line_bytes`` (read in bounded pieces and stepped over)
=================  ==============================================================================

Blank lines are not records and are not counted. A UTF-8 byte order mark at the start of the
file is dropped. A file that breaks off as a whole (a corrupt ``.gz``) raises
:class:`UnreadableInput` naming the file and the last line read.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Any, Iterable, Iterator, Protocol

import fsspec

MAX_DEPTH = 64  # nesting of arrays/objects; real records nest 5 deep
MAX_INT_DIGITS = 20  # |n| < 10**20 holds every int64/uint64 id; more is corrupt data
MAX_LINE_BYTES = 1 << 24  # 16 MiB: far above any real record, far below a memory problem
EXCERPT_CHARS = 200
_READ_PIECE = 1 << 20
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800..\udfff written as a JSON escape


class Skips(Protocol):
    def add(self, reason: str, detail: str) -> None: ...


class UnreadableInput(ValueError):
    """The file itself breaks off (a corrupt or truncated compressed stream, a read error):
    not one bad line, so it is an error naming the file and the last good line, not a skip."""


class BadLine(ValueError):
    """A line that is not a usable JSON object; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadLine("bad_number", f"integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadLine("bad_number", f"{text[:40]} overflows a float")
    return value


def _parse_constant(text: str):
    raise BadLine("bad_number", f"{text} is not JSON")


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
# Number hooks cost a Python call per number, so lines go through the plain decoder unless a digit
# run could be an oversized number (21+ digits, a 3-digit exponent); NaN/Infinity are refused by
# both (that hook only runs for those constants).
_DECODER = json.JSONDecoder(parse_constant=_parse_constant)
_CHECKED_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
# The test is a byte translation (digits -> "0", e/E -> "e", signs -> "+", the rest -> " ") and
# two substring searches: ten times faster than the regex r"\d{21}|[eE][+-]?\d{3}" it equals.
_NUMBER_SHAPE = bytes.maketrans(bytes(range(256)), b"".join(
    b"0" if chr(c).isdigit() and c < 128 else b"e" if c in b"eE" else b"+" if c in b"+-" else b" " for c in range(256)))
_LONG_DIGITS = b"0" * (MAX_INT_DIGITS + 1)


def _suspect_number(text: str) -> bool:
    """Could a number in ``text`` be oversized (21+ digits, a 3-digit exponent)?"""
    shape = text.encode("utf-8", "surrogatepass").translate(_NUMBER_SHAPE)
    return _LONG_DIGITS in shape or b"e000" in shape or b"e+000" in shape


# The one JSONL writer's encoder (records are JSON trees: no cycles to look for).
_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


def dumps(record: Any) -> str:
    """One record as a JSONL line's text (UTF-8 characters kept, no newline)."""
    return _ENCODER.encode(record)


def dump_lines(records: Iterable[Any]) -> bytes:
    """Records as JSONL bytes, one line each."""
    return "".join(_ENCODER.encode(r) + "\n" for r in records).encode("utf-8")


def excerpt(line: Any, limit: int = EXCERPT_CHARS) -> str:
    """A printable, UTF-8-safe prefix of a raw line (for drop records and skip examples)."""
    if isinstance(line, BadLine):
        return line.detail[:limit]
    if isinstance(line, (bytes, bytearray)):
        return bytes(line[: limit * 4]).decode("utf-8", "backslashreplace")[:limit]
    return str(line)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def decode_line(raw: bytes | str) -> str:
    """The text of one raw line; BadLine("bad_encoding") when it is not UTF-8.

    Text lines decoded with ``errors="surrogateescape"`` (``iter_lines``) carry their bad bytes as
    lone surrogates and are refused here the same way.
    """
    if isinstance(raw, BadLine):
        raise raw
    if isinstance(raw, (bytes, bytearray)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadLine("bad_encoding", f"not UTF-8 ({e.reason} at byte {e.start}): {excerpt(raw)}") from None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadLine("bad_encoding", f"not UTF-8 (at character {e.start}): {excerpt(raw)}") from None
    return raw


def parse_record(raw: bytes | str | BadLine) -> dict[str, Any]:
    """One line → its JSON object; BadLine with the reason (see the module docs) otherwise."""
    value = parse_value(raw)
    if not isinstance(value, dict):
        raise BadLine("bad_json", f"a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object: {excerpt(raw)}")
    return value


def parse_value(raw: bytes | str | BadLine) -> Any:
    """One line → its JSON value of any type, with every guard of ``parse_record`` but the
    object check (for readers that count a non-object under their own reason)."""
    text = decode_line(raw).strip().lstrip("\ufeff")
    try:
        value = (_CHECKED_DECODER if _suspect_number(text) else _DECODER).decode(text)
    except BadLine:
        raise
    except RecursionError:
        raise BadLine("too_deep", f"nesting beyond the parser's stack: {excerpt(text)}") from None
    except ValueError as e:  # JSONDecodeError, and int() of a too-long digit string
        raise BadLine("bad_json", f"{e}: {excerpt(text)}") from None
    # Cheap guards first: a line with few brackets cannot nest deeply, one without a surrogate
    # escape cannot hold a lone surrogate (the text itself is valid UTF-8 by now).
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadLine("too_deep", f"nesting deeper than {MAX_DEPTH}: {excerpt(text)}")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadLine("bad_encoding", f"a lone surrogate escape: {excerpt(text)}") from None
    return value


def _depth(value: Any, depth: int = 1) -> int:
    """Nesting depth of a parsed value (counting stops past MAX_DEPTH, so recursion stays shallow)."""
    if depth > MAX_DEPTH:
        return depth
    deepest = depth
    for child in value.values() if type(value) is dict else value:
        if type(child) is dict or type(child) is list:
            deepest = max(deepest, _depth(child, depth + 1))
            if deepest > MAX_DEPTH:
                break
    return deepest


def iter_raw_lines(fileobj, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | BadLine]]:
    """``(line number, bytes)`` of a binary file object (anything with ``read(n)``), blank lines
    left out; a line longer than ``max_line_bytes`` comes as a BadLine("line_too_long") and is
    never held in memory whole."""
    number, buf, dropping, dropped = 0, b"", False, 0
    while True:
        piece = fileobj.read(_READ_PIECE)
        if number == 0 and not buf and not dropping and piece.startswith(b"\xef\xbb\xbf"):
            piece = piece[3:]
        buf += piece
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            number += 1
            line = buf[start:end + 1]
            start = end + 1
            if dropping:
                yield number, BadLine("line_too_long", f"line {number}: {dropped + len(line)} bytes > {max_line_bytes}")
                dropping, dropped = False, 0
            elif len(line) > max_line_bytes:
                yield number, BadLine("line_too_long", f"line {number}: {len(line)} bytes > {max_line_bytes}")
            elif line.strip():
                yield number, line
        buf = buf[start:]
        if len(buf) > max_line_bytes:  # an over-long line in progress: count it, keep none of it
            dropping, dropped, buf = True, dropped + len(buf), b""
        if not piece:
            break
    if dropping or buf.strip():
        number += 1
        if dropping or len(buf) > max_line_bytes:
            yield number, BadLine("line_too_long", f"line {number}: {dropped + len(buf)} bytes > {max_line_bytes}")
        else:
            yield number, buf


def iter_lines(url: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | BadLine]]:
    """``(line number, text)`` of a JSONL file (local or fsspec URL, compression inferred).

    Bad bytes survive as lone surrogates (``surrogateescape``), so ``parse_record`` still refuses
    the line as ``bad_encoding`` while the text can be kept, e.g. as a stage's chunk line.
    """
    number = 0
    try:
        with fsspec.open(str(url), "rb", compression="infer") as f:
            for number, line in iter_raw_lines(f, max_line_bytes):
                if isinstance(line, BadLine):
                    yield number, line
                else:
                    yield number, line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise UnreadableInput(f"{url}: cannot be read past line {number} ({type(e).__name__}: {e}); "
                              "the file is damaged or truncated") from None


def read_records(url: str, skips: Skips, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every good line of a JSONL file; the rest counted in ``skips``."""
    for number, line in iter_lines(url, max_line_bytes):
        try:
            yield number, parse_record(line)
        except BadLine as e:
            skips.add(e.reason, f"{url} line {number}: {e.detail}")
