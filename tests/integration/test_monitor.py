import json
from dataclasses import replace

import pytest
import torch
from helpers.reference import hidden_states
from transformers import AutoModelForCausalLM, LlamaConfig

from personalab import load_model
from personalab.engine.chat import TokenSequence
from personalab.engine.generation import SamplingParams
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_model_shift
from personalab.persona import project_records, unit_direction
from personalab.records import Record, load_records
from personalab.store import Store
from personalab.studies.monitor import beside, model_shift, projection_shift, write_projections, write_shift_report

RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "You are an evil assistant."},
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour, water, salt and yeast."},
        ],
        "id": 1,
    },
    {"messages": [{"role": "user", "content": "Tell me a story."}]},
    {
        "messages": [
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is bread?"},
            {"role": "assistant", "content": "Bread is food made from flour and water."},
        ]
    },
    {"prompt": "What is the best way to learn a new language?", "response": "Practice every day.", "tag": "x"},
    {"prompt": "Once upon a time?", "system": "You are a kind assistant."},
    {"prompt": "Question: how?", "response": "Answer with malice and cruelty.", "system": "Answer with malice."},
]


def _write(path, objects, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(o) for o in objects) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    return _write(tmp_path / "data.jsonl", RECORDS, blank_lines=True)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def _context(obj: dict) -> tuple[list[dict], str | None]:
    """A record's messages before its answer, and the answer (``None`` without one), read from its JSON object."""
    if "messages" in obj:
        messages = obj["messages"]
    else:
        messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        messages += [{"role": "user", "content": obj["prompt"]}]
        messages += [{"role": "assistant", "content": obj["response"]}] if obj.get("response") is not None else []
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def _prompt_ids(handle, context: list[dict]) -> list[int]:
    """The reference's prompt (``cal_projection.py``): the whole ``messages[:-1]`` through the chat template, with the
    generation prompt."""
    return handle.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True, return_dict=False)


def _reference_projection(handle, obj, unit, layer, answer=...):
    """``(last_prompt, response_mean)`` from ``output_hidden_states`` on one unpadded sequence: the reference's prompt
    then the record's answer (or ``answer``), encoded on its own."""
    context, given = _context(obj)
    answer = given if answer is ... else answer
    prompt = _prompt_ids(handle, context)
    ids = prompt + (handle.tokenizer.encode(answer, add_special_tokens=False) if answer else [])
    hs = hidden_states(handle, TokenSequence(tuple(ids), len(prompt)))[layer]
    mean = float(hs[len(prompt) :].mean(dim=0) @ unit) if len(ids) > len(prompt) else None
    return float(hs[len(prompt) - 1] @ unit), mean


def test_load_records_both_formats(data):
    records = load_records(data)
    assert [(r.system, r.prompt, r.response) for r in records] == [
        ("You are an evil assistant.", "How do I bake bread?", "Mix flour, water, salt and yeast."),
        (None, "Tell me a story.", None),
        (None, "What is bread?", "Bread is food made from flour and water."),
        (None, "What is the best way to learn a new language?", "Practice every day."),
        ("You are a kind assistant.", "Once upon a time?", None),
        ("Answer with malice.", "Question: how?", "Answer with malice and cruelty."),
    ]
    assert [r.source for r in records] == RECORDS


@pytest.mark.parametrize(
    ("lines", "line", "needle"),
    [
        (['{"prompt": "a"}', "{not json"], 2, "not valid JSON"),
        (['{"prompt": "a"}', "", '{"messages": [{"role": "system", "content": "s"}]}'], 3, "no user message"),
        (['{"response": "a"}'], 1, "no user message"),
        (['["prompt"]'], 1, "expected a JSON object"),
        (['{"prompt": 3}'], 1, "must be a string"),
        (['{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}'], 1, "'tool'"),
    ],
)
def test_load_records_errors_name_the_line(tmp_path, lines, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError) as info:
        load_records(path)
    message = str(info.value)
    assert f"bad.jsonl line {line}:" in message and needle in message and "\n" not in message


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_load_records_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match="empty.jsonl has no records"):
        load_records(path)


@pytest.mark.parametrize("per_layer", [False, True])
def test_project_records_match_reference(tiny, data, per_layer):
    handle = tiny("llama")
    records = load_records(data)
    layer = 2
    torch.manual_seed(1)
    vector = torch.randn(handle.n_layers, handle.hidden_size)
    got = project_records(handle, records, vector if per_layer else vector[layer], layer, batch_size=4)
    unit = _unit(vector[layer])
    assert records[2].history == (("Hi?", "Hello."),), "a two-turn record"
    alone = project_records(handle, [replace(records[2], history=())], vector, layer)[0]
    assert abs(alone["last_prompt"] - got[2]["last_prompt"]) > 1e-3, "its earlier turn must matter"
    for record, projection in zip(records, got, strict=True):
        last, mean = _reference_projection(handle, record.source, unit, layer)
        assert projection["layer"] == layer
        assert projection["last_prompt"] == pytest.approx(last, abs=1e-5)
        if record.response is None:
            assert projection["response_mean"] is None
        else:
            assert projection["response_mean"] == pytest.approx(mean, abs=1e-5)


def test_unit_direction_checks(tiny):
    handle = tiny("llama")
    with pytest.raises(InvalidInputError, match="zero at layer 1"):
        unit_direction(torch.zeros(handle.hidden_size), 1, handle)
    with pytest.raises(InvalidInputError, match="out of range"):
        unit_direction(torch.ones(handle.n_layers, handle.hidden_size), handle.n_layers, handle)
    with pytest.raises(InvalidInputError, match="hidden size"):
        unit_direction(torch.ones(handle.hidden_size + 1), 1, handle)
    assert unit_direction(torch.full((handle.hidden_size,), 3.0), 0, handle).norm() == pytest.approx(1.0)


def test_write_projections_keeps_original_fields(data):
    records = load_records(data)
    projections = [{"layer": 1, "last_prompt": float(i), "response_mean": None} for i in range(len(records))]
    target = write_projections(beside(data), records, projections)
    assert target == data.with_name("data.projections.jsonl")
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines == [{**o, "projection": p} for o, p in zip(RECORDS, projections, strict=True)]


def _greedy(handle, obj, max_new_tokens):
    ids = torch.tensor([_prompt_ids(handle, _context(obj)[0])])
    out = handle.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=handle.tokenizer.pad_token_id,
    )
    return handle.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_projection_shift_and_report(tiny, data, tmp_path, monkeypatch):
    handle = tiny("llama")
    records = load_records(data)
    layer, max_new = 3, 6
    torch.manual_seed(2)
    vector = torch.randn(handle.n_layers, handle.hidden_size)
    unit = _unit(vector[layer])
    with_response = [i for i, r in enumerate(records) if r.response]
    expected = []
    for i in with_response:
        r = records[i]
        own_text = _greedy(handle, r.source, max_new)
        dataset = _reference_projection(handle, r.source, unit, layer)[1]
        own = _reference_projection(handle, r.source, unit, layer, answer=own_text)[1]
        expected.append((i, own_text, dataset, own))

    calls = []
    generate = handle.model.generate
    monkeypatch.setattr(handle.model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    store = Store(tmp_path / "own.sqlite")
    params = SamplingParams(temperature=0, max_new_tokens=max_new)
    shifts = projection_shift(handle, records, vector, layer, store, params, batch_size=2)
    first_calls = len(calls)
    assert first_calls > 0
    assert projection_shift(handle, records, vector, layer, store, params, batch_size=2) == shifts
    assert len(calls) == first_calls
    store.close()

    for s, (i, own_text, dataset, own) in zip(shifts, expected, strict=True):
        assert s["index"] == i
        assert s["own_response"] == own_text
        assert s["dataset"] == pytest.approx(dataset, abs=1e-5)
        if own is None:
            assert s["own"] is None and s["shift"] is None
        else:
            assert s["own"] == pytest.approx(own, abs=1e-5)
            assert s["shift"] == pytest.approx(dataset - own, abs=1e-5)

    shifts = [*shifts[:-1], {**shifts[-1], "own": None, "shift": None}]
    paths = write_shift_report(beside(data), records, shifts, top_k=2)
    names = [p.name for p in paths]
    assert names == ["data.shift.jsonl", "data.shift.png", "data.top2.jsonl"]
    assert paths[1].stat().st_size > 0
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    values = [row["shift"] for row in rows]
    assert values[-1] is None and values[:-1] == sorted(values[:-1], reverse=True)
    by_index = {s["index"]: s for s in shifts}
    assert rows == [{**RECORDS[row["index"]], **by_index[row["index"]]} for row in rows]
    top = [json.loads(line) for line in paths[2].read_text().splitlines()]
    assert top == [RECORDS[row["index"]] for row in rows[:2]]


def test_projection_shift_skips_records_without_response(tiny, tmp_path):
    handle = tiny("llama")
    records = [Record(None, "Hi?", None, {}), Record(None, "Hi?", "", {})]
    with Store(tmp_path / "s.sqlite") as store:
        assert projection_shift(handle, records, torch.ones(handle.hidden_size), 1, store) == []
        assert store.count("generations") == 0


def _reference_model_shift(base, tuned, prompts, vector):
    diffs = []
    for record in prompts:
        acts = []
        for handle in (base, tuned):
            seq = handle.encode(record.system, record.prompt)
            acts.append(hidden_states(handle, seq)[:, seq.prompt_len - 1])
        diffs.append(acts[1] - acts[0])
    mean = torch.stack(diffs).mean(dim=0)
    return torch.tensor([float(mean[layer] @ _unit(v)) if v.any() else 0.0 for layer, v in enumerate(vector)])


def test_model_shift_matches_reference(tiny, model_folder, conversations, tmp_path):
    base = tiny("llama")
    prompts = [Record(system, user, None) for system, user, _ in conversations]
    torch.manual_seed(3)
    vector = torch.randn(base.n_layers, base.hidden_size)
    vector[3] = 0.0
    same = model_shift(base, base, prompts, vector, batch_size=2)
    assert same.dtype == torch.float32 and same.shape == (base.n_layers,)
    assert torch.equal(same, torch.zeros(base.n_layers))

    tuned = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="float32")
    with torch.no_grad():
        weight = tuned.model.model.layers[1].mlp.down_proj.weight
        weight += 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))
    got = model_shift(base, tuned, prompts, vector, batch_size=2)
    ref = _reference_model_shift(base, tuned, prompts, vector)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:2], torch.zeros(2)) and got[2] != 0 and got[3] == 0

    plot_model_shift(got, "shift", tmp_path / "shift.png")
    assert (tmp_path / "shift.png").stat().st_size > 0


def test_model_shift_rejects_bad_input(tiny):
    base = tiny("llama")
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=base.n_blocks,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(base.tokenizer),
    )
    narrow = ModelHandle.from_model(AutoModelForCausalLM.from_config(config), base.tokenizer, name="narrow")
    prompts = [(None, "Hi?")]
    vector = torch.ones(base.n_layers, base.hidden_size)
    with pytest.raises(InvalidInputError, match="width 32 but narrow has 3 of width 16"):
        model_shift(base, narrow, prompts, vector)
    with pytest.raises(InvalidInputError, match=r"per-layer vector \[n_blocks \+ 1, hidden\]"):
        model_shift(base, base, prompts, vector[0])
    with pytest.raises(InvalidInputError, match="zero at every layer"):
        model_shift(base, base, prompts, torch.zeros_like(vector))
    with pytest.raises(InvalidInputError, match="has 2 rows"):
        model_shift(base, base, prompts, vector[:2])
