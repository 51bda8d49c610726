"""Negative captions: the same subject and object with the inverse relation (SA-CLIP §2.3.3).

    cfg = load_negatives_config("configs/curation/negatives.yaml")
    summary = run_stage(NegativeStage(cfg), "samples.jsonl", "with_neg.jsonl")

Input: triplet-level samples ``{"id", "caption", "triplet": {"subj", "rel", "obj"}, ...}`` (spans
into ``caption``; ``rel`` has ``kind`` and usually ``lemma``, ``subj``/``obj`` usually ``head``).
Output: the same record plus ``negative = {"caption", "triplet"}`` (docs/manifest.md; the triplet
is the extractor's, with spans into the negative caption) and ``negative_method``
(``inverse``, ``replace``, ``swap`` or ``llm``).

**Rules** (``mode="rules"``): every candidate is made, then validated, checked for fluency and
chosen from (below).

1. *Inverse* from the lexicon (``configs/curation/negatives.yaml``, the project's one relations
   table: maps and symmetry matching are ``sapretrain.relations``'). An **action** relation looks
   up its lemma, longest key first: the full lemma ("attach to"), verb + particle ("pick up"),
   the verb ("hold"). The verb word is re-inflected in the caption's form (``-ing``, ``-s``,
   past, base; :func:`inflect`), the other key words are replaced in place and a target's extra
   words are inserted after the verb: "a man picking up a ball" → "a man putting down a ball",
   "wearing a hat" → "taking off a hat". A relation with the lemma of an action but written as
   a preposition uses ``action.prepositional`` (empty in the shipped table: "with", "have" and
   clothing "in" have no opposite, and "without" is a word a text-only model reads off).
   Otherwise the longest **spatial** phrase of the lexicon inside the relation span is replaced
   ("to the left of" → "to the right of", "sitting on" → "sitting under", "walking into" →
   "walking out of"); for an action relation the phrase must be part of the lemma, so the agent
   "by" of a passive ("ridden by") is never touched. Only the relation words change.
2. *Replacements* (``replace.groups``): that spatial phrase replaced by each other phrase of a
   group it is in; a group holds phrases that exclude each other in one scene, never synonyms.
   Likewise the relation's verb (``replace.verbs``, re-inflected): each other verb of a group
   of verbs that exclude each other for one subject, the postures ("sitting on a bench" →
   "standing on a bench", "lying on a bench"). Only for a subject that acts: one whose head noun
   is the subject of ``replace.agent_verbs`` relations ("wearing", "eating", …) in the chunk
   (:meth:`Rules.agents`). For a thing, sit / stand / lie all say where it is ("a toilet
   sitting in a bathroom" = "standing in a bathroom"), so the rewrite would be true.
3. *Swap* subject and object, if the relation is not listed as symmetric (``swap.symmetric``,
   matched against the lemma, its verb and the relation text) and is not an action written as a
   preposition: the two noun phrases are exchanged in the text together with their determiners /
   numbers / possessives, so "Two dogs are chasing a cat" → "A cat is chasing two dogs" (case of
   the first word, a/an, and the copula or present-tense verb after the new first phrase are
   fixed for its number).
4. No candidate: the record is dropped ``no_negative`` (detail: why).

**LLM** (``mode="llm"``): ``sapretrain.curation.llm.generate_negatives_llm`` writes one candidate;
``None`` drops ``llm_failed``.

**Validation** (both modes, every candidate): the negative caption is parsed with the SVO
extractor and kept only if one of its triplets fits. Subject and object match by head noun: the
extractor's ``head`` lemma or the span's last word (lowercased), either way. An *inverse* or
*replace* needs a triplet with the original subject and object and a relation lemma different
from the original's; a *swap* needs the negative's subject = the original object and its object
= the original subject (any relation); an *LLM* negative may be either (the inverse shape is
preferred). The negative's ``triplet`` is that re-extracted triplet. A record with no valid
candidate is dropped ``negative_invalid`` with the first candidate's detail: ``no_triplet``
(nothing extracted), ``lost_subject`` (no triplet has the expected subject), ``lost_object``
(… and object), ``same_relation``, ``same_caption`` or ``unattested: <bigrams>`` (fluency).

**Fluency** (``fluency``): a candidate that creates a word bigram that the chunk's captions and
the ``fluency.corpus`` files never have, although both words are common enough that they should
(``negeval.NgramStats.unattested``), is rejected: "standing under front of", "holding off".

**Choice** (``refine``; ``negeval.refine_choices``): in a chunk with at least
``refine.min_samples`` records with a valid candidate, the candidates are chosen jointly so that
the summed text-feature difference between captions and negatives is as short as possible (a
linear blind probe has nothing to learn), then probes cross-fitted over caption folds score each
choice held out and the most detectable are dropped ``negative_detectable`` (detail ``blind
margin M``) down to ``refine.max_blind_accuracy``, keeping at least ``refine.min_kept``. Smaller
chunks take the candidate most plausible by the chunk's (subject, relation, object) counts.
Everything is deterministic, so a resumed run writes the same output.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sapretrain.config import load_config
from sapretrain.curation.lexicon import QUANTITY_NOUNS
from sapretrain.relations import LexiconConfig, Relations, SwapConfig, lexicon_map  # noqa: F401 (re-exported)
from sapretrain.relations import fix_article as _fix_article
from sapretrain.relations import norm as _norm

DEFAULT_CONFIG = "configs/curation/negatives.yaml"  # shipped with the package (sapretrain.resources)
MODES = ("rules", "llm")


# --------------------------------------------------------------------------- config


@dataclass
class ReplaceConfig:
    groups: list[list[str]] = field(default_factory=list)  # mutually exclusive spatial phrases
    verbs: list[list[str]] = field(default_factory=list)   # mutually exclusive verbs (lemmas): postures
    # A subject that is the subject of one of these somewhere in the chunk acts (a person, an
    # animal): only its verb is replaced (for a thing, sit / stand / lie all mean "is placed").
    agent_verbs: list[str] = field(default_factory=list)
    thing_verbs: list[str] = field(default_factory=list)  # their objects are things (ridden, worn)
    agent_evidence: int = 2  # times a head noun must act (Rules.agents)


@dataclass
class FluencyConfig:
    enabled: bool = True
    min_expected: float = 3.0  # an unseen new bigram is rejected when it was expected this often
    corpus: list[str] = field(default_factory=list)  # extra caption files (JSONL "caption" or text lines)


@dataclass
class RefineConfig:
    enabled: bool = True
    encoder: str = "minilm+ngram"  # negeval encoder: ngram, minilm, a sentence-transformers folder, a+b
    folds: int = 2
    rounds: int = 3
    max_blind_accuracy: float = 0.6
    min_kept: float = 0.86  # of the chunk's samples with a valid candidate
    min_samples: int = 200  # smaller chunks are not refined
    device: str = "auto"


@dataclass
class NegativesConfig:
    spatial: LexiconConfig = field(default_factory=LexiconConfig)
    action: LexiconConfig = field(default_factory=LexiconConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    fluency: FluencyConfig = field(default_factory=FluencyConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    model: str | None = None  # spaCy model for validation (default: svo.load_nlp's choice)
    batch_size: int = 256


def load_negatives_config(path: str | Path | None = DEFAULT_CONFIG, overrides: list[str] | None = None) -> NegativesConfig:
    cfg = load_config(NegativesConfig, path, overrides)
    lexicon_map(cfg.spatial, "spatial")
    lexicon_map(cfg.action, "action")
    replacements(cfg.replace)
    replacements(cfg.replace, "verbs")
    if cfg.refine.folds < 2:
        raise ValueError("refine.folds must be at least 2 (a probe never scores its own training pairs)")
    if not 0.5 <= cfg.refine.max_blind_accuracy <= 1.0 or not 0.0 <= cfg.refine.min_kept <= 1.0:
        raise ValueError("refine.max_blind_accuracy must be in [0.5, 1] and refine.min_kept in [0, 1]")
    return cfg


def replacements(cfg: ReplaceConfig, key: str = "groups") -> dict[str, list[str]]:
    """Phrase (``key="verbs"``: verb lemma) → the other members of every group it is in (first-seen order)."""
    out: dict[str, list[str]] = {}
    for group in getattr(cfg, key):
        phrases = [_norm(p) for p in group]
        if len(phrases) < 2 or len(set(phrases)) != len(phrases):
            raise ValueError(f"replace.{key}: {group!r} needs at least two different phrases")
        if key == "verbs" and any(len(p.split()) != 1 for p in phrases):
            raise ValueError(f"replace.verbs: {group!r}: one verb lemma per entry")
        for p in phrases:
            out.setdefault(p, [])
            out[p] += [q for q in phrases if q != p and q not in out[p]]
    return out


# --------------------------------------------------------------------------- inflection

# Irregular forms (3sg, past, past participle, -ing) of verbs the lexicons use or meet.
IRREGULAR = {
    "take": ("takes", "took", "taken", "taking"), "throw": ("throws", "threw", "thrown", "throwing"),
    "catch": ("catches", "caught", "caught", "catching"), "leave": ("leaves", "left", "left", "leaving"),
    "give": ("gives", "gave", "given", "giving"), "put": ("puts", "put", "put", "putting"),
    "get": ("gets", "got", "gotten", "getting"), "lose": ("loses", "lost", "lost", "losing"),
    "sell": ("sells", "sold", "sold", "selling"), "buy": ("buys", "bought", "bought", "buying"),
    "hold": ("holds", "held", "held", "holding"), "go": ("goes", "went", "gone", "going"),
    "lead": ("leads", "led", "led", "leading"), "win": ("wins", "won", "won", "winning"),
    "sit": ("sits", "sat", "sat", "sitting"), "stand": ("stands", "stood", "stood", "standing"),
    "ride": ("rides", "rode", "ridden", "riding"), "eat": ("eats", "ate", "eaten", "eating"),
    "fly": ("flies", "flew", "flown", "flying"), "run": ("runs", "ran", "run", "running"),
    "wear": ("wears", "wore", "worn", "wearing"), "lie": ("lies", "lay", "lain", "lying"),
    "shut": ("shuts", "shut", "shut", "shutting"), "begin": ("begins", "began", "begun", "beginning"),
    "be": ("is", "was", "been", "being"), "have": ("has", "had", "had", "having"),
    "do": ("does", "did", "done", "doing"), "make": ("makes", "made", "made", "making"),
    "find": ("finds", "found", "found", "finding"), "bring": ("brings", "brought", "brought", "bringing"),
    "send": ("sends", "sent", "sent", "sending"), "hang": ("hangs", "hung", "hung", "hanging"),
    "tie": ("ties", "tied", "tied", "tying"), "untie": ("unties", "untied", "untied", "untying"),
    "lay": ("lays", "laid", "laid", "laying"),
}
# Verbs that double their last consonant (drop → dropped, dropping).
DOUBLING = frozenset(
    "drop stop plan grab hug plug unplug wrap unwrap chop shop jog drag pat tap nap rob rub slip trip "
    "ship skip hop pet step admit ban swim dig hit cut set spin".split()
)
FORMS = ("base", "3sg", "past", "pp", "ing")


def inflect(lemma: str, form: str) -> str:
    """``lemma`` in ``form`` (one of ``FORMS``): inflect("drop", "ing") == "dropping"."""
    if form == "base":
        return lemma
    if lemma in IRREGULAR:
        return IRREGULAR[lemma][{"3sg": 0, "past": 1, "pp": 2, "ing": 3}[form]]
    if form == "3sg":
        if lemma.endswith(("s", "sh", "ch", "x", "z", "o")):
            return lemma + "es"
        if len(lemma) > 1 and lemma.endswith("y") and lemma[-2] not in "aeiou":
            return lemma[:-1] + "ies"
        return lemma + "s"
    if form == "ing":
        if lemma.endswith("ie"):
            return lemma[:-2] + "ying"
        if lemma.endswith("e") and not lemma.endswith(("ee", "ye", "oe")):
            return lemma[:-1] + "ing"
        return lemma + (lemma[-1] if lemma in DOUBLING else "") + "ing"
    if lemma.endswith("e"):
        return lemma + "d"
    if len(lemma) > 1 and lemma.endswith("y") and lemma[-2] not in "aeiou":
        return lemma[:-1] + "ied"
    return lemma + (lemma[-1] if lemma in DOUBLING else "") + "ed"


def verb_form(word: str, lemma: str, passive: bool) -> str:
    """The form of ``word`` (a written form of ``lemma``); past vs participle by ``passive``."""
    w = word.lower()
    if w == lemma:
        return "base"
    if w.endswith("ing"):
        return "ing"
    if w == inflect(lemma, "3sg") or (w.endswith("s") and not w.endswith("ss")):
        return "3sg"
    return "pp" if passive else "past"


def _match_case(src: str, new: str) -> str:
    return new[:1].upper() + new[1:] if src[:1].isupper() else new


# --------------------------------------------------------------------------- noun phrases

DETERMINERS = frozenset(
    """
    a an the this that these those his her its their my our your some several many few both
    each every another one two three four five six seven eight nine ten eleven twelve
    multiple numerous various
    """.split()
)
PLURAL_DETS = frozenset(
    "these those several many few both two three four five six seven eight nine ten eleven twelve "
    "multiple numerous various".split()
)
SINGULAR_DETS = frozenset("a an one this that another each every".split())
IRREGULAR_PLURALS = frozenset("people men women children persons sheep deer cattle police geese mice teeth feet".split())
COPULA_NUMBER = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
                 "does": "do", "do": "does"}
WORD = re.compile(r"[\w'-]+")


def _extend_np(caption: str, start: int) -> int:
    """Start of the noun phrase at ``start`` with what moves with it: determiners / numbers, a
    possessive ("children's toys") and a collective noun ("a group of people")."""
    for _ in range(4):
        m = re.search(r"([\w']+)\s+$", caption[:start])
        if m is not None and (m.group(1).lower() in DETERMINERS or m.group(1).lower().endswith(("'s", "s'"))):
            start = m.start(1)
            continue
        m = re.search(r"([\w']+)\s+of\s+$", caption[:start])
        if m is not None and m.group(1).lower() in QUANTITY_NOUNS:
            start = m.start(1)
            continue
        break
    return start


def is_plural(np_text: str, head: str | None = None) -> bool:
    """Number of a noun phrase (with its determiner, if any): determiner first, then the head."""
    words = WORD.findall(np_text.lower())
    if not words:
        return False
    if words[0] in PLURAL_DETS:
        return True
    if words[0] in SINGULAR_DETS:
        return False
    last = words[-1]
    if last in IRREGULAR_PLURALS:
        return True
    if head:
        return last != head.lower() and last.endswith("s")
    return last.endswith("s") and not last.endswith(("ss", "us", "is"))


# --------------------------------------------------------------------------- rules


@dataclass
class Candidate:
    caption: str
    method: str  # inverse | replace | swap


class Rules:
    """Negative caption candidates from the lexicons of a ``NegativesConfig``."""

    def __init__(self, cfg: NegativesConfig):
        self.relations = Relations(cfg.spatial, cfg.action, cfg.swap.symmetric)  # the run's lexicon
        self.spatial, self.action = self.relations.spatial, self.relations.action
        self.prepositional = self.relations.prepositional
        self.swap_enabled = cfg.swap.enabled
        self.replace = replacements(cfg.replace)
        self.replace_verbs = replacements(cfg.replace, "verbs")
        self.agent_verbs = frozenset(_norm(v) for v in cfg.replace.agent_verbs)
        self.thing_verbs = frozenset(_norm(v) for v in cfg.replace.thing_verbs)
        self.agent_evidence = cfg.replace.agent_evidence
        phrases = sorted(set(self.spatial) | set(self.replace), key=len, reverse=True)
        self.spatial_re = re.compile(r"(?<![\w'])(" + "|".join(re.escape(p) for p in phrases) + r")(?![\w'])",
                                     re.IGNORECASE) if phrases else None

    def candidates(self, caption: str, triplet: dict, agents: frozenset[str] = frozenset()) -> list[Candidate] | str:
        """Every rule candidate, inverse first, then replacements, then the swap; or the reason
        (``drop_detail``) why there is none. ``agents``: head nouns known to act (:meth:`agents`);
        only their verbs are replaced (``replace.verbs``)."""
        rel = triplet["rel"]
        lemma = _norm(rel.get("lemma") or rel["text"])
        out = []
        text = self.inverse(caption, triplet, lemma)
        if text is not None:
            out.append(Candidate(text, "inverse"))
        m = self._spatial_match(caption, rel["start"], rel["end"], lemma, rel.get("kind") == "action")
        if m is not None:
            for alt in self.replace.get(_norm(m.group(0)), []):
                new = _fix_article(caption[: m.start()] + _match_case(m.group(0), alt) + caption[m.end():], m.start())
                out.append(Candidate(new, "replace"))
        verb = lemma.split()[0] if lemma.split() else ""
        if (verb in self.replace_verbs and _head(triplet["subj"]) in agents
                and self._starts_with_verb(rel["text"], verb)):
            for alt in self.replace_verbs[verb]:
                new = self._replace_verb(caption, rel["start"], rel["end"], verb, alt)
                if new is not None:
                    out.append(Candidate(new, "replace"))
        why = "no inverse"
        if self.swap_enabled:
            symmetric = self._symmetric(rel, lemma)
            if symmetric:
                why = f"symmetric: {symmetric}"
            elif rel.get("kind") == "action" and not self._starts_with_verb(rel["text"], verb):
                # An action written as a preposition ("a man in a white shirt", lemma "wear"):
                # exchanging the phrases gives nonsense ("a white shirt in a man"), not a negative.
                why = f"implied verb: {verb}"
            else:
                text = swap(caption, triplet)
                if text is not None:
                    out.append(Candidate(text, "swap"))
                why = "overlapping spans"
        seen: set[str] = {_norm(caption)}
        unique = [c for c in out if not (_norm(c.caption) in seen or seen.add(_norm(c.caption)))]
        return unique or why

    def agents(self, triplets: Iterable[dict]) -> frozenset[str]:
        """Head nouns that act, by the evidence of ``triplets``: the subject of an ``agent_verbs``
        relation written as a verb ("wearing", not the "with" / "in" read as ``wear``) at least
        ``agent_evidence`` times, and more often than the object of a ``thing_verbs`` one (what is
        ridden or worn: "people on motorcycles riding across a bridge" parses a motorcycle that
        rides, "riding a motorcycle" is more frequent). A parse error seen once makes no agent."""
        acts, things = Counter(), Counter()
        for t in triplets:
            verb = _rel_key(t["rel"]).split(" ")[0]
            if not self._starts_with_verb(t["rel"]["text"], verb):
                continue
            if verb in self.agent_verbs:
                acts[_head(t["subj"])] += 1
            if verb in self.thing_verbs:
                things[_head(t["obj"])] += 1
        return frozenset(h for h, n in acts.items() if n >= self.agent_evidence and n > things[h])

    def _symmetric(self, rel: dict, lemma: str) -> str | None:
        return self.relations.symmetric_key(lemma, rel["text"], rel.get("kind") == "action")

    # ---- inverse

    def inverse(self, caption: str, triplet: dict, lemma: str) -> str | None:
        rel = triplet["rel"]
        start, end = rel["start"], rel["end"]
        span = caption[start:end]
        lemma_words = lemma.split()
        if rel.get("kind") == "action" or (lemma_words and lemma_words[0] in self.prepositional):
            if lemma in self.prepositional and not self._starts_with_verb(span, lemma):
                return caption[:start] + _match_case(span, self.prepositional[lemma]) + caption[end:]
            if self._starts_with_verb(span, lemma_words[0] if lemma_words else ""):
                for n in range(len(lemma_words), 0, -1):
                    key = " ".join(lemma_words[:n])
                    if key in self.action:
                        new = self._replace_verb(caption, start, end, key, self.action[key])
                        if new is not None:
                            return new
        return self._replace_spatial(caption, start, end, lemma, rel.get("kind") == "action")

    @staticmethod
    def _starts_with_verb(span: str, verb: str) -> bool:
        first = WORD.match(span)
        if first is None or not verb:
            return False
        w = first.group(0).lower()
        return w == verb or w in {inflect(verb, f) for f in FORMS} or w[:3] == verb[:3]

    def _replace_verb(self, caption: str, start: int, end: int, key: str, target: str) -> str | None:
        words = list(WORD.finditer(caption, start, end))
        if not words:
            return None
        src_verb, *src_rest = key.split()
        dst_verb, *dst_rest = target.split()
        passive = any(w.group(0).lower() == "by" for w in words[1:]) or bool(
            re.search(r"\b(is|are|was|were|been|being|be|has|have|had)\s+$", caption[:start], re.IGNORECASE))
        form = verb_form(words[0].group(0), src_verb, passive)
        edits = [(words[0].start(), words[0].end(), _match_case(words[0].group(0), inflect(dst_verb, form)))]
        # The key's other words (particles, prepositions), in order, after the verb.
        found, i = [], 1
        for want in src_rest:
            while i < len(words) and words[i].group(0).lower() != want:
                i += 1
            if i == len(words):
                return None
            found.append(words[i])
            i += 1
        rest = " ".join(dst_rest)
        if found:
            edits.append((found[0].start(), found[0].end(), rest))
            edits += [(w.start(), w.end(), "") for w in found[1:]]
        elif rest:
            edits[0] = (edits[0][0], edits[0][1], edits[0][2] + " " + rest)
        out = caption
        for s, e, new in sorted(edits, reverse=True):
            if not new:  # a deleted word takes one neighbouring space with it
                if out[s - 1 : s] == " ":
                    s -= 1
                elif out[e : e + 1] == " ":
                    e += 1
            out = out[:s] + new + out[e:]
        return _fix_article(out, edits[0][0]) if edits[0][0] == words[0].start() else out

    def _spatial_match(self, caption: str, start: int, end: int, lemma: str, action: bool,
                       table: dict | None = None) -> re.Match | None:
        """The relation's last, longest spatial phrase of ``table`` (default: the lexicon and the
        replacement groups) inside ``caption[start:end]``."""
        if self.spatial_re is None:
            return None
        matches = list(self.spatial_re.finditer(caption, start, end))
        if table is not None:
            matches = [m for m in matches if _norm(m.group(0)) in table]
        if action:
            # Only a preposition that belongs to the relation (not the agent "by" of a passive).
            verbless = " ".join(lemma.split()[1:])
            matches = [m for m in matches if re.search(rf"(?<!\S){re.escape(_norm(m.group(0)))}(?!\S)", verbless)]
        if not matches:
            return None
        return max(matches, key=lambda m: (m.end(), m.end() - m.start()))

    def _replace_spatial(self, caption: str, start: int, end: int, lemma: str, action: bool) -> str | None:
        m = self._spatial_match(caption, start, end, lemma, action, self.spatial)
        if m is None:
            return None
        new = _match_case(m.group(0), self.spatial[_norm(m.group(0))])
        return _fix_article(caption[: m.start()] + new + caption[m.end():], m.start())


def swap(caption: str, triplet: dict) -> str | None:
    """``caption`` with the subject and object phrases exchanged (see the module docstring)."""
    subj, obj = triplet["subj"], triplet["obj"]
    a = (_extend_np(caption, subj["start"]), subj["end"], subj.get("head"))
    b = (_extend_np(caption, obj["start"]), obj["end"], obj.get("head"))
    (x0, x1, x_head), (y0, y1, y_head) = sorted((a, b))
    if x1 > y0:
        return None
    first, middle, second = caption[x0:x1], caption[x1:y0], caption[y0:y1]
    if x0 == 0 and first[:1].isupper() and (WORD.match(first).group(0).lower() in DETERMINERS
                                            or first.split()[0][1:].islower()):
        first = first[0].lower() + first[1:]
    if x0 == 0 and caption[:1].isupper():
        second = second[:1].upper() + second[1:]
    rel = triplet["rel"]
    verb_first = rel.get("kind") == "action" and caption[x1:rel["start"]].strip() == "" and bool(
        rel.get("lemma")) and Rules._starts_with_verb(rel["text"], rel["lemma"].split()[0])
    if is_plural(caption[y0:y1], y_head) != is_plural(caption[x0:x1], x_head):
        middle = _agree(middle, is_plural(caption[y0:y1], y_head), verb_first)
    out = caption[:x0] + second + middle + first + caption[y1:]
    out = _fix_article(out, x0 + len(second) + len(middle))
    return _fix_article(out, x0)


def _agree(middle: str, plural: bool, verb_first: bool) -> str:
    """The copula / auxiliary, or the relation's present-tense verb (``verb_first``: the middle
    starts with it), right after a new subject, in that subject's number."""
    m = WORD.search(middle)
    if m is None or middle[: m.start()].strip():
        return middle
    w = m.group(0)
    low = w.lower()
    if low in COPULA_NUMBER:
        singular = low in ("is", "was", "has", "does")
        new = COPULA_NUMBER[low] if singular == plural else low
    elif not verb_first or low.endswith(("ing", "ed")):
        return middle
    elif plural and low.endswith("s") and not low.endswith("ss"):
        new = low[:-2] if low.endswith(("shes", "ches", "xes", "oes")) else low[:-1]
    elif not plural and not low.endswith("s"):
        new = inflect(low, "3sg")
    else:
        return middle
    return middle[: m.start()] + _match_case(w, new) + middle[m.end():]


# --------------------------------------------------------------------------- validation


def _keys(span: dict) -> set[str]:
    words = WORD.findall(span.get("text", "").lower())
    keys = {words[-1]} if words else set()
    if span.get("head"):
        keys.add(str(span["head"]).lower())
    return keys


def _same(a: dict, b: dict) -> bool:
    return bool(_keys(a) & _keys(b))


def _rel_key(rel: dict) -> str:
    return _norm(rel.get("lemma") or rel["text"])


def validate(original: dict, triplets: list[dict], method: str) -> dict | str:
    """The triplet of the negative that fits ``method`` (see module docstring), or the failure detail."""
    if not triplets:
        return "no_triplet"
    subj, obj, rel = original["subj"], original["obj"], _rel_key(original["rel"])
    shapes = {"inverse": [(subj, obj, True)], "replace": [(subj, obj, True)], "swap": [(obj, subj, False)],
              "llm": [(subj, obj, True), (obj, subj, False)]}[method]
    worst = 0  # 0 lost_subject, 1 lost_object, 2 same_relation
    for want_subj, want_obj, need_new_rel in shapes:
        for t in triplets:
            if not _same(t["subj"], want_subj):
                continue
            worst = max(worst, 1)
            if not _same(t["obj"], want_obj):
                continue
            worst = 2
            if need_new_rel and _rel_key(t["rel"]) == rel:
                continue
            return t
    return ("lost_subject", "lost_object", "same_relation")[worst]


def with_lemma(record: dict) -> dict:
    """The record's triplet with ``rel.lemma``: a manifest triplet (what make_samples writes,
    docs/manifest.md) keeps the relation's lemma in the record's ``relation`` field, and the
    lexicons, the symmetric list, validation and the plausibility counts look relations up by
    lemma ("hold", not "holding"). A triplet that has its lemma keeps it."""
    triplet = record["triplet"]
    lemma = record.get("relation")
    if triplet["rel"].get("lemma") or not isinstance(lemma, str) or not lemma.strip():
        return triplet
    return {**triplet, "rel": {**triplet["rel"], "lemma": lemma}}


def check_record(record: dict) -> str | None:
    """Why ``record`` cannot be used (``bad_record`` detail), or ``None``."""
    caption, triplet = record.get("caption"), record.get("triplet")
    if not isinstance(caption, str) or not caption.strip():
        return "no caption"
    if not isinstance(triplet, dict):
        return "no triplet"
    for part in ("subj", "rel", "obj"):
        span = triplet.get(part)
        if not isinstance(span, dict) or not all(isinstance(span.get(k), int) for k in ("start", "end")):
            return f"bad {part} span"
        if caption[span["start"] : span["end"]] != span.get("text") or not span.get("text"):
            return f"{part} span does not match the caption"
    return None


# --------------------------------------------------------------------------- stage


class NegativeStage:
    """``run_stage`` stage: adds ``negative`` and ``negative_method`` or drops the record."""

    name = "negatives"

    def __init__(self, cfg: NegativesConfig, mode: str = "rules", llm_config: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "llm" and not llm_config:
            raise ValueError("mode 'llm' needs an LLM config (configs/curation/llm.yaml)")
        self.cfg, self.mode, self.llm_config = cfg, mode, llm_config
        self.rules = Rules(cfg)
        self.nlp = None
        self.client = None
        self.encoder = None  # refinement's blind probe encoder, made on first use
        self.corpus = None   # NgramStats of fluency.corpus, read in setup

    def fingerprint(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode, "config": asdict(self.cfg)}
        if self.mode == "llm":
            from sapretrain import storage

            out["llm_config_sha256"] = hashlib.sha256(storage.read_bytes(self.llm_config)).hexdigest()
        return out

    def setup(self) -> None:
        from sapretrain.curation.svo import load_nlp

        if self.nlp is None:
            self.nlp = load_nlp(self.cfg.model)
        if self.cfg.fluency.enabled and self.cfg.fluency.corpus and self.corpus is None:
            from sapretrain.curation.negeval import NgramStats, read_captions

            self.corpus = NgramStats(read_captions(self.cfg.fluency.corpus))
        if self.mode == "llm" and self.client is None:
            from sapretrain.curation import llm

            loader = getattr(llm, "load_llm_config", None)
            llm_cfg = loader(self.llm_config) if loader else load_config(llm.LLMConfig, self.llm_config)
            self.client = llm.LLMClient(llm_cfg)

    def process(self, records: list[dict]) -> list[dict]:
        self.setup()  # idempotent: loads only what is missing
        out: list[dict] = [dict(r) for r in records]
        todo: list[tuple[int, str, str]] = []  # (index, negative caption, method), candidates in order
        usable = []
        for i, r in enumerate(out):
            problem = check_record(r)
            if problem:
                r.update(drop_reason="bad_record", drop_detail=problem)
            else:
                usable.append(i)
        if self.mode == "rules":
            agents = self.rules.agents(with_lemma(out[i]) for i in usable)
            for i in usable:
                cands = self.rules.candidates(out[i]["caption"], with_lemma(out[i]), agents)
                if isinstance(cands, str):
                    out[i].update(drop_reason="no_negative", drop_detail=cands)
                else:
                    todo += [(i, c.caption, c.method) for c in cands]
        else:
            from sapretrain.curation.llm import generate_negatives_llm

            texts = generate_negatives_llm(self.client, [out[i] for i in usable]) if usable else []
            if len(texts) != len(usable):
                raise RuntimeError(f"generate_negatives_llm returned {len(texts)} texts for {len(usable)} samples")
            for i, text in zip(usable, texts):
                if not isinstance(text, str) or not text.strip():
                    out[i].update(drop_reason="llm_failed")
                else:
                    todo.append((i, text.strip(), "llm"))
        valid = self._validate(out, todo)
        self._choose(out, valid)
        return out

    def _validate(self, out: list[dict], todo: list[tuple[int, str, str]]) -> dict[int, list[tuple[str, str, dict]]]:
        """Per record index, its candidates that re-parse to a fitting triplet and are fluent, as
        (caption, method, triplet); a record left with none gets the first candidate's failure."""
        from sapretrain.curation.negeval import NgramStats
        from sapretrain.curation.svo import extract_triplets

        stats = None
        if self.cfg.fluency.enabled:
            stats = NgramStats(dict.fromkeys(r["caption"] for r in out if isinstance(r.get("caption"), str)))
            if self.corpus is not None:
                stats = stats + self.corpus
        valid: dict[int, list[tuple[str, str, dict]]] = {}
        failure: dict[int, dict] = {}
        docs = self.nlp.pipe([c for _, c, _ in todo], batch_size=self.cfg.batch_size)
        for (i, caption, method), doc in zip(todo, docs):
            r = out[i]
            if _norm(caption) == _norm(r["caption"]):
                failure.setdefault(i, dict(drop_reason="negative_invalid", drop_detail="same_caption",
                                           negative_caption=caption))
                continue
            found = validate(with_lemma(r), extract_triplets(doc), method)
            if isinstance(found, str):
                failure.setdefault(i, dict(drop_reason="negative_invalid", drop_detail=found,
                                           negative_caption=caption, negative_method=method))
                continue
            bad = stats.unattested(caption, r["caption"], self.cfg.fluency.min_expected) if stats else []
            if bad:
                failure.setdefault(i, dict(drop_reason="negative_invalid", negative_caption=caption,
                                           negative_method=method,
                                           drop_detail="unattested: " + ", ".join(" ".join(b) for b in bad)))
                continue
            valid.setdefault(i, []).append((caption, method, found))
        for i, why in failure.items():
            if i not in valid:
                out[i].update(why)
        return valid

    def _choose(self, out: list[dict], valid: dict[int, list[tuple[str, str, dict]]]) -> None:
        """Pick one candidate per record: the most plausible by the chunk's (subject, relation,
        object) counts, then (``refine``) the hardest for a cross-fitted blind probe; drop the most
        detectable (``negative_detectable``) down to ``refine.max_blind_accuracy``."""
        svo = SvoCounts(with_lemma(r) for r in out if r.get("drop_reason") != "bad_record")
        order = sorted(valid)
        cands = {i: sorted(valid[i], key=lambda c: -svo.plausibility(c[2])) for i in order}
        choice = {i: 0 for i in order}
        refine = self.cfg.refine
        if refine.enabled and len(order) >= max(refine.min_samples, refine.folds):
            from sapretrain.curation.negeval import drop_most_detectable, make_encoder, refine_choices

            if self.encoder is None:
                self.encoder = make_encoder(refine.encoder, refine.device)
            picked, m = refine_choices([out[i]["caption"] for i in order], [[c[0] for c in cands[i]] for i in order],
                                       self.encoder, refine.folds, refine.rounds)
            choice = dict(zip(order, picked))
            for k in drop_most_detectable(m, refine.max_blind_accuracy, refine.min_kept):
                i = order[k]
                caption, method, _ = cands[i][choice[i]]
                out[i].update(drop_reason="negative_detectable", drop_detail=f"blind margin {m[k]:.2f}",
                              negative_caption=caption, negative_method=method)
        for i in order:
            if "drop_reason" in out[i]:
                continue
            caption, method, found = cands[i][choice[i]]
            out[i]["negative"] = {"caption": caption, "triplet": found}
            out[i]["negative_method"] = method


class SvoCounts:
    """(subject, relation, object) head counts of a chunk's triplets: how plausible a rewrite is."""

    def __init__(self, triplets):
        self.sro, self.sr, self.ro = Counter(), Counter(), Counter()
        for t in triplets:
            s, r, o = _head(t["subj"]), _rel_key(t["rel"]), _head(t["obj"])
            self.sro[s, r, o] += 1
            self.sr[s, r] += 1
            self.ro[r, o] += 1

    def plausibility(self, t: dict) -> float:
        s, r, o = _head(t["subj"]), _rel_key(t["rel"]), _head(t["obj"])
        return math.log1p(self.sro[s, r, o]) + 0.5 * (math.log1p(self.sr[s, r]) + math.log1p(self.ro[r, o]))


def _head(span: dict) -> str:
    if span.get("head"):
        return str(span["head"]).lower()
    words = WORD.findall(span.get("text", "").lower())
    return words[-1] if words else ""


def method_counts(records) -> dict[str, int]:
    """Kept records by ``negative_method``."""
    counts: dict[str, int] = {}
    for r in records:
        m = r.get("negative_method", "?")
        counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items()))
