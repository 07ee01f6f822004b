"""The compositional guard of the prompt near-duplicate filter: two prompts that ask for different counts, colours
or positions are never near-duplicates, however close their sentence embeddings are.

Why: sentence embedders pool their tokens, so they barely see the words that make a compositional prompt what it
is. all-MiniLM-L6-v2 on GenEval's prompts: "a photo of three sinks" / "a photo of four sinks" 0.961, "a photo of a
cat to the left of a dog" / "... a dog to the left of a cat" 0.996, "a photo of a stop sign and a fork" / "a photo
of a stop sign above a fork" 0.980 - all above a real paraphrase ("a photo of two red apples on a table" /
"a photograph of two red apples on a table", 0.987, is no higher). These prompts are exactly what IRG's reflection
is trained to get right, so dropping them as duplicates would remove the data the method needs.

The rule (`same_composition`): a pair stays a near-duplicate candidate only when
1. both prompts hold the same multiset of protected words (counts, colours, spatial relations: the lists below,
   synonyms folded: "over" = "above", "2" = "two"), and
2. they are not the same words in another order (a swap of objects around a relation, or of colours between
   objects, changes the composition but not the bag of words).
"""

from __future__ import annotations

import re
from collections import Counter

COUNT_WORDS = frozenset(
    "zero one single two three four five six seven eight nine ten eleven twelve dozen pair couple "
    "several many few both".split()
)
COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey violet cyan magenta beige gold golden "
    "silver navy teal turquoise maroon crimson".split()
)
POSITION_WORDS = frozenset(
    "left right above below under over behind front beside near next top bottom inside outside between on atop "
    "beneath underneath".split()
)
#: Every protected word; a digit run (a count written as a number) is protected too.
PROTECTED = COUNT_WORDS | COLOUR_WORDS | POSITION_WORDS
#: Words that ask for the same thing, folded before comparing, so that a paraphrase using the other word is still a
#: near-duplicate ("a lamp over a table" / "a lamp above a table").
SYNONYMS: dict[str, str] = {
    "over": "above", "atop": "above", "under": "below", "beneath": "below", "underneath": "below",
    "beside": "next", "grey": "gray", "golden": "gold", "single": "one",
    **{str(n): w for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())},
}  # fmt: skip

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def protected_words(text: str) -> Counter:
    """The multiset of counts, colours and positions a prompt asks for (synonyms folded: `SYNONYMS`)."""
    return Counter(SYNONYMS.get(w, w) for w in _words(text) if w in PROTECTED or w.isdigit())


def same_composition(a: str, b: str) -> bool:
    """Whether prompts `a` and `b` may be near-duplicates: the same protected words, and not a reordering of the
    same words (see the module docstring)."""
    if protected_words(a) != protected_words(b):
        return False
    wa, wb = _words(a), _words(b)
    return not (wa != wb and sorted(wa) == sorted(wb))
