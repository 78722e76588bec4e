"""The ``lexicon:`` judge: word counts instead of a language model, for demos and smoke tests.

A keyword metric, not a substitute for an LLM judge: it sees which words an answer uses, not what it means
("not happy" counts as happy). It needs no network, no key and no model, so the whole pipeline runs offline.

A lexicon is a JSON file ``{"trait": NAME, "description": ..., "trait_words": [...], "anti_words": [...]}``
(``lexicon:`` alone is the built-in ``cheerful`` lexicon, ``lexicon:FILE`` yours). An answer's words are its runs of
letters and apostrophes, lowercased. With ``t`` occurrences of trait words and ``a`` of anti-trait words:

* trait score ``= 100 * (t + 1) / (t + a + 2)``: 50 for an answer with neither, above 50 when trait words
  outnumber anti-trait words (one trait word: 66.7; two: 75), below when they are fewer;
* coherence ``= 100 * min(1, n / 8) * (distinct word trigrams / word trigrams)`` for an answer of ``n`` words (the
  trigram factor is 1 below three words): an empty answer scores 0, a short one less, one that repeats itself
  less (a phrase looped until the token limit scores near 0).

Coherence is used for the coherence rubrics (``personalab.traits.COHERENCE_RUBRIC`` and its continuation form),
the trait score for any other rubric.
"""

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from personalab.errors import InvalidInputError

BUILT_IN = Path(__file__).parent / "lexicons" / "cheerful.json"
NOTICE = "lexicon: a keyword metric for demos and smoke tests, not a substitute for an LLM judge"
_WORD = re.compile(r"[a-z']+")
FULL_LENGTH = 8
"""Words an answer needs for full coherence."""


class Lexicon(BaseModel):
    """The words a ``lexicon:`` judge counts (see the module docstring)."""

    trait: str = Field(min_length=1)
    description: str = ""
    trait_words: list[str] = Field(min_length=1)
    anti_words: list[str] = Field(min_length=1)


def load_lexicon(path: str | Path | None = None) -> Lexicon:
    """The lexicon of a JSON file (``None``: the built-in cheerful lexicon); a one-line error for a bad file."""
    path = Path(path) if path else BUILT_IN
    try:
        return Lexicon.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise InvalidInputError(
            f"no lexicon file {path}; give lexicon:FILE.json or lexicon: for the built-in one"
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not JSON ({exc}); a lexicon is a JSON object like {BUILT_IN}") from None
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors())
        raise InvalidInputError(
            f"{path} is not a lexicon ({wrong}); it needs trait, trait_words and anti_words, like {BUILT_IN}"
        ) from None


def words(text: str) -> list[str]:
    """The words of ``text``: runs of letters and apostrophes, lowercased."""
    return _WORD.findall(text.lower())


def trait_score(text: str, lexicon: Lexicon) -> float:
    """``100 * (t + 1) / (t + a + 2)`` with ``t`` and ``a`` the trait and anti-trait word occurrences."""
    counts = Counter(words(text))
    t = sum(counts[w] for w in {w.lower() for w in lexicon.trait_words})
    a = sum(counts[w] for w in {w.lower() for w in lexicon.anti_words})
    return 100.0 * (t + 1) / (t + a + 2)


def coherence_score(text: str) -> float:
    """``100 * min(1, n / 8) * distinct trigrams / trigrams`` for ``n`` words (factor 1 below three words)."""
    found = words(text)
    if not found:
        return 0.0
    trigrams = list(zip(found, found[1:], found[2:], strict=False))
    variety = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    return 100.0 * min(1.0, len(found) / FULL_LENGTH) * variety


class LexiconJudge:
    """A ``Judge`` that counts words (see the module docstring); ``name`` holds the lexicon's content hash, so a
    changed word list is a new judge in the store."""

    def __init__(self, path: str | Path | None = None) -> None:
        from personalab.hashes import content_key
        from personalab.traits import COHERENCE_CONTINUATION, COHERENCE_RUBRIC

        self.path = Path(path) if path else BUILT_IN
        self.lexicon = load_lexicon(self.path)
        self.name = f"lexicon:{self.lexicon.trait}@{content_key(self.lexicon.model_dump())[:12]}"
        self._coherence = {COHERENCE_RUBRIC, COHERENCE_CONTINUATION}

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        return coherence_score(answer) if rubric in self._coherence else trait_score(answer, self.lexicon)

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
        return [self.score(*item) for item in items]

    def check(self) -> None:
        """Nothing to reach: the word lists were read when the judge was made."""
