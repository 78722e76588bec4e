"""The ``lexicon:`` judge against scores computed by hand from its documented formulas."""

import json

import pytest

from personalab.errors import InvalidInputError
from personalab.judging.judges import judge_from_spec
from personalab.judging.lexicon import LexiconJudge, coherence_score, load_lexicon, trait_score
from personalab.traits import COHERENCE_CONTINUATION, COHERENCE_RUBRIC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 50.0),  # neither: (0 + 1) / (0 + 0 + 2)
        ("She smiled and laughed. Then she cried.", 100 * 3 / 5),  # t = 2, a = 1
        ("Happy happy JOY!", 100 * 4 / 5),  # t = 3, case and punctuation ignored
        ("The dog was sad and scared and alone.", 100 * 1 / 5),  # a = 3
        ("She was not happy.", 100 * 2 / 3),  # a keyword metric: "not happy" is one trait word
        ("unhappy", 100 * 1 / 3),  # whole words: "unhappy" is an anti-trait word, not "happy"
    ],
)
def test_trait_score_is_the_smoothed_share_of_trait_words(text, expected):
    assert trait_score(text, load_lexicon()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0.0),
        ("Hi there", 100 * 2 / 8),  # two words, no trigram
        ("The little girl went to the big park", 100.0),  # 8 words, 6 distinct trigrams of 6
        ("la la la la la la la la la la", 100 * 1 / 8),  # 10 words, 1 distinct trigram of 8
        ("a b c a b c", 100 * 6 / 8 * 3 / 4),  # 6 words, trigrams abc bca cab abc: 3 distinct of 4
    ],
)
def test_coherence_rewards_length_and_penalises_repetition(text, expected):
    assert coherence_score(text) == pytest.approx(expected)


def test_the_judge_scores_coherence_rubrics_for_coherence_and_any_other_for_the_trait(tmp_path):
    judge = judge_from_spec("lexicon:")
    assert isinstance(judge, LexiconJudge) and judge.name.startswith("lexicon:cheerful@")
    answer = "Lily smiled and played in the sunny park with her friend."
    items = [("q", answer, COHERENCE_RUBRIC), ("q", answer, COHERENCE_CONTINUATION), ("q", answer, "Rate it.")]
    assert judge.score_many(items) == [100.0, 100.0, pytest.approx(100 * 4 / 5)]  # smiled, played, sunny
    judge.check()

    mine = tmp_path / "grumpy.json"
    mine.write_text(json.dumps({"trait": "grumpy", "trait_words": ["grumble"], "anti_words": ["smiled"]}))
    custom = judge_from_spec(f"lexicon:{mine}")
    assert custom.score("q", answer, "Rate it.") == pytest.approx(100 * 1 / 3)
    assert custom.name != judge.name and custom.name.startswith("lexicon:grumpy@")
    mine.write_text(json.dumps({"trait": "grumpy", "trait_words": ["grumble", "sigh"], "anti_words": ["smiled"]}))
    assert judge_from_spec(f"lexicon:{mine}").name != custom.name, "changed word lists are another judge"


def test_a_bad_lexicon_is_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="no lexicon file"):
        judge_from_spec(f"lexicon:{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text(json.dumps({"trait": 3, "trait_words": []}))
    with pytest.raises(InvalidInputError) as err:
        load_lexicon(tmp_path / "bad.json")
    message = str(err.value)
    assert "\n" not in message and "is not a lexicon" in message and "validation error" not in message
    for field in ("trait: Input should be a valid string", "trait_words: List should have at least 1 item",
                  "anti_words: Field required"):  # fmt: skip
        assert field in message
    (tmp_path / "broken.json").write_text('{"trait": ')
    with pytest.raises(InvalidInputError, match=r"broken.json is not JSON \(Expecting value: line 1"):
        load_lexicon(tmp_path / "broken.json")
