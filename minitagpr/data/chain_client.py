"""The chain pipeline's way to an OpenAI-compatible endpoint: a resumable response cache and a retrying client.

A chain build sends tens of thousands of paid requests to a hosted API or a local vLLM server over hours. This
module makes such a run survive crashes, rate limits and flaky servers without paying for any answer twice:

- `ResponseCache`: an append-only JSONL file, one line `{"key", "stage", "model", "response"}` per answered request.
  Every line is written whole with one write, then flushed and fsync'ed before the answer is used, so a run killed
  at any moment leaves at most one torn last line; reopening the cache detects it, cuts it off and carries on. A
  bad line anywhere else is an error naming the file and line (never skipped). A key on two lines (an unusable
  answer asked again) counts with its last line. An exclusive lock (flock) keeps two runs from sharing one cache
  file.
- `request_key`: sha256 of the canonical JSON of (model, messages, sampling parameters, sample index, and
  `cache_tag` when set). Endpoint URL, key, concurrency and timeouts are not part of it: they do not change what
  was asked. A server that answers under one model name whatever it serves (a local vLLM or minitagpr.serve
  restarted on a retrained checkpoint) gives the new weights the old answers: set `cache_tag` (e.g. the
  checkpoint's step) so that they are asked again.
- `ChatClient.run(requests)`: answers an iterable of `ChatRequest`s in their order, from the cache when it can,
  otherwise with at most `concurrency` calls in flight (threads). Rate limits (429, honouring `retry-after-ms` /
  `retry-after`), server errors (5xx, 408, 409), connection errors, timeouts and 200 replies that hold no chat
  completion are retried with exponential backoff and jitter; so are replies whose message
  content is neither text, a list of text parts (joined into one string) nor null (`checked_response`), and
  such a reply is never cached (one cached by an older version is asked again). A request the server refuses as
  asked (400, 413, 422: a content filter, a prompt over the served context length) is answered with a refusal
  (`content` null, `finish_reason` "refused", the reason under `refusal`) that the stage drops with its record;
  refusals are not cached (a rerun asks again) and `max_refused_in_a_row` of them in a row stop the run (a setting
  every request trips is a configuration error, not that many bad records). Other 4xx fail at once. When a request still
  fails, no new call is started, the calls in flight finish and are cached, and `EndpointError` names the stage,
  the endpoint, the model and the request. A KeyboardInterrupt behaves the same way. Either way, rerunning the
  same command resumes where the run stopped. (A SIGKILL loses the answers in flight, at most `concurrency`.)

Endpoint settings come from `EndpointConfig` fields, else from the environment: `MINITAGPR_<ROLE>_BASE_URL`,
`MINITAGPR_<ROLE>_MODEL`, `MINITAGPR_<ROLE>_API_KEY` (ROLE = TEACHER, JUDGE or TAGGER), then `OPENAI_BASE_URL` and
`OPENAI_API_KEY`. The API key is only ever held in memory: it is not part of any cache key, log line, error message
or saved config (`redacted_config`), and `Endpoint`'s repr hides it.
"""
from __future__ import annotations

import dataclasses
import email.utils
import fcntl
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
import urllib.parse
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx: the answers a later identical request may not get
REFUSAL_STATUS = frozenset({400, 413, 422})  # this request, as asked, will not be answered: drop its record
REFUSED = "refused"  # the finish_reason of a refusal (module docstring)


class EndpointError(RuntimeError):
    """An endpoint that kept failing (or refused a request outright); names the stage, endpoint and request."""


class CacheError(ValueError):
    """A cache file that cannot be used; names the file and line."""


class MalformedReply(ValueError):
    """A successful HTTP reply that is no chat completion (e.g. a proxy's page); retried, never cached."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Endpoint settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EndpointConfig:
    """One role's endpoint (teacher, judge or tagger) and how to sample from it."""

    base_url: str = ""            # empty: $MINITAGPR_<ROLE>_BASE_URL, then $OPENAI_BASE_URL
    model: str = ""               # empty: $MINITAGPR_<ROLE>_MODEL
    api_key: str = field(default="", repr=False)  # prefer the environment; never saved (redacted_config)
    api_key_env: str = ""         # variable holding the key; empty: MINITAGPR_<ROLE>_API_KEY, then OPENAI_API_KEY
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096        # reply length cap in tokens, sent under token_limit_param
    token_limit_param: str = "max_tokens"  # or "max_completion_tokens" (hosted reasoning models want that one)
    send_seed: bool = True        # send a per-request seed (reproducible samples where the server honours it)
    enable_thinking: bool | None = None  # sent as chat_template_kwargs.enable_thinking when set (vLLM, serve)
    concurrency: int = 8          # calls in flight at once
    timeout_s: float = 600.0      # per call
    max_retries: int = 6          # retries after the first attempt
    backoff_s: float = 1.0        # first retry delay; doubles every retry, times a jitter factor in [0.5, 1]
    max_backoff_s: float = 60.0   # cap on a retry delay before the jitter factor
    max_retry_after_s: float = 300.0  # cap on a server's retry-after
    max_refused_in_a_row: int = 20  # refused requests (400/413/422) in a row that stop the run; 1: any refusal
    cache_tag: str = ""  # part of every cache key when set: other weights served under the same model name

    def __post_init__(self):
        if self.token_limit_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(f"token_limit_param must be max_tokens or max_completion_tokens, "
                             f"got {self.token_limit_param!r}")
        for name in ("concurrency", "max_tokens", "max_refused_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be >= 0 and timeout_s > 0")

    def sampling_params(self) -> dict[str, Any]:
        """The request fields that shape the answer (part of the cache key), without the per-request seed."""
        params: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                                  self.token_limit_param: self.max_tokens}
        if self.enable_thinking is not None:
            params["extra_body"] = {"chat_template_kwargs": {"enable_thinking": self.enable_thinking}}
        return params


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: where to send and which model to ask. The key is kept out of repr and str."""

    role: str
    base_url: str
    model: str
    api_key: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.base_url} (model {self.model!r})"


def resolve_endpoint(cfg: EndpointConfig, role: str, env: dict[str, str] | None = None) -> Endpoint:
    """`cfg`'s fields, falling back to the environment (module docstring); a missing URL or model is an error."""
    env = os.environ if env is None else env
    prefix = f"MINITAGPR_{role.upper()}_"
    base_url = cfg.base_url or env.get(prefix + "BASE_URL") or env.get("OPENAI_BASE_URL") or ""
    model = cfg.model or env.get(prefix + "MODEL") or ""
    if not base_url:
        raise EndpointError(f"{role}: no endpoint URL; set {role}.base_url=... or ${prefix}BASE_URL or "
                            f"$OPENAI_BASE_URL")
    if not model:
        raise EndpointError(f"{role}: no model name; set {role}.model=... or ${prefix}MODEL")
    url = urllib.parse.urlsplit(base_url)  # checked now: six retries of each request could never fix these
    try:
        url.port  # raises on a port out of range or not a number
        why = ("needs http:// or https://" if url.scheme not in ("http", "https")
               else "names no host" if not url.hostname else "")
    except ValueError as err:
        why = str(err)
    if why:
        raise EndpointError(f"{role}: base_url {base_url!r}: {why} (e.g. http://127.0.0.1:8000/v1)")
    if cfg.api_key_env:
        key = env.get(cfg.api_key_env, "")
        if not key and not cfg.api_key:
            raise EndpointError(f"{role}: {role}.api_key_env names ${cfg.api_key_env}, which is not set")
    else:
        key = env.get(prefix + "API_KEY") or env.get("OPENAI_API_KEY") or ""
    # Local servers (vLLM, minitagpr.serve) need no key, but the openai client insists on a non-empty one.
    return Endpoint(role, base_url.rstrip("/"), model, cfg.api_key or key or "EMPTY")


def redacted_config(obj: Any) -> Any:
    """A config dataclass as a plain dict with every `api_key` field replaced, for saving next to the outputs."""
    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if k == "api_key" and v else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node
    return scrub(dataclasses.asdict(obj))


# ---------------------------------------------------------------------------------------------------------------
# 2. The response cache
# ---------------------------------------------------------------------------------------------------------------
def request_key(model: str, messages: list[dict], params: dict[str, Any], sample: int, cache_tag: str = "") -> str:
    """sha256 of the canonical JSON of everything that decides an answer (module docstring)."""
    fields = {"model": model, "messages": messages, "params": params, "sample": sample}
    if cache_tag:  # absent when unset: caches written before the field existed keep their keys
        fields["cache_tag"] = cache_tag
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()  # (valid text: plain UTF-8)


class ResponseCache:
    """Append-only JSONL of answered requests, indexed by key -> (offset, length) so answers stay on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # a+: appends go to the end whatever the read position
        try:
            # One writer per cache: a second run on the same folder would interleave lines with ours.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise CacheError(f"{self.path}: another process is using this cache (is a second build running on the "
                             f"same output folder?)") from None
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, int]] = {}
        self.torn_lines = 0
        self._load()

    def _load(self) -> None:
        """Index every line (streamed: the file may hold gigabytes of answers); cut off a torn last line."""
        size = os.fstat(self._file.fileno()).st_size
        self._file.seek(0)
        offset = 0
        for line_no, line in enumerate(self._file, 1):  # binary lines keep their b"\n"
            last = offset + len(line) == size
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline at the end")
                record = json.loads(line)
                if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                        and isinstance(record.get("response"), dict)):
                    raise ValueError("a line must be an object with a string 'key' and an object 'response'")
            except ValueError as err:
                if not last:
                    raise CacheError(f"{self.path}: line {line_no}: not a cache record ({err}); the file is damaged "
                                     f"before its end, so it was not written by this program alone") from None
                # A torn last line (a write cut short by a kill): cut it off so the next append starts cleanly.
                self._file.truncate(offset)
                self._file.flush()
                os.fsync(self._file.fileno())
                self.torn_lines = 1
                break
            self._index[record["key"]] = (offset, len(line))  # the last line of a key wins (`put(replace=True)`)
            offset += len(line)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> dict | None:
        """The cached response for `key`, or None."""
        where = self._index.get(key)
        if where is None:
            return None
        offset, length = where
        raw = os.pread(self._file.fileno(), length, offset)  # positional read: safe beside concurrent appends
        return json.loads(raw)["response"]

    def put(self, key: str, stage: str, model: str, response: dict, replace: bool = False) -> None:
        """Append one answered request; durable (fsync) before this returns. An answered key is written again only
        with `replace` (its cached answer was unusable)."""
        line = (json.dumps({"key": key, "stage": stage, "model": model, "response": response},
                           ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if key in self._index and not replace:
                return
            fd = self._file.fileno()  # written unbuffered: a failed write leaves no bytes behind in a buffer
            offset = os.fstat(fd).st_size
            try:
                rest = memoryview(line)
                while rest:  # whole lines: a kill leaves a prefix (a torn tail), never a mix of two lines
                    rest = rest[os.write(fd, rest):]  # O_APPEND (mode a): at the end whatever the position
                os.fsync(fd)
            except BaseException:  # e.g. a full disk: cut the partial line, or the next append would follow it
                os.ftruncate(fd, offset)  # mid-file, where reopening calls it damage rather than a torn tail
                raise
            self._index[key] = (offset, len(line))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # also releases the flock

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# 3. The client
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """One chat completion to obtain. `label` names it in messages (a record id); `context` rides along."""

    label: str
    messages: list[dict]
    sample: int = 0               # which of the N samples of the same messages
    seed: int | None = None       # sent when the endpoint config says so
    context: Any = None


Transport = Callable[[dict[str, Any]], dict]  # request kwargs -> response dict (see `_response_dict`)


def openai_transport(endpoint: Endpoint, timeout_s: float) -> Transport:
    """Calls `chat.completions.create` of the `openai` package (its own retries off: `ChatClient` retries)."""
    import openai

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, timeout=timeout_s, max_retries=0)

    def call(kwargs: dict[str, Any]) -> dict:
        return _response_dict(client.chat.completions.create(**kwargs))

    return call


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(value: Any) -> Any:
    """`value` with every string made valid Unicode: a lone surrogate (what `json.loads` makes of a server's
    "\\ud83d" escape) becomes U+FFFD, so the answer can be cached and written as UTF-8 instead of failing after
    it was paid for."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {k: _valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    return value


def checked_response(response: dict) -> dict:
    """`response` with its `content` as text: a list of text parts (`{"type": "text", "text": ...}`, what some
    servers send) is joined into one string; content that is neither a string, such a list nor null (a number, an
    image part) raises MalformedReply, so it is retried and never cached."""
    content = response.get("content")
    if content is None or isinstance(content, str):
        return response
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return {**response, "content": "".join(part["text"] for part in content)}
    raise MalformedReply(f"the reply's message content is no text: {json.dumps(content, default=str)[:200]}")


def _response_dict(completion: Any) -> dict:
    """What we keep of a completion: the first choice's text, its reasoning (vLLM's `reasoning_content`, or
    `reasoning`), the finish reason and token usage."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReply(f"the reply is not a chat completion with a message: {str(completion)[:200]}")
    choice = choices[0]
    message = choice.message
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    usage = getattr(completion, "usage", None)
    return {
        "content": getattr(message, "content", None),
        "reasoning": reasoning if isinstance(reasoning, str) else None,
        "finish_reason": getattr(choice, "finish_reason", None),
        "usage": None if usage is None else {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                                             "completion_tokens": getattr(usage, "completion_tokens", None)},
    }


@dataclass
class _Failure:
    retryable: bool
    retry_after: float | None  # seconds the server asked us to wait, if it said
    description: str
    refused: bool = False  # a per-request refusal (REFUSAL_STATUS): answered with a refusal, not retried


def refusal(description: str) -> dict:
    """The response that stands for a refused request (module docstring); never cached."""
    return {"content": None, "reasoning": None, "finish_reason": REFUSED, "usage": None, "refusal": description}


def classify_error(err: BaseException, timeout_s: float) -> _Failure | None:
    """How to treat an exception from a call: retry (with the server's retry-after), fail, or None = not ours."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return _Failure(True, None, f"timed out after {timeout_s:g} s")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return _Failure(True, None, f"connection error ({cause or err})")
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        message = str(getattr(err, "message", "") or err)[:300]
        return _Failure(status in RETRY_STATUS or status >= 500, _retry_after(err.response),
                        f"HTTP {status}: {message}", refused=status in REFUSAL_STATUS)
    if isinstance(err, MalformedReply):
        return _Failure(True, None, str(err))
    if isinstance(err, json.JSONDecodeError):  # a 200 whose body is cut or not JSON (the openai client's own error)
        return _Failure(True, None, f"the reply's body is not valid JSON ({err.msg} at character {err.pos})")
    if isinstance(err, openai.APIError):  # e.g. a body the client cannot read at all
        return _Failure(False, None, f"{type(err).__name__}: {str(err)[:300]}")
    return None


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:  # an HTTP date
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class _Stopped(Exception):
    """A queued request skipped because the run is stopping (another request failed, or an interrupt)."""


class ChatClient:
    """Answers `ChatRequest`s for one stage through one endpoint, with the cache in front (module docstring)."""

    def __init__(self, endpoint: Endpoint, cfg: EndpointConfig, cache: ResponseCache, stage: str, *,
                 transport: Transport | None = None, log: Callable[[str], None] | None = None,
                 rng: random.Random | None = None):
        self.endpoint, self.cfg, self.cache, self.stage = endpoint, cfg, cache, stage
        self.transport = transport or openai_transport(endpoint, cfg.timeout_s)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._rng = rng or random.Random()  # jitter only; it never reaches a request
        # this client's lifetime counters (for the progress lines)
        self.calls = self.cached = self.retries = self.refused = 0
        self._counter_lock = threading.Lock()

    def params(self, request: ChatRequest) -> dict[str, Any]:
        params = self.cfg.sampling_params()
        if self.cfg.send_seed and request.seed is not None:
            params["seed"] = request.seed
        return params

    def key(self, request: ChatRequest) -> str:
        return request_key(self.endpoint.model, request.messages, self.params(request), request.sample,
                           self.cfg.cache_tag)

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[tuple[ChatRequest, dict]]:
        """Yield (request, response) in the order of `requests`; see the module docstring for failures.

        Close the generator (`contextlib.closing`) before the cache: when the consumer stops early or raises,
        closing is what waits for the calls in flight and caches their answers.
        """
        stop = threading.Event()
        window = 2 * self.cfg.concurrency  # requests scheduled ahead of the one being yielded (bounded memory)
        pending: deque[tuple[ChatRequest, Future | dict]] = deque()  # a dict: answered from the cache
        source = iter(requests)
        failure: EndpointError | None = None
        refused_in_a_row = 0
        pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix=f"chains-{self.stage}")

        def schedule() -> None:
            while len(pending) < window and not stop.is_set():
                request = next(source, None)
                if request is None:
                    return
                key = self.key(request)
                cached = self.cache.get(key)
                replace = False
                if cached is not None:
                    try:
                        cached = checked_response(cached)
                    except MalformedReply as err:  # cached by a version that did not check content: ask again
                        self.log(f"stage {self.stage!r}: request {request.label!r} (sample {request.sample}): the "
                                 f"cached answer in {self.cache.path} is unusable ({err}); asking again")
                        cached, replace = None, True
                if cached is not None:  # answered before (this run or a killed one): no call
                    self.cached += 1
                    pending.append((request, cached))
                else:
                    pending.append((request, pool.submit(self._call, request, key, stop, replace)))

        try:
            schedule()
            while pending:
                request, future = pending.popleft()
                try:
                    response = future if isinstance(future, dict) else future.result()
                except _Stopped:
                    continue
                except EndpointError as err:
                    stop.set()  # start nothing new; the calls in flight finish and are cached
                    failure = failure or err
                    continue
                refused_in_a_row = refused_in_a_row + 1 if response.get("finish_reason") == REFUSED else 0
                if refused_in_a_row >= self.cfg.max_refused_in_a_row and failure is None:
                    stop.set()
                    failure = EndpointError(
                        f"stage {self.stage!r}: endpoint {self.endpoint}: {refused_in_a_row} request(s) in a row were "
                        f"refused (max_refused_in_a_row={self.cfg.max_refused_in_a_row}), the last "
                        f"{request.label!r} (sample {request.sample}): {response['refusal']}; a setting every request "
                        f"trips (a parameter the server does not take, its context length) is a configuration error")
                if failure is None:
                    yield request, response
                schedule()
        finally:
            stop.set()  # also on an interrupt or when the consumer stops early
            pool.shutdown(wait=True, cancel_futures=True)  # wait: answers in flight are paid for, so cache them
        if failure is not None:
            raise EndpointError(f"{failure} -- {len(self.cache)} answered requests are kept in {self.cache.path}; "
                                f"rerun the same command to resume") from None

    def _call(self, request: ChatRequest, key: str, stop: threading.Event, replace: bool = False) -> dict:
        kwargs = {"model": self.endpoint.model, "messages": request.messages, **self.params(request)}
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            if stop.is_set():
                raise _Stopped()
            try:
                response = checked_response(self.transport(kwargs))
            except Exception as err:  # noqa: BLE001 -- classified below; anything unknown is re-raised
                failure = classify_error(err, self.cfg.timeout_s)
                if failure is None:
                    raise
                where = (f"stage {self.stage!r}: endpoint {self.endpoint}: request {request.label!r} "
                         f"(sample {request.sample})")
                if failure.refused:  # this request only: its record is dropped by the stage
                    with self._counter_lock:
                        self.refused += 1
                    self.log(f"{where} was refused: {failure.description}; its record is dropped")
                    return refusal(failure.description)
                if not failure.retryable or attempt + 1 == attempts:
                    stop.set()  # at once, so that no queued request starts after this one failed for good
                    if not failure.retryable:
                        raise EndpointError(f"{where} was refused: {failure.description}") from None
                    raise EndpointError(f"{where} failed after {attempts} attempt(s): {failure.description}") from None
                delay = self._delay(attempt, failure.retry_after)
                with self._counter_lock:
                    self.retries += 1
                self.log(f"{where}: {failure.description}; retry {attempt + 1}/{self.cfg.max_retries} in "
                         f"{delay:.2f} s")
                if stop.wait(delay):  # woken early: the run is stopping
                    raise _Stopped() from None
                continue
            response = _valid_text(response)
            self.cache.put(key, self.stage, self.endpoint.model, response, replace=replace)
            with self._counter_lock:
                self.calls += 1
            return response
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best when it will take us again
            return min(retry_after, self.cfg.max_retry_after_s)
        # Exponential backoff with "equal jitter": half fixed, half random, so retrying clients spread out.
        base = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
        return base * (0.5 + 0.5 * self._rng.random())
