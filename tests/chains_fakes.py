"""Test doubles for the chain pipeline: a stdlib OpenAI-compatible fake server, and a "scripted model" that answers
teacher, judge and tagger prompts with plausible, deterministic text (some of it deliberately bad)."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def completion(content: str | None, finish_reason: str = "stop", reasoning: str | None = None) -> dict:
    """A chat.completion body as an OpenAI-compatible server returns it."""
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


# reply(body, call_number) -> (status, payload, headers) ; may sleep to simulate a slow server
Reply = Callable[[dict, int], tuple[int, dict, dict]]


class FakeServer:
    """OpenAI-compatible POST /v1/chat/completions on 127.0.0.1, answering with `reply`; records every body."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.bodies.append(body)
                    number = len(fake.bodies)
                status, payload, headers = fake.reply(body, number)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()  # bytes: sent raw
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def slow(seconds: float, then: Reply) -> Reply:
    def reply(body, number):
        time.sleep(seconds)
        return then(body, number)
    return reply


# ---------------------------------------------------------------------------------------------------------------
# The scripted model
# ---------------------------------------------------------------------------------------------------------------
def _h(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


FREE_NAMES = [["restate_task", "restating_the_task", "task_restatement"],
              ["review_history", "reviewing_history_items", "history_review"],
              ["find_user_pattern", "user_pattern", "finding_patterns"],
              ["choose_answer", "choosing_the_answer", "answer_choice"]]
RESTRICTED = ["analyze_input", "examine_examples", "identify_patterns", "make_decision"]


class ScriptedModel:
    """Answers by prompt role (read off the system message). `golds` maps a request's input text to its gold.

    teacher: `<think>` four sentences `</think>` answer; the answer is wrong for seeds divisible by 5.
    judge: prose around a JSON object; a low total, an unparsable reply or an out-of-range score for some chains.
    explore: the chain's sentences wrapped in free-form names (spelling variants of four functions).
    restricted: the sentences wrapped in four of the nine tags; every 7th chain gets an unknown tag.
    """

    def __init__(self, golds: dict[str, str]):
        self.golds = golds

    def __call__(self, body: dict, number: int) -> tuple[int, dict, dict]:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        seed = body.get("seed", 0)
        if system.startswith("You answer requests"):
            text = self.teacher(user, seed)
        elif system.startswith("You review"):
            text = self.judge(user)
        elif "Use these tags and no others" in system:
            text = self.restricted(user)
        else:
            text = self.explore(user)
        return 200, completion(text), {}

    def teacher(self, user: str, seed: int) -> str:
        request = user.split("Request:\n", 1)[1]
        gold = self.golds[request]
        answer = "nothing like the gold" if seed % 5 == 0 else gold
        chain = (f"The request asks for one answer for this user. The history items show what the user did before. "
                 f"The user keeps to the same habits across items. So the answer is {answer}.")
        return f"<think>\n{chain}\n</think>\n\n{answer}"

    def judge(self, user: str) -> str:
        h = _h(user) % 10
        if h == 0:
            return "I cannot grade this."
        scores = {"logical_coherence": 5, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5}
        if h == 1:
            scores["relevance"] = 2  # total 15: not kept
        if h == 2:
            scores["step_accuracy"] = 7  # out of range
        body = {k: {"reason": "fine", "score": v} for k, v in scores.items()}
        body["total"] = sum(scores.values())
        return f"Here is my grading.\n```json\n{json.dumps(body)}\n```\nDone."

    def _chain(self, user: str) -> str:
        return user.split("<<<\n", 1)[1].rsplit("\n>>>", 1)[0]

    def explore(self, user: str) -> str:
        chain = self._chain(user)
        parts = []
        for i, s in enumerate(_sentences(chain)):
            variants = FREE_NAMES[min(i, 3)]
            name = variants[_h(chain, i) % len(variants)]
            parts.append(f"<{name}>{s}</{name}>")
        return "\n".join(parts)

    def restricted(self, user: str) -> str:
        chain = self._chain(user)
        parts = []
        for i, s in enumerate(_sentences(chain)):
            name = RESTRICTED[min(i, 3)]
            if i == 0 and _h(chain) % 7 == 0:
                name = "ponder"  # not in the set
            parts.append(f"<{name}>{s}</{name}>")
        return "Sure, here it is:\n" + "\n".join(parts)
