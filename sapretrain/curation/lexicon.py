"""Word lists behind SVO extraction and the spatial / action ``kind`` of a relation.

The rule that decides ``kind`` (``relation_kind``):

- A relation made only of prepositions / spatial words ("on", "in front of", "next to",
  "left of", "part of", "with") is **spatial**.
- A relation with a verb is **action** ("riding", "holding", "picking up", "tied to") …
- … except a *posture or location* verb (``POSTURE_VERBS``: sit, stand, lie, park, hang, rest…)
  followed by a spatial preposition: "dog sleeping on a couch", "bike parked next to a car",
  "lamp hanging above the table". There the verb only says how the subject is placed and the
  preposition carries the relation, so it is **spatial**. A posture verb with a direct object or
  without a spatial preposition ("standing a bike up", "sitting with a dog") stays action.
- Possession and clothing read as a verb: "the player's socks" / "the seat of the toilet" (lemma
  ``have``) and "a man in a white shirt" (lemma ``wear``) are **action**, like "has" / "wearing".

"with" is counted as spatial: in captions it almost always means co-location or attachment
("a child with an umbrella", "a pizza with toppings").
"""
from __future__ import annotations

# Prepositions that start a relation. Others ("of", "for", "as", "like", "about", "than",
# "during", "after"…) are partitive, purpose or time: "a cup of coffee", "food for dogs".
SPATIAL_PREPS = frozenset(
    """
    on in at under over above below beneath underneath behind before beside besides between
    among amongst amid across along alongside around round through throughout into onto upon
    inside outside within without near by against toward towards past beyond via atop
    up down off out from to opposite with
    """.split()
)

# Adverbs / adjectives that head a spatial relation together with the preposition after them:
# "next to", "close to", "far from", "away from", "ahead of", "left of", "out of",
# "perpendicular to", "parallel to", "adjacent to", "opposite to", "on top of" (via nouns below).
SPATIAL_HEADS = frozenset(
    """
    next close closer near nearer far farther further away ahead left right out inside outside
    perpendicular parallel adjacent opposite apart across behind along alongside up down off
    """.split()
)

# Modifiers kept in front of a spatial head: "far away from", "right next to", "just above".
SPATIAL_PRE_MODIFIERS = frozenset("far right just directly close very".split())

# Nouns that make a multi-word preposition with the "of"/"to" after them: "in front of",
# "on top of", "to the left of", "at the right side of", "in the middle of", "on the edge of",
# "at the back of", "in the corner of", "part of".
RELATIONAL_NOUNS = frozenset(
    """
    front top bottom back rear side left right middle center centre edge corner end base
    part inside outside underside surface foot head tip interior exterior midst
    """.split()
)

# Words that close a multi-word preposition after a relational noun or spatial head.
CLOSING_PREPS = frozenset("of to from with".split())

# Posture / location verbs: with a spatial preposition the relation is spatial (see above).
POSTURE_VERBS = frozenset(
    """
    sit stand lie lay rest sleep park hang perch float lean stay wait place put set
    locate position situate mount display stack pile line gather crouch kneel squat hover
    """.split()
)

# Collective / quantity nouns: "a bunch of birds", "a group of people" → the head is the
# noun after "of".
QUANTITY_NOUNS = frozenset(
    """
    bunch group herd flock pair couple lot lots number crowd team pile stack row set bundle
    collection variety assortment couple dozen few handful line plenty piece slice loaf kind
    sort type array
    """.split()
)

# English function words for the cheap language check of bad captions.
ENGLISH_STOPWORDS = frozenset(
    """
    a an the is are was were be been being has have had of in on at to with and or for from by
    near under over this that there these those it its his her their them they he she him we you
    some two three four one another other while as into onto next up down out off very using
    during along against around behind through about after before above below between who which
    what where each all both many several few most not no but so than too also just then here
    """.split()
)


def relation_kind(has_verb: bool, verb_lemma: str | None, preps: list[str], has_dobj: bool) -> str:
    """``spatial`` or ``action`` for one relation (the rule is in this module's docstring)."""
    if not has_verb:
        return "spatial"
    if verb_lemma in POSTURE_VERBS and not has_dobj and any(p in SPATIAL_PREPS and p != "with" for p in preps):
        return "spatial"
    return "action"

# Verb forms that en_core_web_sm 3.8 lemmatises wrongly (its rules strip "-ing" to an existing
# shorter verb): "riding" → "rid".
# The class: "-ing" of a verb ending in a silent "e" whose stem without it is another verb or
# noun (shin, din, hop, star, tap…); found by lemmatising "-ing" forms of "-e" verbs.
LEMMA_FIXES = {
    "riding": "ride", "rides": "ride", "biding": "bide", "hiding": "hide", "siding": "side",
    "shining": "shine", "dining": "dine", "pining": "pine", "wading": "wade", "taping": "tape",
    "hoping": "hope", "staring": "stare", "diving": "dive", "coping": "cope", "moping": "mope",
    "sparing": "spare", "scaring": "scare",
}

# Nouns ending in "-ing" that the tagger often takes for a gerund ("awning on the building",
# "railing along the stairs"): a noun unless the word has a verb's own dependents (object,
# subject, auxiliary), as in "men building a wall".
ING_NOUNS = frozenset(
    """
    awning building railing ceiling clothing icing frosting topping stuffing bedding siding
    lining wiring netting fencing paneling panelling flooring carving drawing painting filling
    marking opening sibling pudding dumpling wedding crossing landing molding
    moulding stocking tubing padding coating piping roofing seating plating casing housing
    footing clearing dressing helping lettering morning evening string spring swing sling
    lightning offspring something nothing everything anything
    """.split()
)

# Verbs whose passive "with" / "in" names what does it ("a street covered in snow" → snow |
# cover | street), like an agent's "by".
COVER_VERBS = frozenset("cover line coat blanket surround litter dot cake".split())

# Verbs of transfer: after their object, "to" / "toward" names the receiver of the action,
# related to the subject ("a pitcher throwing the ball to the batter" → pitcher | throw to |
# batter), not a place of the object.
TRANSFER_VERBS = frozenset("throw toss pass hand give kick hit serve pitch show feed bring deliver send offer".split())

# Light verbs with an event noun as object say what the subject does, not a relation to a
# thing: "cows taking a walk", "a dog takes a nap on a couch" (→ dog | on | couch).
LIGHT_VERBS = frozenset("take get make give".split())  # not "have": "a bus has seats"
EVENT_NOUNS = frozenset(
    """
    walk nap break photo picture photograph selfie look rest bath shower drink bite stroll ride
    swim jump leap turn trip seat glance peek sip
    """.split()
)

# "in the distance", "in a row": how far or how arranged, not a relation to an object.
ADVERBIAL_POBJS = frozenset("distance row".split())

# Containers: "a mug of coffee" is coffee in a mug, "a plate of food" food on a plate (and the
# container, not its content, is what stands somewhere: "a mug of coffee on the table" → mug |
# on | table). The value is the preposition of content to container.
CONTAINERS = {
    **dict.fromkeys(
        """cup mug glass bowl basket box bag bottle jar bucket can carton pot pan vase jug pitcher
        crate bin barrel tub sack pail kettle teapot cooler container case""".split(), "in"),
    **dict.fromkeys("plate tray platter saucer".split(), "on"),
}

# Clothing: "a man in a white shirt" is the relation "wear" (lemma; the span stays "in").
CLOTHING = frozenset(
    """
    shirt tshirt t-shirt jacket coat hat cap helmet dress pants jeans shorts suit uniform sweater
    hoodie jersey skirt blouse vest wetsuit outfit costume clothes clothing apron robe bikini
    swimsuit sweatshirt tank socks sock shoe shoes boots boot gloves glove scarf tie goggles
    glasses sunglasses gear attire tuxedo overalls sneakers sandals visor beanie headband
    bandana trunks leggings top
    """.split()
)

# Parts of a whole: "the seat of the toilet", "the arm of the bear" → whole | has | part.
# Containers and quantities ("a glass of wine", "a group of people") are not parts.
PART_NOUNS = frozenset(
    """
    seat arm leg head tail ear eye nose mouth face hand foot feet wing wheel tire door window
    roof wall handle screen keyboard leaf leaves branch trunk top bottom side edge front back
    corner end part piece blade lid cover base neck mane hoof paw beak fur hair spot stripe
    shade lamp light sign logo letter number button key knob window engine tower frame
    windshield windscreen bumper headlight headlights taillight grill mirror spoke pedal
    petal stem horn tusk claw fin feather toe finger thumb knee elbow shoulder whisker
    chimney steeple
    """.split()
)
