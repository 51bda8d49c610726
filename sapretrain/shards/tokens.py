"""Caption character spans → positions in the exact token sequence open_clip feeds the text tower.

SA-CLIP pools text-transformer features over the tokens of a caption's subject, relation and
object. Curation gives those parts as character spans ``(start, end)`` of the raw caption; this
module tokenizes the caption exactly as ``open_clip.get_tokenizer(model)([caption])`` does
(SOT + BPE tokens + EOT; if too long, the first ``context_length`` ids with the last one set to
EOT) and reports, for each part, the positions of the tokens whose characters overlap its span.

How a token gets its characters:

1. ``tokenizer.clean_fn`` (ftfy, html unescape, whitespace collapse, lower case) turns the caption
   into the text the regex split sees. We rebuild that text ourselves with an index map (identity,
   or per-word whitespace collapse + lower case). If ours differs from ``clean_fn``'s (ftfy or html
   unescaping changed characters, or lower-casing is context dependent), each changed
   whitespace-separated run is cleaned alone and aligned with its cleaned form (see
   ``_map_changed``): unchanged characters map exactly, changed ones to the whole source stretch
   they replace (so "cafÃ©" → "café" maps "é" to "Ã©", "&amp;" → "&" maps "&" to "&amp;").
   Captions whose cleaning cannot be cut into such local pieces raise ValueError.
2. Each regex match is UTF-8 encoded and BPE-merged by the tokenizer's own ``bpe``; its pieces cover
   consecutive byte ranges of the match ('</w>' only marks the word end), hence character ranges.
   A multi-byte character split over several pieces belongs to each of them.
3. Every call checks its ids against open_clip's own ``SimpleTokenizer.encode`` run on the same
   cleaned text, and raises on any difference. Construction checks once, on probe captions, that
   the whole path reproduces the tokenizer's padded output, cleaning included.

``SpanTokenizer.name`` is the identity recorded in shard headers:
``"open_clip:SimpleTokenizer:<model_name>:ctx<context_length>"``, e.g.
``"open_clip:SimpleTokenizer:ViT-B-32:ctx77"``. The model name is kept as given, so compare names
for equality; two models sharing the OpenAI BPE still get different names.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Mapping, Sequence

import open_clip
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

_WORD = re.compile(r"\S+")  # the runs `" ".join(text.split())` keeps
_END_OF_WORD = "</w>"
_WORD_CACHE_SIZE = 1 << 18  # regex matches whose BPE split is kept; cleared when full
_MAX_ALIGN_CELLS = 1 << 20  # largest alignment table (chars x chars) built for a changed chunk
_RUN_BONUS = 1  # alignment score for a matched char that continues a run of matches


@dataclass(frozen=True)
class TokenizedCaption:
    ids: list[int]  # SOT + tokens + EOT after truncation, not padded (len <= context_length)
    spans: dict[str, list[int]]  # part -> sorted positions in `ids` (0 is SOT); may be empty
    truncated: bool  # the caption had more tokens than fit


class SpanTokenizer:
    """Tokenize captions like open_clip's OpenAI-BPE ``SimpleTokenizer`` and map char spans to tokens.

    ``tokenizer`` injects a ready tokenizer object instead of ``open_clip.get_tokenizer(model_name)``
    (tests, or sharing one instance); it goes through the same support checks.
    """

    def __init__(self, model_name: str = "ViT-B-32", context_length: int | None = None, *, tokenizer=None):
        if tokenizer is None:
            if ":" not in model_name and model_name not in open_clip.list_models():
                # get_tokenizer would silently fall back to the default tokenizer on a typo.
                raise ValueError(f"unknown open_clip model {model_name!r} (typo?); see open_clip.list_models()")
            tokenizer = open_clip.get_tokenizer(model_name)
        _check_supported(tokenizer, model_name)
        self.context_length = int(context_length or tokenizer.context_length)
        if self.context_length < 2:
            raise ValueError(f"context_length must hold at least SOT and EOT, got {self.context_length}")
        self.name = f"open_clip:SimpleTokenizer:{model_name}:ctx{self.context_length}"
        self._tok = tokenizer
        self._precleaned = _PreCleaned(tokenizer)
        # bytes.decode("latin-1") gives one char per byte; this maps it to the BPE byte alphabet.
        self._byte_table = {byte: char for byte, char in tokenizer.byte_encoder.items()}
        self._words: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        self._self_check()

    def __call__(self, text: str, spans: Mapping[str, tuple[int, int]]) -> TokenizedCaption:
        _check_spans(text, spans)
        tok, words = self._tok, self._words
        cleaned = tok.clean_fn(text)
        char_lo, char_hi = _char_map(text, cleaned, tok.clean_fn)

        ids = [tok.sot_token_id]
        token_lo, token_hi = [], []  # source-text char range [lo, hi) of ids[1:]
        for match in tok.pat.finditer(cleaned):
            word, base = match.group(), match.start()
            word_ids, pieces = words.get(word) or self._split(word)
            ids += word_ids
            for first, last in pieces:
                token_lo.append(char_lo[base + first])
                token_hi.append(char_hi[base + last])

        expected = type(tok).encode(self._precleaned, cleaned)
        if ids[1:] != expected:
            raise RuntimeError(f"span tokenizer ids disagree with open_clip's encode for {text!r}: {ids[1:]} != {expected}")

        ids.append(tok.eot_token_id)
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[: self.context_length]
            ids[-1] = tok.eot_token_id
        kept = len(ids) - 2  # content tokens that survived, at positions 1..kept
        part_positions = {
            part: [k + 1 for k in range(kept) if token_lo[k] < end and start < token_hi[k]]
            for part, (start, end) in spans.items()
        }
        return TokenizedCaption(ids=ids, spans=part_positions, truncated=truncated)

    def _split(self, word: str) -> tuple[list[int], list[tuple[int, int]]]:
        """BPE ids of one regex match and, per piece, its first and last char in ``word``; cached."""
        raw = word.encode("utf-8")
        pieces = self._tok.bpe(raw.decode("latin-1").translate(self._byte_table)).split(" ")
        # Char index within `word` of each byte (identity for ASCII).
        char_of_byte = range(len(raw)) if len(raw) == len(word) else _char_of_byte(word)
        chars, byte = [], 0
        for piece in pieces:
            n = len(piece) - len(_END_OF_WORD) if piece.endswith(_END_OF_WORD) else len(piece)
            chars.append((char_of_byte[byte], char_of_byte[byte + n - 1]))
            byte += n
        if byte != len(raw):
            raise RuntimeError(f"BPE pieces {pieces} of {word!r} cover {byte} of {len(raw)} bytes")
        if len(self._words) >= _WORD_CACHE_SIZE:
            self._words.clear()
        self._words[word] = split = ([self._tok.encoder[piece] for piece in pieces], chars)
        return split

    def pad(self, ids: list[int]) -> list[int]:
        """Zero-pad to context_length: one row of what open_clip's tokenizer returns."""
        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} ids exceed context_length {self.context_length}")
        return list(ids) + [0] * (self.context_length - len(ids))

    def _self_check(self) -> None:
        """Once per instance: our path reproduces the tokenizer's padded output, cleaning included."""
        probes = (
            "  A Photo of\ta CAFÃ© &amp; naïve İstanbul ΟΔΟΣ 🐶,  skateboarding  by a hydrant!\n",
            "a dog " * self.context_length,  # truncated
        )
        for probe in probes:
            expected = self._tok([probe], context_length=self.context_length)[0].tolist()
            got = self.pad(self(probe, {}).ids)
            if got != expected:
                raise RuntimeError(f"{self.name} does not reproduce open_clip's tokens for {probe!r}: {got} != {expected}")


class _PreCleaned:
    """The tokenizer with cleaning already done: lets open_clip's own ``encode`` check our ids on
    the text ``clean_fn`` gave, without a second (costly, and not idempotent) ftfy pass."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        # Plain instance attributes (shared objects, e.g. the BPE cache): encode reads them per byte.
        vars(self).update(vars(tokenizer))
        self.bpe = tokenizer.bpe
        self.clean_fn = _already_clean

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _already_clean(text: str) -> str:
    return text


def _check_supported(tokenizer, model_name: str) -> None:
    if type(tokenizer) is not SimpleTokenizer:
        raise ValueError(
            f"model {model_name!r} uses tokenizer {type(tokenizer).__module__}.{type(tokenizer).__qualname__}; "
            "SpanTokenizer supports only open_clip.tokenizer.SimpleTokenizer (the OpenAI CLIP BPE of ViT-B-32 "
            "and most CLIP models)"
        )
    if tokenizer.clean_fn is not get_clean_fn("lower"):
        raise ValueError(f"model {model_name!r}: SpanTokenizer supports only SimpleTokenizer(clean='lower')")
    if tokenizer.reduction_fn is not None:
        # Reduction masks drop tokens at random: positions could not be stored ahead of training.
        raise ValueError(f"model {model_name!r}: SpanTokenizer does not support SimpleTokenizer(reduction_mask=...)")


def _check_spans(text: str, spans: Mapping[str, tuple[int, int]]) -> None:
    for part, (start, end) in spans.items():
        if not 0 <= start < end <= len(text):
            raise ValueError(f"span {part}=({start}, {end}) is not within a caption of {len(text)} characters")


def _char_of_byte(word: str) -> list[int]:
    return [i for i, char in enumerate(word) for _ in range(len(char.encode("utf-8")))]


def _char_map(text: str, cleaned: str, clean_fn) -> tuple[Sequence[int], Sequence[int]]:
    """For each char of ``cleaned``, the half-open range ``[lo, hi)`` of ``text`` it comes from."""
    if len(text) == len(cleaned) and text.lower() == cleaned:  # most captions: only case changed
        return range(len(text)), range(1, len(text) + 1)
    ours, source = _collapse_and_lower(text)
    if ours == cleaned:  # only whitespace and case changed
        return source, [i + 1 for i in source]
    return _map_changed(text, cleaned, clean_fn)


def _collapse_and_lower(text: str) -> tuple[str, list[int]]:
    """``" ".join(text.split()).lower()`` built word by word, with each char's index in ``text``."""
    parts, source = [], []
    for match in _WORD.finditer(text):
        word, start = match.group(), match.start()
        if source:
            parts.append(" ")
            source.append(start - 1)  # the separator stands for the whitespace before the word
        lowered = word.lower()
        if len(lowered) == len(word):
            source.extend(range(start, match.end()))
        else:  # e.g. "İ" lowers to "i" + combining dot: both come from the one source char
            lowered = "".join(char.lower() for char in word)
            source.extend(start + i for i, char in enumerate(word) for _ in char.lower())
        parts.append(lowered)
    return "".join(parts), source


def _map_changed(text: str, cleaned: str, clean_fn) -> tuple[list[int], list[int]]:
    """Char map for text that ftfy, html unescaping or context-dependent lower-casing changed."""
    lo, hi = [], []
    for start, end, clean_chunk in _chunks(text, cleaned, clean_fn):
        if lo:  # the separating space stands for the whitespace before the chunk
            lo.append(start - 1)
            hi.append(start)
        words = text[start:end].strip()
        if start == len(text) - len(text.lstrip()) and clean_chunk == words.lower() and len(words) == len(clean_chunk):
            lo.extend(range(start, start + len(words)))
            hi.extend(range(start + 1, start + len(words) + 1))
        elif (end - start) * len(clean_chunk) <= _MAX_ALIGN_CELLS:
            chunk_lo, chunk_hi = _align(text[start:end], range(start, end), clean_chunk)
            lo.extend(chunk_lo)
            hi.extend(chunk_hi)
        else:
            raise ValueError(f"cannot map the cleaned caption back to a {len(text)}-char caption: too long to align")
    if len(lo) != len(cleaned):
        raise RuntimeError(f"char map of {text!r} has {len(lo)} chars, its cleaned text {len(cleaned)}")
    return lo, hi


def _chunks(text: str, cleaned: str, clean_fn) -> list[tuple[int, int, str]]:
    """Cut the caption into ``(start, end, cleaned chunk)`` pieces whose cleaning is independent.

    ftfy, html unescaping and lower-casing act locally, so each whitespace-separated run, with the
    whitespace after it, is cleaned alone; a run whose cleaning depends on what follows (ftfy reads
    "voilÃ" + "\\xa0" as "voilà") is merged with the next runs until the chunk's cleaned text is
    the next piece of ``cleaned``. Alignment then never leaves its chunk. If the cut fails
    (cleaning decided on the whole caption, e.g. ftfy's mojibake heuristics), the caption is one
    chunk.
    """
    runs = [match.span() for match in _WORD.finditer(text)]
    chunks, at, k = [], 0, 0  # `at`: where the next chunk's cleaned text starts in `cleaned`
    while k < len(runs):
        for e in range(k, len(runs)):
            start, end = runs[k][0], runs[e + 1][0] if e + 1 < len(runs) else len(text)
            words = text[start : runs[e][1]]
            if e == k and words.isascii() and words.isprintable() and "&" not in words:
                clean_chunk = words.lower()  # nothing here for ftfy or html unescaping to change
            else:
                clean_chunk = clean_fn(text[start:end])
            if not clean_chunk:  # e.g. only control characters: nothing in `cleaned` comes from it
                break
            begin = at + 1 if chunks else at
            stop = begin + len(clean_chunk)
            if (not chunks or cleaned[at : at + 1] == " ") and cleaned.startswith(clean_chunk, begin) and cleaned[stop : stop + 1] in ("", " "):
                chunks.append((start, end, clean_chunk))
                at = stop
                break
        else:
            return [(0, len(text), cleaned)]
        k = e + 1
    if at != len(cleaned):
        return [(0, len(text), cleaned)]
    return chunks


def _align(src: str, src_pos: Sequence[int], dst: str) -> tuple[list[int], list[int]]:
    """Map each char of ``dst`` (a cleaned ``src``) to its ``[lo, hi)`` range of the caption.

    ``src_pos[i]`` is the caption index of ``src[i]``. Chars are matched when equal up to case and
    NFKC ("Ａ" is "a"), or whitespace against the space it became. The alignment maximises the
    matches, non-space ones counting double, plus a bonus for each match that continues a run of
    matches: like a diff, it keeps words together instead of pairing a word's letters with a
    repeat's (difflib's longest-block matching can, and so can a plain Levenshtein alignment).
    Matched chars map exactly; between two matches, the changed dst chars map to the whole changed
    src stretch (e.g. "é" to "Ã©"); dropped non-space src chars join the previous dst char (e.g. "&"
    covers all of "&amp;"); inserted chars get an empty range.
    """
    n, m = len(src), len(dst)
    folded = [unicodedata.normalize("NFKC", a).lower() for a in src]
    same = [[a == b or f == b or (b == " " and a.isspace()) for b in dst] for a, f in zip(src, folded)]
    weight = [1 if a.isspace() else 2 for a in src]
    # after_match[i][j] / after_gap[i][j]: best score aligning src[:i] with dst[:j] whose last step
    # matched src[i-1] with dst[j-1] / skipped a char.
    never = -(1 << 30)
    after_match = [[never] * (m + 1) for _ in range(n + 1)]
    after_gap = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        match_prev, gap_prev, match_row, gap_row = after_match[i - 1], after_gap[i - 1], after_match[i], after_gap[i]
        same_i, w = same[i - 1], weight[i - 1]
        for j in range(1, m + 1):
            gap_row[j] = max(match_prev[j], gap_prev[j], match_row[j - 1], gap_row[j - 1])
            if same_i[j - 1]:
                match_row[j] = max(match_prev[j - 1] + _RUN_BONUS, gap_prev[j - 1]) + w
    matches, i, j = [(n, m)], n, m  # (src, dst) index pairs of matched chars, plus end sentinel
    in_match = after_match[n][m] >= after_gap[n][m]
    while i > 0 and j > 0:
        if in_match:
            matches.append((i - 1, j - 1))
            in_match = after_match[i][j] == after_match[i - 1][j - 1] + _RUN_BONUS + weight[i - 1]
            i, j = i - 1, j - 1
        else:
            best = after_gap[i][j]
            if best == after_match[i - 1][j]:
                i, in_match = i - 1, True
            elif best == after_gap[i - 1][j]:
                i -= 1
            elif best == after_match[i][j - 1]:
                j, in_match = j - 1, True
            else:
                j -= 1
    matches.append((-1, -1))  # start sentinel
    matches.reverse()

    def start_of(i: int) -> int:  # caption index where src[i:] begins
        return src_pos[i] if i < n else (src_pos[-1] + 1 if n else 0)

    lo, hi = [0] * m, [0] * m
    for i, j in matches[1:-1]:
        lo[j], hi[j] = src_pos[i], src_pos[i] + 1
    for (pi, pj), (ci, cj) in zip(matches, matches[1:]):
        # The src stretch strictly between two matches, as a caption range.
        start, end = start_of(pi + 1), (src_pos[ci - 1] + 1 if ci > pi + 1 else start_of(pi + 1))
        if cj > pj + 1:  # dst chars changed (or, if the stretch is empty, inserted) here
            for k in range(pj + 1, cj):
                lo[k], hi[k] = start, end
        elif src[pi + 1 : ci].strip():  # src chars dropped: the neighbouring dst char covers them
            if pj >= 0:
                hi[pj] = max(hi[pj], end)
            elif cj < m:
                lo[cj] = min(lo[cj], start)
    return lo, hi
