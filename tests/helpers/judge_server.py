"""A local HTTP server speaking the OpenAI chat-completions wire format, for testing judges.

``scorer(prompt)`` gives the first-token distribution (token text -> probability) for the
last user message; the answer carries the up to 20 most likely tokens as ``top_logprobs``.
Modes: ``"ok"``; ``"down"`` (always HTTP 500); ``"garbage"`` (200 with a body that is not
JSON). ``fail_first=N`` answers the first N requests with 500; ``delay`` sleeps before answering,
``cold`` before answering the first request only (a server's cold start).
"""

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("ok", "down", "garbage")


def hashed_scores(prompt: str) -> dict[str, float]:
    """A scorer for ``JudgeServer``: coherence 80 for the coherence rubric, else a trait score 0-100 from the
    prompt's hash, so some extraction pairs pass the filter and some do not, the same on every run."""
    from personalab.traits import COHERENCE_RUBRIC

    if prompt.startswith(COHERENCE_RUBRIC.split("{question}")[0]):
        return {"80": 1.0}
    return {str(int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) % 101): 1.0}


def completion(model: str, probs: dict[str, float]) -> dict:
    """A ``chat.completion`` object whose first token has the distribution ``probs``."""
    ranked = sorted(((t, p) for t, p in probs.items() if p > 0), key=lambda tp: -tp[1])[:20]
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in ranked]
    first = top[0] if top else {"token": "", "logprob": 0.0, "bytes": []}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": first["token"]},
                "finish_reason": "length",
                "logprobs": {"content": [{**first, "top_logprobs": top}]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class JudgeServer:
    """Context manager: serves on 127.0.0.1 (a free port) in a daemon thread until exit.

    ``base_url`` is the ``/v1`` root, ``requests`` the parsed JSON bodies received, ``calls`` their number.
    """

    def __init__(
        self,
        scorer: Callable[[str], dict[str, float]] | None = None,
        mode: str = "ok",
        fail_first: int = 0,
        delay: float = 0.0,
        cold: float = 0.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.scorer = scorer or (lambda prompt: {"50": 1.0})
        self.mode, self.fail_first, self.delay, self.cold = mode, fail_first, delay, cold
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "JudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, body: dict) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
        if self.delay or (n == 1 and self.cold):
            time.sleep(self.delay + (self.cold if n == 1 else 0.0))
        if self.mode == "down" or n <= self.fail_first:
            return 500, json.dumps({"error": {"message": "internal error", "type": "server_error"}}).encode()
        if self.mode == "garbage":
            return 200, b"this is not json"
        prompt = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        return 200, json.dumps(completion(body.get("model", ""), self.scorer(prompt))).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload = 404, b'{"error": {"message": "not found"}}'
                else:
                    status, payload = server._answer(json.loads(raw))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, format: str, *args) -> None:
                pass

        return Handler
