import socket
import time

import pytest
import torch
from helpers.judge_server import JudgeServer

from personalab.errors import InvalidInputError
from personalab.judging.judges import (
    CHECK_PROMPT,
    ApiJudge,
    JudgeError,
    LocalJudge,
    aggregate_rows,
    aggregate_scores,
    check_items,
    judge_from_spec,
    score_value,
)

RUBRIC = "Rate the answer 0-100 {literal braces}.\nQuestion: {question}\nAnswer: {answer}\nNumber:"
ENV = ("PERSONALAB_JUDGE_BASE_URL", "PERSONALAB_JUDGE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("7", 7), (" 42", 42), ("100", 100), ("\n55 ", 55), ("99", 99),
        ("1.5", None), ("-3", None), ("101", None), ("007", None), ("00", None), ("", None),
        ("+5", None), ("5%", None), ("٣", None), ("²", None), ("five", None), ("1 0", None),
    ],
)  # fmt: skip
def test_score_value_accepts_plain_integers_0_to_100_only(text, value):
    assert score_value(text) == value


def test_aggregate_scores_is_the_normalised_weighted_mean():
    assert aggregate_scores({"7": 0.5, " 42": 0.3, "100": 0.2}) == pytest.approx(3.5 + 12.6 + 20.0)
    assert aggregate_scores({"80": 1.0}) == 80.0


def test_aggregate_scores_adds_tokens_of_the_same_value():
    # 5 with 0.2 + 0.3, 10 with 0.5: (0.5 * 5 + 0.5 * 10) / 1.0
    assert aggregate_scores({" 5": 0.2, "5": 0.3, "10": 0.5}) == pytest.approx(7.5)


def test_aggregate_scores_ignores_other_tokens_and_renormalises():
    probs = {"1.5": 0.2, "-3": 0.1, "101": 0.1, "007": 0.1, "abc": 0.1, "0": 0.1, "80": 0.3}
    # kept: 0 with 0.1 and 80 with 0.3 -> 24 / 0.4
    assert aggregate_scores(probs) == pytest.approx(60.0)


def test_aggregate_scores_none_below_the_mass_threshold():
    assert aggregate_scores({"60": 0.2, "yes": 0.8}) is None
    assert aggregate_scores({"yes": 1.0}) is None
    assert aggregate_scores({}) is None
    assert aggregate_scores({"60": 0.2, "yes": 0.8}, min_mass=0.1) == pytest.approx(60.0)


def test_aggregate_scores_exactly_at_the_threshold_is_a_score():
    # 0.125 + 0.125 == 0.25 exactly in binary floating point
    assert aggregate_scores({"60": 0.125, "20": 0.125, "no": 0.75}) == pytest.approx(40.0)
    assert aggregate_scores({"60": 0.125, "20": 0.125, "no": 0.75}, min_mass=0.2500001) is None


def test_aggregate_rows_on_a_hand_made_distribution():
    probs = torch.zeros(3, 10)
    probs[0, 2], probs[0, 5], probs[0, 9] = 0.5, 0.25, 0.25  # 10 * 0.5 + 30 * 0.25 over 0.75
    probs[1, 7], probs[1, 0] = 0.2, 0.8  # mass 0.2
    probs[2, 5], probs[2, 0] = 0.25, 0.75  # mass exactly 0.25
    ids, values = torch.tensor([2, 5, 7]), torch.tensor([10.0, 30.0, 100.0])
    rows = aggregate_rows(probs, ids, values)
    assert rows[0] == pytest.approx((10 * 0.5 + 30 * 0.25) / 0.75)
    assert rows[1] is None
    assert rows[2] == pytest.approx(30.0)
    assert aggregate_rows(probs, ids, values, min_mass=0.1)[1] == pytest.approx(100.0)
    assert aggregate_rows(probs, torch.tensor([], dtype=torch.long), torch.tensor([]), min_mass=0.0) == [None] * 3


def api_judge(server: JudgeServer, **kwargs) -> ApiJudge:
    return ApiJudge("judge-model", base_url=server.base_url, **{"backoff": 0.01, **kwargs})


def test_api_judge_scores_the_weighted_mean_of_the_servers_distribution():
    dist = {"10": 0.4, " 90": 0.3, "hello": 0.2, "70": 0.1}
    with JudgeServer(scorer=lambda prompt: dist) as server:
        score = api_judge(server).score("What?", "That.", RUBRIC)
    assert score == pytest.approx((0.4 * 10 + 0.3 * 90 + 0.1 * 70) / 0.8)
    assert server.calls == 1


def test_api_judge_sees_only_the_top_20_tokens():
    # 25 tokens: "0".."24" with decreasing probability; the server sends the 20 most likely (values 0..19)
    weights = [2.0**-k for k in range(25)]
    dist = {str(k): w / sum(weights) for k, w in enumerate(weights)}
    top = {k: dist[str(k)] for k in range(20)}
    with JudgeServer(scorer=lambda prompt: dist) as server:
        score = api_judge(server).score("q", "a", RUBRIC)
    assert len(server.requests) == 1
    assert score == pytest.approx(sum(k * p for k, p in top.items()) / sum(top.values()))


def test_api_judge_returns_none_when_numbers_hold_little_mass():
    with JudgeServer(scorer=lambda prompt: {"I": 0.9, "40": 0.1}) as server:
        assert api_judge(server).score("q", "a", RUBRIC) is None


def test_api_judge_request_body():
    with JudgeServer() as server:
        api_judge(server).score("Why is the sky blue?", "Rayleigh scattering.", RUBRIC)
    (body,) = server.requests
    assert body["model"] == "judge-model"
    assert body["messages"] == [
        {
            "role": "user",
            "content": "Rate the answer 0-100 {literal braces}.\nQuestion: Why is the sky blue?\n"
            "Answer: Rayleigh scattering.\nNumber:",
        }
    ]
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 20
    assert body["max_tokens"] == 1
    assert body["temperature"] == 0
    assert body["seed"] == 0


def test_api_judge_name_and_environment_fallbacks(monkeypatch):
    with JudgeServer(scorer=lambda prompt: {"30": 1.0}) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        judge = ApiJudge("m")
        assert judge.name == "api:m" and judge.base_url == server.base_url
        assert judge.client.api_key == "EMPTY"
        assert judge.score("q", "a", RUBRIC) == 30.0
    monkeypatch.delenv("PERSONALAB_JUDGE_BASE_URL")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert ApiJudge("m").base_url == "http://127.0.0.1:9/v1"
    assert ApiJudge("m").client.api_key == "sk-openai"
    monkeypatch.setenv("PERSONALAB_JUDGE_API_KEY", "sk-judge")
    assert ApiJudge("m").client.api_key == "sk-judge"
    assert ApiJudge("m", api_key="sk-arg").client.api_key == "sk-arg"


def test_api_judge_retries_server_errors():
    with JudgeServer(scorer=lambda prompt: {"20": 0.5, "60": 0.5}, fail_first=2) as server:
        assert api_judge(server).score("q", "a", RUBRIC) == pytest.approx(40.0)
    assert server.calls == 3


def test_api_judge_gives_up_after_max_retries():
    with JudgeServer(fail_first=5) as server, pytest.raises(JudgeError, match="failed after 3 attempts"):
        api_judge(server, max_retries=2).score("q", "a", RUBRIC)
    assert server.calls == 3


def test_api_judge_down_raises_one_line_naming_the_server():
    with JudgeServer(mode="down") as server:
        with pytest.raises(JudgeError) as err:
            api_judge(server, max_retries=2).score("q", "a", RUBRIC)
    message = str(err.value)
    assert "\n" not in message
    assert server.base_url in message
    assert "PERSONALAB_JUDGE_BASE_URL" in message
    assert server.calls == 3


def test_api_judge_garbage_raises_after_retries():
    with JudgeServer(mode="garbage") as server:
        with pytest.raises(JudgeError, match="failed after 4 attempts") as err:
            api_judge(server, max_retries=3).score("q", "a", RUBRIC)
    assert "\n" not in str(err.value)
    assert server.calls == 4


def test_api_judge_timeout_is_bounded():
    start = time.monotonic()
    with JudgeServer(delay=1.0) as server:
        with pytest.raises(JudgeError, match="failed after 2 attempts"):
            api_judge(server, timeout=0.2, max_retries=1).score("q", "a", RUBRIC)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    assert server.calls == 2


def test_api_judge_client_errors_are_not_retried():
    with JudgeServer() as server:
        judge = ApiJudge("m", base_url=server.base_url + "/missing", max_retries=1, backoff=5.0)
        start = time.monotonic()
        with pytest.raises(JudgeError, match="refused the request") as err:
            judge.score("q", "a", RUBRIC)
    assert time.monotonic() - start < 2.0
    assert "\n" not in str(err.value)


def test_api_judge_score_many_keeps_order():
    def scorer(prompt: str) -> dict[str, float]:
        v = int(prompt.split("Answer: ")[1].split("\n")[0])
        return {str(v): 0.6, str(100 - v): 0.4}

    values = [3, 97, 12, 41, 88, 0, 100, 65, 23, 76, 1, 59]
    items = [(f"question {i}", str(v), RUBRIC) for i, v in enumerate(values)]
    with JudgeServer(scorer=scorer, delay=0.02) as server:
        judge = api_judge(server, concurrency=4)
        scores = judge.score_many(items)
        assert judge.score_many([]) == []
    assert scores == pytest.approx([0.6 * v + 0.4 * (100 - v) for v in values])
    assert server.calls == len(values)


def test_api_judge_score_many_propagates_failures():
    with JudgeServer(mode="down") as server, pytest.raises(JudgeError):
        api_judge(server, max_retries=0, concurrency=2).score_many([("q", str(i), RUBRIC) for i in range(6)])


ITEMS = [
    ("What is bread?", "Bread is food made from flour, water and salt, baked in an oven.", RUBRIC),
    ("Hi?", "No.", RUBRIC),
    ("Tell me a story.", "Once upon a time there was a little girl named Lily who loved the sun.", RUBRIC),
    ("How was your day?", "Fine.", "Score {answer} for {question}:"),
    ("How do I bake bread?", "Mix flour, water, salt and yeast, then bake it for an hour.", RUBRIC),
]


def reference(handle, items):
    """``(mean, mass)`` per item: each prompt run alone, integer tokens found by scanning the vocabulary."""
    numbers = {str(v): v for v in range(101)}
    found = {}
    for i in range(len(handle.tokenizer)):
        text = handle.tokenizer.decode([i]).strip()
        if text in numbers:
            found[i] = numbers[text]
    out = []
    for question, answer, rubric in items:
        ids = handle.encode(None, rubric.replace("{question}", question).replace("{answer}", answer)).ids
        with torch.no_grad():
            logits = handle.model(torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(logits.double(), -1)
        mass = sum(float(probs[i]) for i in found)
        out.append((sum(float(probs[i]) * v for i, v in found.items()) / mass, mass))
    return found, out


def test_local_judge_matches_a_direct_computation(tiny):
    handle = tiny("llama", "chatml")
    found, ref = reference(handle, ITEMS)
    assert found, "the tokenizer has digit tokens"
    judge = LocalJudge(handle, batch_size=2, min_mass=0.0)
    assert dict(zip(judge.ids.tolist(), judge.values.tolist(), strict=True)) == found
    assert judge.name == f"local:{handle.name}"
    batched = judge.score_many(ITEMS)
    one_by_one = [LocalJudge(handle, batch_size=1, min_mass=0.0).score(*item) for item in ITEMS]
    for got, alone, (mean, _) in zip(batched, one_by_one, ref, strict=True):
        assert got == pytest.approx(mean, abs=1e-5)
        assert alone == pytest.approx(mean, abs=1e-5)


def test_local_judge_none_exactly_when_mass_is_below_threshold(tiny):
    handle = tiny("llama", "chatml")
    _, ref = reference(handle, ITEMS)
    scores = LocalJudge(handle, batch_size=2).score_many(ITEMS)
    for got, (mean, mass) in zip(scores, ref, strict=True):
        if mass < 0.25:
            assert got is None
        else:
            assert got == pytest.approx(mean, abs=1e-5)
    threshold = sorted(mass for _, mass in ref)[2]
    scores = LocalJudge(handle, batch_size=3, min_mass=threshold).score_many(ITEMS)
    for got, (mean, mass) in zip(scores, ref, strict=True):
        if mass < threshold - 1e-6:
            assert got is None
        elif mass > threshold + 1e-6:
            assert got == pytest.approx(mean, abs=1e-5)
    assert sum(s is not None for s in scores) >= 2


def test_a_local_judge_that_cannot_score_the_fixed_answers_is_refused(tiny):
    handle = tiny("llama", "chatml")
    _, ref = reference(handle, check_items())
    masses = [mass for _, mass in ref]
    judge = LocalJudge(handle)
    assert judge.number_mass(check_items()) == pytest.approx(masses, abs=1e-6)
    assert min(masses) < 0.25, "a random tiny model puts little of its probability on numbers"
    with pytest.raises(JudgeError, match=f"as little as {min(masses):.1%} .* for 3 fixed answers") as err:
        judge.check()
    assert "\n" not in str(err.value)
    LocalJudge(handle, min_mass=min(masses) * 0.99).check()


def test_smollm2_is_refused_as_a_judge_and_says_how_little_it_puts_on_numbers(smollm2):
    """SmolLM2-135M-Instruct answers the coherence rubric with a number often enough, a trait rubric almost never."""
    _, ref = reference(smollm2, check_items())
    assert ref[2][1] < 0.05 and min(mass for _, mass in ref) == ref[2][1]
    with pytest.raises(JudgeError, match=f"as little as {ref[2][1]:.1%}"):
        LocalJudge(smollm2).check()


def test_an_api_judge_that_answers_the_check_without_a_number_is_refused():
    with JudgeServer(scorer=lambda prompt: {"Sure": 0.9, "5": 0.1}) as server:
        with pytest.raises(JudgeError, match=r"put 10\.0% of its first-token probability on the numbers"):
            ApiJudge("j", base_url=server.base_url).check()
        assert server.calls == 1


def test_judge_from_spec(model_folder):
    judge = judge_from_spec("api:gpt-4.1-mini", base_url="http://127.0.0.1:9/v1", timeout=1.0)
    assert isinstance(judge, ApiJudge)
    assert judge.model == "gpt-4.1-mini"
    assert judge.name == "api:gpt-4.1-mini" and judge.base_url == "http://127.0.0.1:9/v1"
    folder = str(model_folder("llama", "chatml"))
    local = judge_from_spec(f"local:{folder}")
    assert isinstance(local, LocalJudge)
    assert local.name == f"local:{folder}"
    for spec in ("gpt-4.1-mini", "api:", "local:", "hf:model", "", "API:model"):
        with pytest.raises(InvalidInputError, match="use api:MODEL, local:MODEL or lexicon:\[FILE\]"):
            judge_from_spec(spec)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_check_at_a_closed_port_fails_fast_naming_url_and_variable(monkeypatch):
    url = _closed_port_url()
    monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", url)
    judge = ApiJudge("j")
    start = time.monotonic()
    with pytest.raises(JudgeError) as err:
        judge.check()
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message and url in message and "from PERSONALAB_JUDGE_BASE_URL" in message
    assert "set PERSONALAB_JUDGE_BASE_URL" in message


def test_check_waits_for_a_cold_server_and_not_for_a_closed_port():
    with JudgeServer(cold=7.0) as server:
        ApiJudge("j", base_url=server.base_url, timeout=30).check()  # a 6 s check gave up on such a server
        assert server.calls == 1
    with JudgeServer(delay=3.0) as server:
        with pytest.raises(JudgeError, match="APITimeoutError"):
            ApiJudge("j", base_url=server.base_url, timeout=1).check()
    start = time.monotonic()
    with pytest.raises(JudgeError, match="APIConnectionError"):
        ApiJudge("j", base_url=_closed_port_url(), timeout=300).check()
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        (dict(mode="garbage"), "failed after 2 attempts"),
        (dict(scorer=lambda prompt: {}), "without logprobs"),
        (dict(fail_first=1), None),
    ],
)
def test_check_sends_one_cheap_request(server, needle):
    with JudgeServer(**server) as s:
        judge = ApiJudge("j", base_url=s.base_url)
        if needle is None:
            judge.check()
            assert s.calls == 2
        else:
            with pytest.raises(JudgeError, match=needle):
                judge.check()
        assert all(r["max_tokens"] == 1 and r["messages"][-1]["content"] == CHECK_PROMPT for r in s.requests)


def test_commands_fail_on_a_dead_judge_before_loading_the_model(model_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.engine import loading as model

    loaded = []
    monkeypatch.setattr(model, "load_weights", lambda *a, **k: loaded.append(a))
    url = _closed_port_url()
    args = ["extract", "--model", str(model_folder("llama")), "--trait", "evil", "--judge", "api:j"]
    start = time.monotonic()
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "run")], env={"PERSONALAB_JUDGE_BASE_URL": url})
    assert time.monotonic() - start < 15
    assert result.exit_code == 1 and loaded == []
    lines = result.output.strip().splitlines()
    assert lines[0] == f"judge: api:j at {url} (from PERSONALAB_JUDGE_BASE_URL)"
    assert len(lines) == 2 and lines[1].startswith("error: judge j at " + url) and not (tmp_path / "run").exists()
