import pytest
from helpers.models import QUESTIONS, make_tokenizer

from personalab.engine.chat import detect_chat_format, encode_chat, encode_prompt
from personalab.engine.formats import format_text
from personalab.errors import InvalidInputError


@pytest.mark.parametrize("template", ["chatml", "gemma", "none"])
@pytest.mark.parametrize("system,user,answer", QUESTIONS)
def test_boundary_is_exact(template, system, user, answer):
    tok = make_tokenizer(template)
    chat = detect_chat_format(tok)
    prompt = encode_chat(tok, chat, system, user)
    full = encode_chat(tok, chat, system, user, answer)
    assert prompt.response_len == 0
    assert full.prompt_len == prompt.prompt_len
    assert full.ids[: full.prompt_len] == prompt.ids
    assert tok.decode(full.ids[full.prompt_len :]) == answer
    assert tok.encode(answer, add_special_tokens=False) == list(full.ids[full.prompt_len :])


def test_chatml_keeps_the_system_role():
    tok = make_tokenizer("chatml")
    chat = detect_chat_format(tok)
    assert chat.has_template and chat.system_role
    seq = encode_chat(tok, chat, "Be evil.", "Hi?")
    expected = "<|im_start|>system\nBe evil.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(seq.ids) == expected


def test_template_without_system_role_folds_it_into_the_user_turn():
    tok = make_tokenizer("gemma")
    chat = detect_chat_format(tok)
    assert chat.has_template and not chat.system_role
    seq = encode_chat(tok, chat, "Be evil.", "Hi?")
    assert tok.decode(seq.ids) == "<s><start_of_turn>user\nBe evil.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"


def test_silently_dropping_template_counts_as_no_system_role():
    tok = make_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert not detect_chat_format(tok).system_role


def test_base_model_gets_the_plain_format():
    tok = make_tokenizer("none")
    chat = detect_chat_format(tok)
    assert not chat.has_template
    seq = encode_chat(tok, chat, "Be evil.", "Hi?")
    assert tok.decode(seq.ids) == "Be evil.\n\nQuestion: Hi?\nAnswer:"
    assert format_text("plain", None, "Hi?") == "Question: Hi?\nAnswer:"
    earlier = encode_chat(tok, chat, "Be evil.", "Why?", history=[("Hi?", "Hello.")])
    assert tok.decode(earlier.ids) == "Be evil.\n\nQuestion: Hi?\nAnswer: Hello.\n\nQuestion: Why?\nAnswer:"
    with pytest.raises(InvalidInputError, match="a continuation prompt has no earlier turns"):
        format_text("continuation", None, "Why?", [("Hi?", "Hello.")])


@pytest.mark.parametrize("kind", ["chatml", "none"])
def test_each_prompt_format_is_the_text_written_by_hand(kind):
    tok = make_tokenizer(kind)
    chat = detect_chat_format(tok)
    expected = {
        "plain": "Be evil.\n\nQuestion: Hi?\nAnswer:",
        "continuation": "Be evil. Hi?",
    }
    for name, text in expected.items():
        seq = encode_prompt(tok, chat, name, "Be evil.", "Hi?")
        assert seq.ids == tuple(tok(text)["input_ids"]) and seq.prompt_len == len(seq.ids)
        assert name in chat.describe(name)
    assert encode_prompt(tok, chat, "continuation", None, "Once upon").ids == tuple(tok("Once upon")["input_ids"])
    if kind == "none":
        with pytest.raises(InvalidInputError, match="no chat template: use `format` plain or continuation"):
            encode_prompt(tok, chat, "chat", None, "Hi?")
        assert chat.default_format == "plain"
    else:
        rendered = tok.apply_chat_template(
            [{"role": "system", "content": "Be evil."}, {"role": "user", "content": "Hi?"}],
            add_generation_prompt=True, tokenize=False,
        )  # fmt: skip
        assert encode_prompt(tok, chat, "chat", "Be evil.", "Hi?").ids == tuple(
            tok(rendered, add_special_tokens=False)["input_ids"]
        )
        assert chat.default_format == "chat"
    with pytest.raises(InvalidInputError, match="`format` must be one of chat, plain, continuation"):
        encode_prompt(tok, chat, "story", None, "Hi?")
