"""Stand-ins for judges and API clients: deterministic scores, a scripted judge, a trait, an OpenAI-shaped client,
local-judge scorers over token probabilities, and an extraction run as a separate process."""

import hashlib
import os
import signal
import subprocess
import sys

from personalab.errors import PersonalabError
from personalab.traits import COHERENCE_RUBRIC, Trait


def hashed_score(answer: str) -> float:
    """A deterministic stand-in for a judge: a score 0-100 from the answer's hash."""
    return float(int(hashlib.sha256(answer.encode()).hexdigest()[:6], 16) % 101)


class ScriptedJudge:
    """Trait score from the answer's hash, coherence fixed; counts and can fail after ``fail_after`` items."""

    name = "scripted"

    def __init__(self, coherence: float = 80.0, trait=hashed_score, fail_after: int | None = None):
        self.coherence, self.trait, self.fail_after, self.calls = coherence, trait, fail_after, 0

    def score(self, question, answer, rubric):
        return self.score_many([(question, answer, rubric)])[0]

    def score_many(self, items):
        out = []
        for _question, answer, rubric in items:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise PersonalabError("judge server is down")
            self.calls += 1
            out.append(self.coherence if rubric == COHERENCE_RUBRIC else self.trait(answer))
        return out


TRAIT = Trait(
    name="grumpy",
    description="Complains about everything.",
    instructions=[
        {"pos": "You are grumpy and rude.", "neg": "You are cheerful and kind."},
        {"pos": "Complain about everything.", "neg": "Praise everything."},
    ],
    extraction_questions=["How was your day?", "What is bread?", "Tell me a story."],
    evaluation_questions=["Do you like rain?"],
    rubric="Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:",
)


class _Reply:
    def __init__(self, content):
        self.choices = [type("C", (), {"message": type("M", (), {"content": content})()})()]


class FakeClient:
    """Duck-typed ``openai.OpenAI`` whose chat completions return scripted replies."""

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []
        self.chat = type("Chat", (), {"completions": self})()

    def create(self, model, messages, **kwargs):
        self.seen.append([dict(m) for m in messages])
        return _Reply(self.replies.pop(0))


def token_scorer(prompt: str) -> dict[str, float]:
    if prompt.startswith(COHERENCE_RUBRIC.split("{question}")[0]):
        return {"80": 1.0}
    value = int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) % 101
    return {str(value): 1.0}


def split_token_scorer(prompt: str) -> dict[str, float]:
    if prompt.startswith(COHERENCE_RUBRIC.split("{question}")[0]):
        return {"80": 1.0}
    value = int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) % 101
    return {str(value): 0.7, str(100 - value): 0.3}


def extract_process(folder, trait_file, out, base_url, samples: int = 4, batch_size: int = 1, max_new_tokens: int = 24):
    cmd = [
        sys.executable,
        "-m",
        "personalab",
        "extract",
        "--model",
        str(folder),
        "--trait",
        str(trait_file),
        "--judge",
        "api:judge",
        "--samples",
        str(samples),
        "--max-new-tokens",
        str(max_new_tokens),
        "--batch-size",
        str(batch_size),
        "--min-pairs",
        "1",
        "--seed",
        "5",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PERSONALAB_JUDGE_BASE_URL": base_url, "PERSONALAB_JUDGE_API_KEY": "none"}
    # Ctrl-C as on a terminal: a shell without job control starts background jobs with SIGINT ignored, and a child
    # inherits that, so the run is given the default disposition whatever started the tests.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
