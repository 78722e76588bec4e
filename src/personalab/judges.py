"""Judges score an answer 0-100 from the logprobs of the judge's first output token.

The judge is shown the trait's rubric with the question and answer filled in and asked for
one number. Its first output token is not sampled: the score is the probability-weighted
mean of the integers 0..100 among the candidate tokens, normalised by their total
probability. A token counts when its text, stripped of whitespace, is an integer 0..100
written in plain ASCII digits without leading zeros ("0", " 7", "42", "100"; not "007",
"1.5", "-3", "101"). When those tokens hold less than ``min_mass`` (0.25) of the
probability the judge did not answer with a number and the score is ``None``.
A judge that cannot be reached or answers garbage raises ``JudgeError``, never a score.
"""

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personalab.batching import length_sorted_batches, pad_batch
from personalab.errors import InvalidInputError, PersonalabError
from personalab.model import ModelHandle, load_model, unwrap
from personalab.traits.schema import render_rubric

if TYPE_CHECKING:
    import openai

MIN_MASS = 0.25
TOP_LOGPROBS = 20
_SCORE_TEXT = re.compile(r"0|[1-9][0-9]?|100")


class JudgeError(PersonalabError):
    """The judge could not produce a score (server down, garbage answers)."""


class Judge(Protocol):
    """Scores ``(question, answer, rubric)``; ``name`` identifies the judge in cache keys."""

    name: str

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        """The score 0-100, or ``None`` when the judge gave no number."""
        ...

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
        """Scores of ``(question, answer, rubric)`` items, in input order."""
        ...


def score_value(text: str) -> int | None:
    """The integer 0..100 that token ``text`` stands for, or ``None`` (rule: see the module docstring)."""
    stripped = text.strip()
    return int(stripped) if _SCORE_TEXT.fullmatch(stripped) else None


def aggregate_scores(probs: Mapping[str, float], min_mass: float = MIN_MASS) -> float | None:
    """Weighted mean of the integer tokens in ``probs`` (token text -> probability).

    Tokens with the same value (" 5" and "5") add up; ``None`` when their total is below ``min_mass``.
    """
    mass = weighted = 0.0
    for text, p in probs.items():
        value = score_value(text)
        if value is not None:
            mass += p
            weighted += p * value
    if mass <= 0 or mass < min_mass:
        return None
    return weighted / mass


def aggregate_rows(
    probs: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, min_mass: float = MIN_MASS
) -> list[float | None]:
    """Scores of the rows of ``probs`` (``[batch, vocab]`` probabilities) over token ``ids`` worth ``values``."""
    p = probs[:, ids.to(probs.device)].double().cpu()
    mass = p.sum(-1)
    means = (p * values.double()).sum(-1) / mass.clamp(min=torch.finfo(torch.float64).tiny)
    return [float(m) if s > 0 and s >= min_mass else None for m, s in zip(means.tolist(), mass.tolist(), strict=True)]


def _resolve(value: str | None, *env: str) -> str | None:
    if value:
        return value
    return next((os.environ[name] for name in env if os.environ.get(name)), None)


def openai_client(
    base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 2
) -> "openai.OpenAI":
    """An ``openai.OpenAI`` client for an OpenAI-compatible server.

    ``base_url`` falls back to ``PERSONALAB_JUDGE_BASE_URL``, then ``OPENAI_BASE_URL``, then
    openai's default; ``api_key`` to ``PERSONALAB_JUDGE_API_KEY``, then ``OPENAI_API_KEY``,
    then ``"EMPTY"`` (local servers need none).
    """
    try:
        import openai
    except ImportError:
        raise PersonalabError("the openai package is missing; pip install 'personalab[api]'") from None
    return openai.OpenAI(
        base_url=_resolve(base_url, "PERSONALAB_JUDGE_BASE_URL", "OPENAI_BASE_URL"),
        api_key=_resolve(api_key, "PERSONALAB_JUDGE_API_KEY", "OPENAI_API_KEY") or "EMPTY",
        timeout=timeout,
        max_retries=max_retries,
    )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ApiJudge:
    """A judge behind any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp).

    One request per item (``max_tokens=1``, ``temperature=0``, ``top_logprobs=20``);
    the score aggregates the top-20 first tokens. Connection errors, timeouts, 5xx, 429
    and malformed answers are retried ``max_retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds); a malformed answer is a missing field or a body that
    is not JSON (``ValueError``). Other API errors (400, 401, 404...) fail at once.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        concurrency: int = 8,
        min_mass: float = MIN_MASS,
    ) -> None:
        if concurrency < 1 or max_retries < 0:
            raise InvalidInputError(f"concurrency must be >= 1 and max_retries >= 0, not {concurrency}, {max_retries}")
        self.client = openai_client(base_url, api_key, timeout=timeout, max_retries=0)
        self.model = model
        self.base_url = str(self.client.base_url).rstrip("/")
        self.name = f"api:{model}@{self.base_url}"
        self.max_retries, self.backoff, self.concurrency, self.min_mass = max_retries, backoff, concurrency, min_mass

    def _request(self, prompt: str) -> dict[str, float]:
        reply: Any = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
            seed=0,
        )
        probs: dict[str, float] = {}
        for candidate in reply.choices[0].logprobs.content[0].top_logprobs:
            probs[candidate.token] = probs.get(candidate.token, 0.0) + math.exp(candidate.logprob)
        return probs

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        import openai

        transient = (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.InternalServerError,
            openai.RateLimitError,
            openai.APIResponseValidationError,
            AttributeError,
            IndexError,
            KeyError,
            TypeError,
            ValueError,
        )
        prompt = render_rubric(rubric, question, answer)
        for attempt in range(self.max_retries + 1):
            try:
                return aggregate_scores(self._request(prompt), self.min_mass)
            except openai.APIStatusError as exc:
                if not isinstance(exc, transient):
                    raise JudgeError(
                        f"judge {self.model} at {self.base_url} refused the request: {_reason(exc)}; "
                        f"check the model name and PERSONALAB_JUDGE_API_KEY"
                    ) from exc
                failure: BaseException = exc
            except transient as exc:
                failure = exc
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise JudgeError(
            f"judge {self.model} at {self.base_url} failed after {self.max_retries + 1} attempts: {_reason(failure)}; "
            f"is the judge server running? set --judge or PERSONALAB_JUDGE_BASE_URL"
        ) from failure

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
        """Score ``concurrency`` items at a time; the first ``JudgeError`` cancels the rest and propagates."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(lambda item: self.score(*item), items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class LocalJudge:
    """A Hugging Face chat model as judge, scored from its full next-token distribution.

    The prompt is the rendered rubric as one user turn with the generation prompt. All
    integer tokens of the vocabulary count (a superset of an API judge's top-20), so the
    two kinds of judge agree when the integer tokens hold most of the probability.
    """

    def __init__(self, handle: ModelHandle, batch_size: int = 8, min_mass: float = MIN_MASS) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, not {batch_size}")
        self.handle, self.batch_size, self.min_mass = handle, batch_size, min_mass
        self.name = f"local:{handle.name}"
        vocab = min(len(handle.tokenizer), unwrap(handle.model).config.get_text_config().vocab_size)
        texts = handle.tokenizer.batch_decode([[i] for i in range(vocab)])
        found = [(i, v) for i, v in enumerate(map(score_value, texts)) if v is not None]
        self.ids = torch.tensor([i for i, _ in found], dtype=torch.long)
        self.values = torch.tensor([v for _, v in found], dtype=torch.float32)

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        return self.score_many([(question, answer, rubric)])[0]

    @torch.inference_mode()
    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
        """One forward per length-sorted, left-padded batch; results in input order."""
        handle = self.handle
        prompts = [handle.encode(None, render_rubric(r, q, a)).ids for q, a, r in items]
        scores: list[float | None] = [None] * len(prompts)
        for rows in length_sorted_batches([len(p) for p in prompts], self.batch_size):
            batch = pad_batch([prompts[i] for i in rows], handle.tokenizer.pad_token_id, "left", handle.input_device)
            logits = handle.model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits
            probs = torch.softmax(logits[:, -1].float(), dim=-1)
            for i, s in zip(rows, aggregate_rows(probs, self.ids, self.values, self.min_mass), strict=True):
                scores[i] = s
        return scores


def judge_from_spec(spec: str, **kwargs: Any) -> Judge:
    """``"api:MODEL"`` -> ``ApiJudge(MODEL, **kwargs)``; ``"local:NAME_OR_PATH"`` -> ``LocalJudge`` of that model."""
    kind, _, target = spec.partition(":")
    if kind == "api" and target:
        return ApiJudge(target, **kwargs)
    if kind == "local" and target:
        return LocalJudge(load_model(target))
    raise InvalidInputError(f"unknown judge {spec!r}; use api:MODEL or local:MODEL")
