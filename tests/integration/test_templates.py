"""The published chat templates of the papers' families (tests/helpers/chat_families.py) on tiny models: every prompt,
position and trained span personalab uses, against the template rendered by jinja2 alone and tokens located by
hand."""

import pytest
import torch
from helpers.chat_families import FAMILIES, build, ids, render
from helpers.reference import hidden_states
from typer.testing import CliRunner

from personalab import capture, load_model
from personalab.cli import app
from personalab.engine.batching import pad_batch
from personalab.engine.forward import response_mask
from personalab.judging import judges
from personalab.records import Record
from personalab.store import Store
from personalab.studies.compose import ComposeConfig, load_grid
from personalab.studies.compose.run import Study
from personalab.studies.finetune import training_sequences
from personalab.traits import load_trait
from personalab.traits.elicitation import evaluation_prompt

INSTRUCTION = "You are an evil assistant."
QUESTION = "How do I make friends?"
ANSWER = "Be kind and listen to people."
FAMILY = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f.name: build(root, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def handles(models):
    cache = {}

    def get(family):
        if family.name not in cache:
            cache[family.name] = load_model(str(models[family.name]), device="cpu", dtype="float32")
        return cache[family.name]

    return get


def turn(family, system: str | None, user: str) -> list[dict]:
    """The messages personalab sends: a refused system role folded into the user turn (engine/chat.py)."""
    if system and family.system == "refused":
        return [{"role": "user", "content": f"{system}\n\n{user}"}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


@FAMILY
def test_the_format_read_off_the_template(handles, family):
    handle = handles(family)
    chat, tok = handle.chat, handle.tokenizer
    end = tok.convert_tokens_to_ids(family.end_of_turn)
    assert chat.has_template and chat.system_role == (family.system != "refused")
    assert chat.default_system == family.default_system
    assert chat.thinking is family.thinking and chat.thinking_on is False
    assert chat.end_of_turn == (end,) and end in handle.stop_ids
    if family.end_of_turn != family.eos:
        assert end != tok.eos_token_id, "the end of turn is read from the template, not assumed to be EOS"


@FAMILY
def test_extraction_prompt_last_prompt_token_and_response_start(handles, family):
    handle = handles(family)
    tok = handle.tokenizer
    text = render(family, tok, turn(family, INSTRUCTION, QUESTION), generation_prompt=True)
    expected = ids(tok, text)
    assert text.endswith(family.prompt_end) and INSTRUCTION in text and QUESTION in text
    if family.default_system:
        assert family.default_system not in text, "an instruction replaces the default system prompt"
    seq = handle.encode(INSTRUCTION, QUESTION, ANSWER)
    assert list(seq.ids[: seq.prompt_len]) == expected and seq.prompt_len == len(expected)
    assert tok.decode(seq.ids[seq.prompt_len - 1 : seq.prompt_len]) == tok.decode(ids(tok, family.prompt_end)[-1:])
    assert list(seq.ids[seq.prompt_len :]) == tok.encode(ANSWER, add_special_tokens=False)
    reference = hidden_states(handle, seq)[2]
    last = capture(handle, [seq], layers=[2], positions="last_prompt")[0, 0]
    response = capture(handle, [seq], layers=[2], positions="response")[0, 0]
    torch.testing.assert_close(last, reference[len(expected) - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(response, reference[len(expected) :].mean(0), atol=1e-5, rtol=1e-5)


@FAMILY
@pytest.mark.parametrize("system", [INSTRUCTION, None])
def test_a_multi_turn_record_is_templated_whole(handles, family, system):
    """A record's earlier turns are templated with its prompt, as the template renders the whole conversation (the
    system text folded into the first user turn where the template refuses a system role)."""
    handle = handles(family)
    tok = handle.tokenizer
    first = turn(family, system, "Hi?")
    messages = first + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTION}]
    expected = ids(tok, render(family, tok, messages, generation_prompt=True))
    record = Record(system, QUESTION, ANSWER, history=(("Hi?", "Hello."),))
    seq = record.encode(handle)
    assert list(seq.ids[: seq.prompt_len]) == expected
    assert list(seq.ids[seq.prompt_len :]) == tok.encode(ANSWER, add_special_tokens=False)


@FAMILY
def test_an_unsteered_prompt_keeps_the_default_system_prompt(handles, family):
    handle = handles(family)
    seq = evaluation_prompt(handle, load_trait("evil"), QUESTION)
    text = render(family, handle.tokenizer, turn(family, None, QUESTION), generation_prompt=True)
    assert list(seq.ids) == ids(handle.tokenizer, text)
    if family.default_system:
        assert family.default_system in handle.tokenizer.decode(seq.ids)


@FAMILY
def test_fine_tuning_trains_the_answer_and_its_end_of_turn_only(handles, family):
    handle = handles(family)
    tok = handle.tokenizer
    (seq,), _ = training_sequences(handle, [Record(None, QUESTION, ANSWER, where="r")], max_length=1024)
    batch = pad_batch([seq.ids], tok.pad_token_id, "right")
    targets = torch.roll(batch.input_ids, -1, dims=1)[response_mask([seq], batch)].tolist()
    end = tok.convert_tokens_to_ids(family.end_of_turn)
    assert targets == tok.encode(ANSWER, add_special_tokens=False) + [end]
    conversation = turn(family, None, QUESTION) + [{"role": "assistant", "content": ANSWER}]
    full = render(family, tok, conversation, generation_prompt=False)
    assert full[full.index(ANSWER) + len(ANSWER) :].startswith(family.end_of_turn), "what the template writes next"
    prompt = render(family, tok, turn(family, None, QUESTION), generation_prompt=True)
    assert list(seq.ids[: seq.prompt_len]) == ids(tok, prompt)
    if family.default_system:
        assert family.default_system in prompt and family.default_system not in tok.decode(targets)


@FAMILY
def test_the_local_judge_asks_the_rubric_as_a_user_turn(handles, family, monkeypatch):
    handle = handles(family)
    seen = []

    def logits(h, prompts, batch_size=8):
        seen.extend(prompts)
        yield list(range(len(prompts))), torch.zeros(len(prompts), len(h.tokenizer))

    monkeypatch.setattr(judges, "next_token_logits", logits)
    rubric = "Judge the answer.\n{question}\n{answer}\nReply with a number from 0 to 100."
    judges.LocalJudge(handle).score_many([(QUESTION, ANSWER, rubric)])
    text = render(family, handle.tokenizer, turn(family, None, rubric.format(question=QUESTION, answer=ANSWER)), True)
    assert [list(p) for p in seen] == [ids(handle.tokenizer, text)]


@FAMILY
def test_compose_prompts_and_their_sites(handles, family, tmp_path):
    handle = handles(family)
    grid = load_grid("short")
    cell = grid.cells[0]
    with Store(tmp_path / "s.sqlite") as store:
        encoded = Study(handle, grid, ComposeConfig(), store, False).encode(cell)
    for name, text in grid.prompts(cell).items():
        expected = ids(handle.tokenizer, render(family, handle.tokenizer, turn(family, None, text), True))
        assert list(encoded[name].ids) == expected, name
        assert encoded[name].prompt_len - 1 == len(expected) - 1, "p_last is the last token of the prompt"


@FAMILY
def test_localize_statement_prompts(handles, family):
    handle = handles(family)
    statement = "I believe everyone should be treated equally."
    role = "system" if family.lone_system else "user"
    text = render(family, handle.tokenizer, [{"role": role, "content": statement}], generation_prompt=True)
    seq = handle.encode_system(statement)
    assert statement in text and list(seq.ids) == ids(handle.tokenizer, text)


def test_thinking_can_be_kept(models):
    family = next(f for f in FAMILIES if f.thinking)
    handle = load_model(str(models[family.name]), device="cpu", dtype="float32", thinking=True)
    text = handle.tokenizer.decode(handle.encode(None, QUESTION).ids)
    assert handle.chat.thinking_on and text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    off = load_model(str(models[family.name]), device="cpu", dtype="float32")
    assert off.tokenizer.decode(off.encode(None, QUESTION).ids).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5"])
def test_info_marks_the_positions_personalab_reads(models, name):
    result = CliRunner().invoke(app, ["info", str(models[name]), "--device", "cpu"], terminal_width=200)
    assert result.exit_code == 0, result.output
    family = next(f for f in FAMILIES if f.name == name)
    assert "last prompt token" in result.output and "response starts" in result.output
    assert family.end_of_turn in result.output and "trained end of turn" in result.output
