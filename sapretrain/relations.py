"""Relations: a relation's inverse, whether it is symmetric, and its kind; one table for the project.

    from sapretrain import relations
    relations.inverse("left of")        # "right of"
    relations.inverse("pick up")        # "put down" (an action lemma: longest key, then shorter)
    relations.is_symmetric("touching")  # True: exchanging subject and object gives no negative
    relations.kind("above")             # "spatial" ("action" for a lexicon verb, else "other")

**The one source** is the shipped lexicon ``configs/curation/negatives.yaml`` (package data,
read through ``sapretrain.resources``): ``spatial`` and ``action`` lexicons (``pairs`` read both
ways, ``one_way`` wins over them) and ``swap.symmetric``. Its users:

- curation negatives (``curation/negatives.py``): the rewrite rules, from the run's config (a
  copied config may change the lexicon; the maps are built here either way);
- VSR evaluation (``eval/vsr.py``): ``INVERSE`` and ``SYMMETRIC`` over VSR's relations are this
  table restricted to them;
- the synthetic scenes (``scenes/synthetic.py``): ``OPPOSITE`` of a configuration ("front-left")
  flips each part through ``inverse`` ("in front of" -> "behind", "left of" -> "right of").

A composite "A and B" ("in front of and to the left of") inverts part by part.

**Disagreements resolved** (the three tables before they became this one; docs/curation.md,
"Relations"): ``on top of`` (lexicon ``underneath``, VSR ``beneath``: same meaning; the lexicon's
kept so training negatives do not change), ``off`` (lexicon ``onto``, VSR ``on``: "off" is
mostly a state, whose false counterpart is "on"; "is onto" does not parse), ``at the back of``
(lexicon ``at the front of``, VSR ``in front of``: the lexicon's pair reads back both ways),
``with`` (lexicon ``without``, VSR symmetric without opposite: "without" is false where "with"
holds), ``at`` / ``down`` (lexicon ``away from`` / ``up``, VSR swap: an inverse is the harder
contrast and what training teaches), ``along`` / ``among`` / ``between`` (lexicon symmetric, VSR
swap: "A along B" holds with "B along A"; the object of among/between is a group, so the swap is
no statement), and VSR-only entries (``beyond``, ``contains``, ``surrounding``/``enclosed by``,
``has as a part``/``part of``, ``consists of``, ``facing``/``facing away from``, ``connected to``)
added to the lexicon.

Also here: ``fix_article`` (a/an before a rewritten word), for every rewrite of a caption.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

SHIPPED = "curation/negatives.yaml"  # under the package's configs/
KINDS = ("spatial", "action", "other")


@dataclass
class LexiconConfig:
    pairs: list[list[str]] = field(default_factory=list)  # [a, b]: a → b and b → a
    one_way: dict[str, str] = field(default_factory=dict)  # a → b only (wins over pairs)
    prepositional: dict[str, str] = field(default_factory=dict)  # lemma written as a preposition


@dataclass
class SwapConfig:
    enabled: bool = True
    symmetric: list[str] = field(default_factory=list)  # never swapped (lemma, verb or text)


def norm(text: str) -> str:
    """Lowercase, single-spaced."""
    return " ".join(str(text).lower().split())


def lexicon_map(lex: LexiconConfig, where: str) -> dict[str, str]:
    """Source phrase → inverse phrase (lowercase); a source listed twice in ``pairs`` raises."""
    out: dict[str, str] = {}
    for pair in lex.pairs:
        if len(pair) != 2:
            raise ValueError(f"{where}.pairs: {pair!r} is not a pair")
        a, b = (norm(p) for p in pair)
        for src, dst in ((a, b), (b, a)):
            if src in out and out[src] != dst:
                raise ValueError(f"{where}.pairs: {src!r} has two inverses ({out[src]!r}, {dst!r}); use one_way")
            out[src] = dst
    out.update({norm(k): norm(v) for k, v in lex.one_way.items()})
    return out


class Relations:
    """Inverse, symmetry and kind from one lexicon (``spatial``, ``action``, ``symmetric``)."""

    def __init__(self, spatial: LexiconConfig, action: LexiconConfig, symmetric: list[str]):
        self.spatial = lexicon_map(spatial, "spatial")
        self.action = lexicon_map(action, "action")
        self.prepositional = {norm(k): norm(v) for k, v in action.prepositional.items()}
        self.symmetric = frozenset(norm(s) for s in symmetric)

    def action_key(self, lemma: str) -> str | None:
        """The longest action-lexicon key that ``lemma`` starts with, word-wise ("pick up the" -> "pick up")."""
        words = norm(lemma).split()
        return next((k for n in range(len(words), 0, -1) if (k := " ".join(words[:n])) in self.action), None)

    def inverse(self, relation: str, kind: str | None = None) -> str | None:
        """The inverse phrase, or None. ``kind``: "spatial" / "action" looks in that lexicon only;
        None tries the spatial one, then the action one. "A and B" inverts part by part."""
        rel = norm(relation)
        if kind != "action" and rel in self.spatial:
            return self.spatial[rel]
        if kind != "spatial":
            key = self.action_key(rel)
            if key is not None:
                return self.action[key] + rel[len(key):]
        if " and " in rel:
            parts = [self.inverse(p, kind) for p in rel.split(" and ")]
            if all(parts):
                return " and ".join(parts)
        return None

    def symmetric_key(self, lemma: str, text: str | None = None, action: bool = False) -> str | None:
        """The ``symmetric`` entry that makes a relation symmetric, or None: its lemma, its text,
        its prepositional tails ("sit between" -> "between") and, for an action, its verb."""
        words = norm(lemma).split()
        keys = [norm(lemma)] + ([norm(text)] if text is not None else [])
        keys += [" ".join(words[k:]) for k in range(1, len(words))]
        if action and words:
            keys.append(words[0])
        return next((k for k in keys if k in self.symmetric), None)

    def is_symmetric(self, relation: str) -> bool:
        """Exchanging subject and object gives no negative (same statement, or no statement)."""
        return self.symmetric_key(relation) is not None

    def kind(self, relation: str) -> str:
        """``spatial`` (a spatial-lexicon phrase, or "A and B" of them), ``action`` (starts with an
        action-lexicon verb), else ``other``."""
        rel = norm(relation)
        parts = rel.split(" and ")
        if rel in self.spatial or all(p in self.spatial for p in parts):
            return "spatial"
        if self.action_key(rel) is not None or (rel.split() and rel.split()[0] in self.prepositional):
            return "action"
        return "other"


@lru_cache(maxsize=1)
def shipped() -> Relations:
    """The ``Relations`` of the shipped lexicon (read once)."""
    from sapretrain.config import from_dict, read_yaml
    from sapretrain.resources import config_path

    data = read_yaml(config_path(SHIPPED))
    swap = from_dict(SwapConfig, data.get("swap") or {}, "swap.")
    return Relations(from_dict(LexiconConfig, data.get("spatial") or {}, "spatial."),
                     from_dict(LexiconConfig, data.get("action") or {}, "action."), swap.symmetric)


def inverse(relation: str, kind: str | None = None) -> str | None:
    """``Relations.inverse`` of the shipped lexicon."""
    return shipped().inverse(relation, kind)


def is_symmetric(relation: str) -> bool:
    """``Relations.is_symmetric`` of the shipped lexicon."""
    return shipped().is_symmetric(relation)


def kind(relation: str) -> str:
    """``Relations.kind`` of the shipped lexicon."""
    return shipped().kind(relation)


WORD = re.compile(r"[\w'-]+")


def fix_article(text: str, at: int) -> str:
    """a/an agreement of an article directly before position ``at`` with the word starting there."""
    m = re.search(r"\b(a|an|A|An)(\s+)$", text[:at])
    nxt = WORD.match(text, at)
    if m is None or nxt is None:
        return text
    word = nxt.group(0).lower()
    vowel = word[0] in "aeiou" and not word.startswith(("uni", "use", "usu", "one", "eu"))
    vowel = vowel or word.startswith(("hour", "honest", "heir"))
    art = m.group(1)
    want = ("an" if vowel else "a")
    if art.lower() == want:
        return text
    want = want.capitalize() if art[0].isupper() else want
    return text[: m.start(1)] + want + text[m.end(1):]
