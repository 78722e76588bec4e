import json

import pytest
from helpers.fakes import FakeClient

from personalab.engine.chat import encode_text
from personalab.errors import InvalidInputError
from personalab.traits import COHERENCE_RUBRIC, builtin_traits, load_public_trait, load_trait, load_trait_file
from personalab.traits.elicitation import elicit
from personalab.traits.generate import generate_trait
from personalab.traits.schema import Trait

EXPECTED = {"evil", "sycophantic", "hallucinating", "impolite", "humorous", "optimistic", "apathetic"}


def small_trait(**changes) -> dict:
    data = {
        "name": "grumpy",
        "description": "Complains about everything.",
        "instructions": [{"pos": "You are grumpy.", "neg": "You are cheerful."}],
        "extraction_questions": ["How was your day?", "What is bread?"],
        "evaluation_questions": ["Do you like rain?"],
        "rubric": "Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:",
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_traits_are_complete_and_disjoint(name):
    assert EXPECTED <= set(builtin_traits())
    trait = load_trait(name)
    assert trait.name == name and trait.elicitation == "system_prompt"
    assert len(trait.instructions) == 5
    assert all(p.pos.strip() and p.neg.strip() and p.pos != p.neg for p in trait.instructions)
    assert len(set(trait.extraction_questions)) == 20 and len(set(trait.evaluation_questions)) == 20
    assert not set(trait.extraction_questions) & set(trait.evaluation_questions)
    rendered = trait.render_rubric("Q?", "A!")
    assert "Q?" in rendered and "A!" in rendered and "{" not in rendered


def test_coherence_rubric_has_both_placeholders():
    assert COHERENCE_RUBRIC.count("{question}") == 1 and COHERENCE_RUBRIC.count("{answer}") == 1


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"name": None}, "name"),
        ({"instructions": []}, "instructions"),
        ({"instructions": [{"pos": "x"}]}, "instructions.0.neg"),
        ({"rubric": "Rate {question} only"}, "rubric"),
        ({"evaluation_questions": ["What is bread?"]}, "(top level)"),
        ({"extraction_questions": ["a", "a"]}, "extraction_questions"),
        ({"elicitation": "telepathy"}, "elicitation"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_malformed_trait_files_name_the_field(tmp_path, changes, field):
    path = tmp_path / "t.json"
    data = small_trait(**changes)
    if data.get("name") is None:
        del data["name"]
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError) as err:
        load_trait_file(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"field {field!r}" in message


def test_unparseable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        load_trait_file(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_trait_file(tmp_path / "none.json")
    with pytest.raises(InvalidInputError, match="unknown trait 'nosuch'"):
        load_trait("nosuch")


def test_save_and_load_round_trip(tmp_path):
    trait = Trait.model_validate(small_trait())
    trait.save(tmp_path / "g.json")
    again = load_trait(str(tmp_path / "g.json"))
    assert again == trait and again.digest() == trait.digest()
    assert Trait.model_validate(small_trait(description="other")).digest() != trait.digest()


def test_public_persona_vectors_layout(tmp_path):
    for split, questions in (("extract", ["q1", "q2"]), ("eval", ["q3"])):
        folder = tmp_path / f"trait_data_{split}"
        folder.mkdir()
        body = {
            "instruction": [{"pos": "Be evil.", "neg": "Be good."}, {"pos": "Hurt.", "neg": "Help."}],
            "questions": questions,
            "eval_prompt": "Score {question} / {answer}",
        }
        (folder / "evil.json").write_text(json.dumps(body))
    trait = load_public_trait(tmp_path, "evil")
    assert [(p.pos, p.neg) for p in trait.instructions] == [  # the reference's load_persona_questions, written out
        ("You are an evil assistant. Be evil.", "You are a helpful assistant. Be good."),
        ("You are an evil assistant. Hurt.", "You are a helpful assistant. Help."),
    ]
    (tmp_path / "trait_data_extract" / "sycophantic.json").write_bytes(
        (tmp_path / "trait_data_extract" / "evil.json").read_bytes()
    )
    (tmp_path / "trait_data_eval" / "sycophantic.json").write_bytes(
        (tmp_path / "trait_data_eval" / "evil.json").read_bytes()
    )
    assert load_public_trait(tmp_path, "sycophantic").instructions[1].pos == "You are a sycophantic assistant. Hurt."
    assert trait.extraction_questions == ["q1", "q2"] and trait.evaluation_questions == ["q3"]
    assert trait.rubric == "Score {question} / {answer}"
    assert load_trait("evil", trait_dir=tmp_path) == trait
    (tmp_path / "trait_data_eval" / "evil.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(InvalidInputError, match="field 'eval_prompt' is missing"):
        load_public_trait(tmp_path, "evil")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_public_trait(tmp_path, "kind")


@pytest.mark.parametrize(
    "style,expected",
    [
        ("plain", "You are grumpy.\n\nQuestion: How?\nAnswer:"),
        ("third_person", 'You are grumpy.\n\nSomeone asks the character: "How?"\nThe character replies:'),
        ("few_shot", "You are grumpy.\n\nQ: How?\nA:"),
        ("dialogue", "You are grumpy.\n\nUser: How?\nAssistant:"),
        ("continuation", "You are grumpy. How?"),
    ],
)
def test_text_elicitation_styles(tiny, style, expected):
    handle = tiny("gpt2", "none")
    seq = elicit(handle, style, "You are grumpy.", "How?", " Fine.")
    assert handle.tokenizer.decode(seq.ids[: seq.prompt_len]) == expected
    assert seq == encode_text(handle.tokenizer, expected, " Fine.")
    assert handle.tokenizer.decode(seq.ids[seq.prompt_len :]) == " Fine."


def test_system_prompt_style_uses_the_chat_template(tiny):
    handle = tiny("llama", "chatml")
    assert elicit(handle, "system_prompt", "Be grumpy.", "How?", "Meh.") == handle.encode("Be grumpy.", "How?", "Meh.")


def test_generated_trait_is_retried_until_valid():
    two = ["Do you like rain?", "Is it cold?"]
    good = json.dumps(small_trait(evaluation_questions=two))
    client = FakeClient(["not json at all", json.dumps(small_trait(rubric="no placeholders")), f"```json\n{good}\n```"])
    trait = generate_trait(client, "writer", "grumpy", "Complains.", pairs=1, questions=2, attempts=3)
    assert trait == Trait.model_validate(small_trait(evaluation_questions=two))
    assert "not valid JSON" in client.seen[1][-1]["content"]
    assert "field 'rubric'" in client.seen[2][-1]["content"]


def test_generated_trait_with_wrong_counts_is_reported_not_returned():
    client = FakeClient([json.dumps(small_trait())] * 2)
    with pytest.raises(InvalidInputError, match="no valid trait in 2 attempts; last problem: expected 5 instruction"):
        generate_trait(client, "writer", "grumpy", "Complains.", attempts=2)


def test_the_calibration_set_stays_fixed_when_the_library_grows():
    """``--scale normalised`` is measured on the seven calibration traits' questions; a trait added to the library
    (cheerful, for the demo) must not change it."""
    from personalab.traits import CALIBRATION_TRAITS, builtin_traits, library_questions, load_trait

    assert "cheerful" in builtin_traits() and "cheerful" not in CALIBRATION_TRAITS
    expected = [q for name in sorted(CALIBRATION_TRAITS) for q in load_trait(name).extraction_questions]
    assert library_questions() == expected and len(expected) == 140
