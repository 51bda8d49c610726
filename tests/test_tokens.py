"""SpanTokenizer: ids identical to open_clip's ViT-B-32 tokenizer, char spans → the right token positions."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sapretrain.shards.tokens import SpanTokenizer, TokenizedCaption

CAPTIONS = [
    "a dog sits on a bench",
    "A Black Honda motorcycle parked in front of a garage.",
    "Two women, waiting at a bench; next to a street!?",
    "a  man   riding\ta skateboard\non the\r\nstreet",
    "   leading and trailing whitespace   \n",
    "a café with naïve art and a 🐶 on the table 🍕🍕",
    "fish &amp; chips &lt;3 on a plate",
    "a cafÃ© by the sea",  # mojibake that ftfy repairs to "café"
    "a red fire hydrant next to an unbelievably skateboarding kid",
    "İstanbul ΟΔΟΣ street sign",  # lower-casing changes length / is context dependent
    "the <start_of_text> tag is literal text",
    "x",
    "",
]


N_RANDOM = 200  # fuzzed captions per run (5000 pass too; raise it when changing the alignment)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def span_tokenizer():
    return SpanTokenizer("ViT-B-32")


def decode(tokenizer, ids, positions) -> str:
    """Text of the tokens at `positions`, whitespace removed (decode puts a space after each word)."""
    return "".join(tokenizer.decode(np.array([ids[p] for p in positions], dtype=np.int64)).split())


def squash(tokenizer, text: str) -> str:
    return "".join(tokenizer.clean_fn(text).split())


def span_of(text: str, sub: str, occurrence: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(sub, start + 1)
    return start, start + len(sub)


def test_name_and_context_length(span_tokenizer, open_clip_tokenizer):
    assert span_tokenizer.name == "open_clip:SimpleTokenizer:ViT-B-32:ctx77"
    assert span_tokenizer.context_length == 77
    short = SpanTokenizer("ViT-B-32", 16, tokenizer=open_clip_tokenizer)
    assert (short.name, short.context_length) == ("open_clip:SimpleTokenizer:ViT-B-32:ctx16", 16)


@pytest.mark.parametrize("text", CAPTIONS)
def test_ids_equal_open_clip(span_tokenizer, open_clip_tokenizer, text):
    out = span_tokenizer(text, {})
    assert isinstance(out, TokenizedCaption) and out.truncated is False
    assert out.ids[0] == open_clip_tokenizer.sot_token_id and out.ids[-1] == open_clip_tokenizer.eot_token_id
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()


@pytest.mark.parametrize(
    "text, part",
    [
        ("a dog sits on a bench", "dog"),  # single token
        ("a dog sits on a bench", "sits on"),  # several words
        ("A Black Honda motorcycle parked", "Black Honda"),  # case
        ("a red fire hydrant next to a car", "hydrant"),  # one word, two BPE pieces
        ("a red fire hydrant next to a car", "fire hydrant"),
        ("kids skateboarding unbelievably well", "skateboarding unbelievably"),
        ("Two women, waiting at a bench; next to a street!", "bench;"),  # punctuation is its own token
        ("a  man   riding\ta skateboard\non the street", "man   riding\ta"),  # collapsed whitespace inside
        ("a  man   riding\ta skateboard\non the street", "skateboard\non"),
        ("   leading and trailing   \n", "trailing"),
        ("a café with naïve art", "naïve"),  # "ï" is its own BPE piece
        ("a café with naïve art", "café"),
        ("a 🐶 on the table 🍕🍕", "🐶"),
        ("a 🐶 on the table 🍕🍕", "🍕🍕"),
        ("fish &amp; chips on a plate", "&amp;"),  # html unescaped to "&"
        ("fish &amp; chips on a plate", "chips"),  # after the unescaped entity
        ("a cafÃ© by the sea", "cafÃ©"),  # ftfy-repaired
        ("a cafÃ© by the sea", "by the"),
        ("İstanbul ΟΔΟΣ street sign", "İstanbul"),
        ("İstanbul ΟΔΟΣ street sign", "ΟΔΟΣ"),  # byte-level pieces, final sigma
        ("İstanbul ΟΔΟΣ street sign", "street"),
        ("voilÃ\xa0 tout", "voilÃ\xa0"),  # ftfy repair reaching across (non-breaking) whitespace
        ("voilÃ\xa0 tout", "tout"),
        ("l’arbre “quoted” ﬁsh ＡＢＣ", "l’arbre"),  # ftfy uncurls quotes, splits ligatures, narrows
        ("l’arbre “quoted” ﬁsh ＡＢＣ", "ﬁsh"),
        ("l’arbre “quoted” ﬁsh ＡＢＣ", "ＡＢＣ"),
    ],
)
def test_span_tokens_decode_to_span_text(span_tokenizer, open_clip_tokenizer, text, part):
    out = span_tokenizer(text, {"p": span_of(text, part)})
    assert out.spans["p"] == sorted(out.spans["p"]) and out.spans["p"]
    assert decode(open_clip_tokenizer, out.ids, out.spans["p"]) == squash(open_clip_tokenizer, part)
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()


def test_repeated_words_around_a_repair(span_tokenizer, open_clip_tokenizer):
    # Cleaning gives "a café café café": each occurrence must keep its own tokens.
    text = "a\tcafÃ©  café\ncafÃ© "
    spans = {"0": span_of(text, "cafÃ©"), "1": span_of(text, "café"), "2": span_of(text, "cafÃ©", 1)}
    out = span_tokenizer(text, spans)
    assert out.spans == {"0": [2], "1": [3], "2": [4]}
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()


def test_cleaning_decided_on_the_whole_caption(span_tokenizer, open_clip_tokenizer):
    # In context ftfy repairs the two "â€œ" but leaves "Ã©": the caption can't be cut into runs
    # that clean alone, so it is aligned as a whole; spans still get exactly their tokens.
    text = "ＡＡ\nß..â€œ&a①'éé&\nâ€œ\xa0ﬁ\xa0Ã©"
    assert open_clip_tokenizer.clean_fn(text).endswith('" fi ã©')
    parts = {"wide": "ＡＡ", "quote": "â€œ\xa0", "lig": "ﬁ", "moji": "Ã©"}
    out = span_tokenizer(text, {part: span_of(text, sub) for part, sub in parts.items()})
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()
    decoded = {part: decode(open_clip_tokenizer, out.ids, positions) for part, positions in out.spans.items()}
    assert decoded == {"wide": "aa", "quote": '"', "lig": "fi", "moji": "ã©"}


def test_ambiguous_pairing_is_not_guessed():
    from sapretrain.shards.tokens import _align

    # Which of the three "é" the literal one became is ambiguous: all three cover the whole stretch.
    src = "x&#233;é&#233;y"
    lo, hi = _align(src, range(len(src)), "xéééy")
    assert [src[a:b] for a, b in zip(lo, hi)] == ["x"] + ["&#233;é&#233;"] * 3 + ["y"]
    # A word next to its repair keeps its own letters (difflib pairs them with the repeat).
    src, dst = "cafÃ© café", "café café"
    lo, hi = _align(src, range(len(src)), dst)
    sources = [src[a:b] for a, b, char in zip(lo, hi, dst) if char != " "]  # no token holds a space
    assert sources == ["c", "a", "f", "Ã©", "c", "a", "f", "é"]


def test_pickles(span_tokenizer):
    import pickle

    text = "a fire hydrant"
    clone = pickle.loads(pickle.dumps(span_tokenizer))
    assert clone.name == span_tokenizer.name
    assert clone(text, {"obj": span_of(text, "hydrant")}) == span_tokenizer(text, {"obj": span_of(text, "hydrant")})


def test_svo_spans_and_positions(span_tokenizer, open_clip_tokenizer):
    text = "A man riding a skateboard next to a fire hydrant."
    spans = {"subj": span_of(text, "A man"), "rel": span_of(text, "next to"), "obj": span_of(text, "fire hydrant")}
    out = span_tokenizer(text, spans)
    pieces = [open_clip_tokenizer.decoder[i] for i in out.ids]
    assert pieces[1:3] == ["a</w>", "man</w>"] and out.spans["subj"] == [1, 2]
    assert [pieces[p] for p in out.spans["rel"]] == ["next</w>", "to</w>"]
    assert [pieces[p] for p in out.spans["obj"]] == ["fire</w>", "hydr", "ant</w>"]


def test_part_of_a_word_gets_the_pieces_it_overlaps(span_tokenizer, open_clip_tokenizer):
    text = "a hydrant"  # "hydr" + "ant</w>"
    out = span_tokenizer(text, {"tail": span_of(text, "ant"), "middle": span_of(text, "dra"), "head": (2, 3)})
    assert [open_clip_tokenizer.decoder[out.ids[p]] for p in out.spans["tail"]] == ["ant</w>"]
    assert [open_clip_tokenizer.decoder[out.ids[p]] for p in out.spans["middle"]] == ["hydr", "ant</w>"]
    assert [open_clip_tokenizer.decoder[out.ids[p]] for p in out.spans["head"]] == ["hydr"]


def test_multibyte_char_split_over_pieces(span_tokenizer, open_clip_tokenizer):
    # "δ" is two UTF-8 bytes that BPE keeps as two pieces: both belong to the one character.
    text = "ΟΔΟΣ"
    out = span_tokenizer(text, {"delta": (1, 2)})
    assert len(out.spans["delta"]) == 2
    assert decode(open_clip_tokenizer, out.ids, out.spans["delta"]) == "δ"


def test_whitespace_only_span_is_empty(span_tokenizer):
    text = "a  dog\t sits"
    out = span_tokenizer(text, {"gap": span_of(text, "  "), "tab": span_of(text, "\t "), "dog": span_of(text, "dog")})
    assert out.spans == {"gap": [], "tab": [], "dog": [2]}


def test_truncation_matches_open_clip(span_tokenizer, open_clip_tokenizer):
    text = "a red box is left of a blue box and then " + "very " * 80 + "far away"
    spans = {
        "subj": span_of(text, "red box"),
        "obj": (span_of(text, "very ", 60)[0], len(text)),  # straddles the cut
        "far": span_of(text, "far away"),  # entirely past it
    }
    out = span_tokenizer(text, spans)
    assert out.truncated is True
    assert len(out.ids) == 77 and out.ids[-1] == open_clip_tokenizer.eot_token_id
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()
    assert out.spans["subj"] == [2, 3]
    assert out.spans["obj"] and max(out.spans["obj"]) == 75 and all(p < 76 for p in out.spans["obj"])
    assert out.spans["obj"] == list(range(out.spans["obj"][0], 76))
    assert out.spans["far"] == []


def test_exact_fit_is_not_truncated(span_tokenizer, open_clip_tokenizer):
    text = "dog " * 75  # SOT + 75 + EOT = 77
    out = span_tokenizer(text, {"last": span_of(text, "dog", 74)})
    assert out.truncated is False and len(out.ids) == 77 and out.spans["last"] == [75]
    assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist()


def test_custom_context_length(open_clip_tokenizer):
    short = SpanTokenizer("ViT-B-32", 8, tokenizer=open_clip_tokenizer)
    text = "a man riding a skateboard next to a fire hydrant"
    out = short(text, {"obj": span_of(text, "fire hydrant"), "subj": span_of(text, "man")})
    assert out.ids == open_clip_tokenizer([text], context_length=8)[0].tolist()
    assert out.truncated and out.spans == {"obj": [], "subj": [2]}


def test_random_captions_agree_with_open_clip(span_tokenizer, open_clip_tokenizer):
    """Fuzz: ids match, and each whitespace-separated run's tokens decode back to that run."""
    rng = random.Random(0)
    words = ["dog", "Dog", "HYDRANT", "skateboarding", "café", "naïve", "🐶", "&amp;", "&quot;hi&quot;", "cafÃ©",
             "İzmir", "ΟΔΟΣ", "a", "x1", "42", "it's", "...", "(left)", "über", "東京", "voilÃ\xa0", "a&nbsp;b",
             "x&amp;y", "&lt;b&gt;", "l’arbre", "ﬁsh", "ＡＢＣ", "e\u0301t\u00e9"]
    spaces = [" ", "  ", "\t", "\n", " \r\n "]
    for _ in range(N_RANDOM):
        runs = rng.choices(words, k=rng.randint(1, 12))
        text = rng.choice(["", " "]) + "".join(w + rng.choice(spaces) for w in runs)
        spans, at = {}, 0
        for i, w in enumerate(runs):
            at = text.index(w, at)
            spans[str(i)] = (at, at + len(w))
            at += len(w)
        out = span_tokenizer(text, spans)
        assert span_tokenizer.pad(out.ids) == open_clip_tokenizer([text])[0].tolist(), text
        for i, w in enumerate(runs):
            assert decode(open_clip_tokenizer, out.ids, out.spans[str(i)]) == squash(open_clip_tokenizer, w), (text, w)


@pytest.mark.parametrize("span", [(-1, 2), (0, 8), (3, 3), (4, 2)])
def test_invalid_spans_raise(span_tokenizer, span):
    with pytest.raises(ValueError, match="span bad"):
        span_tokenizer("a dog.", {"bad": span})


def test_pad(span_tokenizer):
    assert span_tokenizer.pad([1, 2]) == [1, 2] + [0] * 75
    with pytest.raises(ValueError):
        span_tokenizer.pad([1] * 78)


class HFTokenizer:  # stands in for open_clip's HF / SigLIP tokenizers, which need downloads
    context_length = 77


def test_unsupported_tokenizers_raise(open_clip_tokenizer):
    import copy

    from open_clip.tokenizer import get_clean_fn, get_reduction_mask_fn

    with pytest.raises(ValueError, match=r"HFTokenizer.*supports only open_clip.tokenizer.SimpleTokenizer"):
        SpanTokenizer("some-hf-model", tokenizer=HFTokenizer())
    canonicalizing = copy.copy(open_clip_tokenizer)  # as SimpleTokenizer(clean="canonicalize")
    canonicalizing.clean_fn = get_clean_fn("canonicalize")
    with pytest.raises(ValueError, match="clean='lower'"):
        SpanTokenizer(tokenizer=canonicalizing)
    reducing = copy.copy(open_clip_tokenizer)  # as SimpleTokenizer(reduction_mask="simple")
    reducing.reduction_fn = get_reduction_mask_fn("simple")
    with pytest.raises(ValueError, match="reduction_mask"):
        SpanTokenizer(tokenizer=reducing)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        SpanTokenizer("ViT-B-3")


def test_disagreement_with_open_clip_raises(open_clip_tokenizer):
    tokenizer = SpanTokenizer("ViT-B-32", tokenizer=open_clip_tokenizer)
    tokenizer("a dog", {})
    ids, pieces = tokenizer._words["dog"]
    tokenizer._words["dog"] = ([ids[0] + 1], pieces)  # a corrupted cached split
    with pytest.raises(RuntimeError, match="disagree with open_clip"):
        tokenizer("a dog", {})
