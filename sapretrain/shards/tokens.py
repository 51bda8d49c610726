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
   unescaping changed characters, or lower-casing is context dependent), the caption is cut into
   the smallest whitespace-separated chunks that clean independently, and each chunk is aligned
   with its cleaned form (``_chunks``, ``_align``): unchanged characters map exactly, changed ones
   to the whole source stretch they replace ("cafÃ©" → "café" maps "é" to "Ã©", "&amp;" → "&"
   maps "&" to "&"), and a character whose pairing is ambiguous joins the changed stretch around
   it rather than being guessed. So a span gets every token that comes from its characters, and
   where cleaning blurred the boundary, possibly a neighbour too; never a token from elsewhere.
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

from sapretrain.resources import register_model_configs
from sapretrain.shards.schema import TokenizerSpec, tokenizer_spec

_WORD = re.compile(r"\S+")  # the runs `" ".join(text.split())` keeps
_END_OF_WORD = "</w>"
_WORD_CACHE_SIZE = 1 << 18  # regex matches whose BPE split is kept; cleared when full
_MAX_ALIGN_CELLS = 1 << 20  # largest alignment table (chars x chars) built for a changed chunk


@dataclass(frozen=True)
class TokenizedCaption:
    ids: list[int]  # SOT + tokens + EOT after truncation, not padded (len <= context_length)
    spans: dict[str, list[int]]  # part -> sorted positions in `ids` (0 is SOT); may be empty
    truncated: bool  # the caption had more tokens than fit


class SpanTokenizer:
    """Tokenize captions like open_clip's OpenAI-BPE ``SimpleTokenizer`` and map char spans to tokens.

    ``tokenizer`` injects a ready tokenizer object instead of ``open_clip.get_tokenizer(model_name)``
    (tests, or sharing one instance); it goes through the same support checks. Unsupported
    tokenizers, unknown model names, invalid spans and (rare) captions too long to align after
    cleaning changed them raise ValueError; ids that disagree with open_clip's raise RuntimeError
    (a bug or an incompatible open_clip version, never bad input).
    """

    def __init__(self, model_name: str = "ViT-B-32", context_length: int | None = None, *, tokenizer=None):
        if tokenizer is None:
            register_model_configs()  # sa-tiny and the other shipped model JSONs
            if ":" not in model_name and model_name not in open_clip.list_models():
                # get_tokenizer would silently fall back to the default tokenizer on a typo.
                raise ValueError(f"unknown open_clip model {model_name!r} (typo?); see open_clip.list_models()")
            tokenizer = open_clip.get_tokenizer(model_name)
        _check_supported(tokenizer, model_name)
        self.context_length = int(context_length or tokenizer.context_length)
        if self.context_length < 2:
            raise ValueError(f"context_length must hold at least SOT and EOT, got {self.context_length}")
        self.name = f"open_clip:SimpleTokenizer:{model_name}:ctx{self.context_length}"
        self.vocab_size = len(tokenizer.encoder)
        # Readers check shard token ids against the schema's numbers for this name: they must be these.
        live = TokenizerSpec(self.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id)
        if tokenizer_spec(self.name) != live:
            raise ValueError(f"{self.name}: {live} differs from the shard schema's {tokenizer_spec(self.name)}")
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
            raise RuntimeError(
                f"span tokenizer ids disagree with open_clip's encode for {text!r}: {ids[1:]} != {expected}"
            )

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
                raise RuntimeError(
                    f"{self.name} does not reproduce open_clip's tokens for {probe!r}: {got} != {expected}"
                )


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
        if name == "_tokenizer":  # not set yet (unpickling): don't recurse
            raise AttributeError(name)
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
        # Align the chunk's text without surrounding whitespace, which cleaning strips anyway.
        start, end = start + len(text[start:end]) - len(text[start:end].lstrip()), start + len(text[start:end].rstrip())
        words = text[start:end]
        if clean_chunk == words.lower() and len(words) == len(clean_chunk):
            lo.extend(range(start, end))
            hi.extend(range(start + 1, end + 1))
        elif (end - start) * len(clean_chunk) <= _MAX_ALIGN_CELLS:
            chunk_lo, chunk_hi = _align(words, range(start, end), clean_chunk)
            lo.extend(chunk_lo)
            hi.extend(chunk_hi)
        else:
            raise ValueError(f"cannot map the cleaned caption back to a {len(text)}-char caption: too long to align")
    if len(lo) != len(cleaned):
        raise RuntimeError(f"char map of {text!r} has {len(lo)} chars, its cleaned text {len(cleaned)}")
    return lo, hi


def _chunks(text: str, cleaned: str, clean_fn) -> list[tuple[int, int, str]]:
    """Cut the caption into ``(start, end, cleaned chunk)`` pieces whose cleaning is independent.

    ftfy, html unescaping and lower-casing act locally, so each whitespace-separated run is cleaned
    alone; a run whose cleaning depends on what follows (ftfy reads "voilÃ" + "\\xa0" as "voilà")
    is cleaned with the whitespace after it, or merged with the next runs, until the chunk's
    cleaned text is the next piece of ``cleaned``. Alignment then never leaves its chunk. If the
    cut fails (ftfy decided on the whole caption at once), the caption is one chunk.
    """
    runs = [match.span() for match in _WORD.finditer(text)]
    chunks, at, k = [], 0, 0  # `at`: where the next chunk's cleaned text starts in `cleaned`
    while k < len(runs):
        begin = at + 1 if chunks else at  # after the separating space
        for e, end in _chunk_ends(text, runs, k):
            start = runs[k][0]
            chunk = text[start:end]
            if e == k and chunk.isascii() and chunk.isprintable() and "&" not in chunk:
                clean_chunk = chunk.lower()  # nothing here for ftfy or html unescaping to change
            else:
                clean_chunk = clean_fn(chunk)
            stop = begin + len(clean_chunk)
            if not clean_chunk:  # e.g. only control characters: nothing in `cleaned` comes from it
                break
            separated = not chunks or cleaned[at : at + 1] == " "
            if separated and cleaned.startswith(clean_chunk, begin) and cleaned[stop : stop + 1] in ("", " "):
                chunks.append((start, end, clean_chunk))
                at = stop
                break
        else:
            return [(0, len(text), cleaned)]
        k = e + 1
    if at != len(cleaned):
        return [(0, len(text), cleaned)]
    return chunks


def _chunk_ends(text: str, runs: list[tuple[int, int]], k: int):
    """``(last run, end)`` of the chunks starting at run ``k``, shortest first: runs k..e, without
    and then with the whitespace that follows them."""
    for e in range(k, len(runs)):
        yield e, runs[e][1]
        after = runs[e + 1][0] if e + 1 < len(runs) else len(text)
        if after > runs[e][1]:
            yield e, after


def _align(src: str, src_pos: Sequence[int], dst: str) -> tuple[list[int], list[int]]:
    """Map each char of ``dst`` (a cleaned ``src``) to its ``[lo, hi)`` range of the caption.

    ``src_pos[i]`` is the caption index of ``src[i]``. Chars match when equal up to case and NFKC
    ("Ａ" is "a"); whitespace never matches (it is interchangeable, and no token holds it). Of a
    longest common subsequence, only the matches that every longest one makes are kept: a char
    that could pair with either of two equal chars (one "é" of "&#233;é&#233;" → "ééé") stays
    unmatched rather than guessed, as do the letters of a word next to its own repeat. (difflib's
    longest-block matching, or a Levenshtein alignment, would pair some of those wrongly.)
    Matched chars map exactly; between two matches, the changed dst chars map to the whole changed
    src stretch (e.g. "é" to "Ã©"), word by word when both sides have as many words; inserted chars
    map to the matched chars on either side; dropped src chars map to nothing ("amp;" of "&amp;"
    → "&": a span must reach the "&").
    """
    n, m = len(src), len(dst)
    folded = [unicodedata.normalize("NFKC", a).lower() for a in src]
    same = [[(a == b or f == b) and not b.isspace() for b in dst] for a, f in zip(src, folded)]
    # head[i][j]: LCS length of src[:i] and dst[:j]; tail[i][j]: of src[i:] and dst[j:].
    head = [[0] * (m + 1) for _ in range(n + 1)]
    tail = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n):
        for j in range(m):
            head[i + 1][j + 1] = head[i][j] + 1 if same[i][j] else max(head[i][j + 1], head[i + 1][j])
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            tail[i][j] = tail[i + 1][j + 1] + 1 if same[i][j] else max(tail[i + 1][j], tail[i][j + 1])
    best = head[n][m]

    def essential(i: int, j: int) -> bool:
        """Every longest alignment matches src[i] with dst[j]: none pairs src[i] elsewhere or skips it."""
        elsewhere = max((head[i][k] + 1 + tail[i + 1][k + 1] for k in range(m) if same[i][k] and k != j), default=-1)
        skipped = max(head[i][k] + tail[i + 1][k] for k in range(m + 1))
        return max(elsewhere, skipped) < best

    matches, i, j = [], 0, 0  # walk one longest alignment, keeping its essential matches
    while i < n and j < m:
        if same[i][j] and tail[i][j] == tail[i + 1][j + 1] + 1:
            if essential(i, j):
                matches.append((i, j))
            i, j = i + 1, j + 1
        elif tail[i + 1][j] == tail[i][j]:
            i += 1
        else:
            j += 1
    matches = [(-1, -1)] + matches + [(n, m)]  # with sentinels

    def start_of(i: int) -> int:  # caption index where src[i:] begins
        return src_pos[i] if i < n else (src_pos[-1] + 1 if n else 0)

    lo, hi = [0] * m, [0] * m
    for i, j in matches[1:-1]:
        lo[j], hi[j] = src_pos[i], src_pos[i] + 1
    for (pi, pj), (ci, cj) in zip(matches, matches[1:]):
        # The src stretch strictly between two matches, as a caption range.
        start, end = start_of(pi + 1), (src_pos[ci - 1] + 1 if ci > pi + 1 else start_of(pi + 1))
        if cj > pj + 1:  # dst chars changed here
            if start == end:  # ... or inserted: they belong with the matched chars around them
                start = src_pos[pi] if pi >= 0 else start
                end = src_pos[ci] + 1 if ci < n else end
            for k in range(pj + 1, cj):
                lo[k], hi[k] = start, end
            src_words = [w.span() for w in _WORD.finditer(src, pi + 1, ci)]
            dst_words = [w.span() for w in _WORD.finditer(dst, pj + 1, cj)]
            if src_words and len(src_words) == len(dst_words):  # e.g. 'â€œ\xa0ﬁ' → '" fi': word by word
                for (s0, s1), (d0, d1) in zip(src_words, dst_words):
                    for k in range(d0, d1):
                        lo[k], hi[k] = src_pos[s0], src_pos[s1 - 1] + 1
    return lo, hi
