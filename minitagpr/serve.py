"""A minimal OpenAI-compatible chat server over the built-in rollout engine, on the standard library's HTTP server.

    python -m minitagpr.serve CHECKPOINT --port 8000 [--host 127.0.0.1] [--request-log requests.jsonl]

then any OpenAI client with base_url="http://127.0.0.1:8000/v1" can call:
  GET  /v1/models             the one served model (its id is --model-name, default the CHECKPOINT argument: a
                              local folder's own name, or a hub id as given)
  GET  /health                {"status": "ok"}
  POST /v1/chat/completions   messages (rendered with the checkpoint's tokenizer and the Qwen3 chat template),
                              n, max_tokens | max_completion_tokens, temperature, top_p, stop (string or list),
                              seed, chat_template_kwargs.enable_thinking; usage counts in the answer. Knobs it
                              does not implement (top_k, min_p, penalties, logit_bias, response_format) are refused
                              unless sent at their "off" value.
Unlike OpenAI's API, a request without max_tokens gets DEFAULT_MAX_TOKENS (1024) new tokens at most, fewer where
the prompt leaves less room in the context, not all the room the context leaves.
It exists for evaluation and for testing the chain pipeline against a real `openai` client on loopback. One
model, one generation at a time (a lock serialises requests; HTTP handling itself is threaded), no streaming.
The `model` field of a request is echoed back, not checked, so a pipeline may give its roles different names.
The port is bound before the checkpoint loads, so a busy port or an unknown host fails at once; an IPv6 literal
host (::1) is served over IPv6.

Stop strings are applied after generation: the text is cut before the earliest stop string and the token count
is that of the shortest prefix of generated ids whose text reaches it. `<|im_end|>`, eos and `<|endoftext|>`
always stop (Tokenizer.stop_ids).
Malformed requests get a 400 JSON error naming the field; the server keeps serving. With --request-log every GET
and POST appends one JSON line {time, method, path, status, seconds} before its answer is sent; a POST's line adds
body_sha256, and n, prompt_tokens and completion_tokens when answered. Status 499: the client hung up while its
request waited for the generation lock, so nothing was generated or sent. A client that hangs up while its answer
is being sent keeps the line with the status meant for it, and a note goes to stderr. Other methods (PUT,
DELETE, ...) get http.server's 501 and no line.
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import json
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from minitagpr.cli import USER_ERRORS
from minitagpr.config import ConfigError
from minitagpr.rollout import BuiltinEngine, RolloutError
from minitagpr.rollout.base import MIN_TEMPERATURE, DivergedError

MAX_N = 64
MAX_STOP_STRINGS = 4
MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 1024


class RequestError(ValueError):
    """A malformed request: answered with HTTP `status` and an OpenAI-style error naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class ClientGone(Exception):
    """The client closed its connection while its request waited for the generation lock."""


# ----------------------------------------------------------------------------------------------------------------------
# Request parsing


def _int_field(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if value < lo or (hi is not None and value > hi):
        raise RequestError(f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", name)
    return value


def _float_field(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return float(value)


def _temperature(body: dict) -> float:
    value = _float_field(body, "temperature", 1.0, 0.0, 2.0)
    if 0.0 < value < MIN_TEMPERATURE:
        raise RequestError(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value}",
                           "temperature")
    return value


# Sampling knobs of the OpenAI (and vLLM) API that this server does not implement, with the values that mean "off".
# A request may send them only at those values: accepting and ignoring them would decode something else than asked.
NEUTRAL_KNOBS = {
    "top_k": (-1, 0),
    "min_p": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "top_logprobs": (0,),
}


# Every request field this server reads (or refuses by value above and below); "user" is the client's end-user id,
# metadata that changes nothing. Any other field (min_tokens, ignore_eos, best_of, guided_json, ...) is refused by
# name: each would change what is decoded.
KNOWN_FIELDS = {"messages", "model", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                "seed", "stream", "tools", "tool_choice", "logprobs", "chat_template_kwargs", "user", *NEUTRAL_KNOBS}


def _refuse_unimplemented_knobs(body: dict) -> None:
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"{', '.join(repr(k) for k in unknown)}: not a request field minitagpr.serve implements "
                           f"(it reads {', '.join(sorted(KNOWN_FIELDS))})", unknown[0])
    for name, neutral in NEUTRAL_KNOBS.items():
        value = body.get(name)
        if value is None or (not isinstance(value, bool) and value in neutral):
            continue
        allowed = " or ".join(json.dumps(v) for v in neutral)
        raise RequestError(f"'{name}' is not implemented by minitagpr.serve; send it only as {allowed} (or leave it "
                           f"out), got {json.dumps(value)}", name)


def parse_chat_request(body, max_position: int | None) -> dict:
    """Validate a /v1/chat/completions body; returns the generation settings or raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("stream"):
        raise RequestError("'stream': true is not supported by minitagpr.serve", "stream")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise RequestError("tool calling is not supported by minitagpr.serve", "tools")
    if body.get("logprobs"):
        raise RequestError("'logprobs' is not supported by minitagpr.serve", "logprobs")
    _refuse_unimplemented_knobs(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                           "stop")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not set(kwargs) <= {"enable_thinking"}:
        raise RequestError("'chat_template_kwargs' may only hold 'enable_thinking'", "chat_template_kwargs")
    enable_thinking = kwargs.get("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise RequestError("'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
    # each checked on its own before they are compared: true == 1 would let max_tokens: true pass
    max_tokens = _int_field(body, "max_tokens", None, 1, max_position)
    max_completion_tokens = _int_field(body, "max_completion_tokens", None, 1, max_position)
    if None not in (max_tokens, max_completion_tokens) and max_tokens != max_completion_tokens:
        raise RequestError(f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({max_completion_tokens}) "
                           f"differ; send one", "max_completion_tokens")  # which one was meant cannot be told
    max_tokens_field = "max_tokens" if max_completion_tokens is None else "max_completion_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {json.dumps(seed)}", "seed")
    return {
        "messages": messages,
        "model": model,
        "n": _int_field(body, "n", 1, 1, MAX_N),
        "max_tokens": max_tokens if max_completion_tokens is None else max_completion_tokens,
        "max_tokens_field": max_tokens_field,  # the name the client sent, for errors about its value
        "temperature": _temperature(body),
        "top_p": _float_field(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stop": stop,
        "seed": seed,
        "enable_thinking": enable_thinking,
    }


def apply_stop_strings(tokenizer, token_ids: list[int], text: str, stops: list[str]) -> tuple[str, int | None]:
    """Cut `text` before its earliest stop string; returns (text, generated ids that reached it), or (text, None)
    when no stop string occurs."""
    cuts = [text.find(s) for s in stops if s in text]
    if not cuts:
        return text, None
    cut = min(cuts)
    # The completion "used" the shortest prefix of ids whose text reaches past the cut. A prefix's text never gets
    # shorter as ids are added (a split UTF-8 character decodes to one U+FFFD, then to itself), so bisect instead of
    # decoding every prefix (quadratic). Invariant: ids[:lo] stops short of the cut, ids[:hi] reaches past it (or
    # is all of them), so the answer hi has been checked against its predecessor lo = hi - 1.
    lo, hi = 0, len(token_ids)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(token_ids[:mid])) > cut:
            hi = mid
        else:
            lo = mid
    return text[:cut], hi


# ----------------------------------------------------------------------------------------------------------------------
# The server


class ChatServer(ThreadingHTTPServer):
    """Holds the engine, the tokenizer, the generation lock and the request log for the handler threads."""

    daemon_threads = True

    def __init__(self, address, engine: BuiltinEngine | None, tokenizer, model_name: str,
                 request_log: Path | None = None):
        # http.server listens on IPv4 only; an IPv6 literal such as ::1 needs an IPv6 socket
        self.address_family = socket.AF_INET6 if _is_ipv6(address[0]) else socket.AF_INET
        super().__init__(address, ChatHandler)  # binds and listens (closing the socket if that fails)
        self.model_name = model_name
        self.request_log = Path(request_log) if request_log else None
        self.generate_lock = threading.Lock()  # one generation at a time: the engine is not thread-safe
        self.log_lock = threading.Lock()
        self.created = int(time.time())
        self.engine = self.tokenizer = self.max_position = None
        if engine is not None:
            self.attach(engine, tokenizer)

    def attach(self, engine: BuiltinEngine, tokenizer) -> None:
        """Serve `engine`; make_server binds the port first and attaches the engine once the checkpoint loaded."""
        self.engine, self.tokenizer = engine, tokenizer
        self.max_position = getattr(engine.model.config, "max_position_embeddings", None)

    @property
    def base_url(self) -> str:
        return f"http://{_host_port(*self.server_address[:2])}/v1"

    def log_request_line(self, record: dict) -> None:
        if self.request_log is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        try:
            with self.log_lock:  # one write per line under a lock: concurrent handlers never interleave lines
                with open(self.request_log, "a", encoding="utf-8") as f:
                    f.write(line)
        except OSError as err:  # checked at startup; should it fail later (disk full...), still answer the client
            print(f"minitagpr.serve: cannot append to the request log {self.request_log}: {err.strerror or err}",
                  file=sys.stderr, flush=True)

    def chat_completion(self, request: dict, client_gone=None) -> dict:
        """The answer to a parsed request. `client_gone()` is asked once the generation lock is held: True raises
        ClientGone instead of generating for a client that is no longer there."""
        tok = self.tokenizer
        try:
            prompt = tok.apply_chat(request["messages"], add_generation_prompt=True,
                                    enable_thinking=request["enable_thinking"])
        except ValueError as err:  # the tokenizer names the message index and field
            raise RequestError(str(err), "messages") from None
        max_tokens = request["max_tokens"]
        room = (self.max_position - len(prompt)) if self.max_position else None
        if room is not None and room < 1:
            raise RequestError(f"the prompt has {len(prompt)} tokens, the model's limit is {self.max_position}",
                               "messages")
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
        elif room is not None and max_tokens > room:
            field = request["max_tokens_field"]
            raise RequestError(f"{field}={max_tokens} plus the prompt's {len(prompt)} tokens exceeds the model's "
                               f"limit of {self.max_position}", field)
        seed = request["seed"] if request["seed"] is not None else secrets.randbits(62)
        with self.generate_lock:
            if client_gone is not None and client_gone():  # it hung up while queued: generate for nobody
                raise ClientGone()
            group = self.engine.generate([prompt], n=request["n"], temperature=request["temperature"],
                                         top_p=request["top_p"], max_new_tokens=max_tokens,
                                         stop_token_ids=tok.stop_ids, seed=seed)[0]
        choices, completion_tokens = [], 0
        for j, c in enumerate(group):
            body_ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids  # without the stop id
            text, used = apply_stop_strings(tok, body_ids, c.text, request["stop"])
            finish = "stop" if used is not None else c.finish_reason
            completion_tokens += used if used is not None else len(c.token_ids)
            choices.append({"index": j, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": None})
        return {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"] or self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt) + completion_tokens},
        }


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects

    def log_message(self, format, *args):  # the JSONL request log replaces the default stderr lines
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left: a note, not socketserver's traceback
            self.close_connection = True
            print(f"minitagpr.serve: the client of {self.command} {self.path} hung up before its {status} answer "
                  f"was sent", file=sys.stderr, flush=True)

    def _client_gone(self) -> bool:
        """Whether the client closed its end: a peek that does not block reads end-of-file, or a reset. (A client
        that half-closes and still waits for its answer reads as gone too; HTTP clients do not do that.)"""
        conn = self.connection
        timeout = conn.gettimeout()
        conn.settimeout(0)  # non-blocking for this peek; unlike select(), no limit on the descriptor's number
        try:
            return conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing to read: still connected
            return False
        except OSError:  # reset by the peer
            return True
        finally:
            conn.settimeout(timeout)

    def _content_length(self) -> int:
        """The request's Content-Length: 0 when absent, -1 when it is no integer."""
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return -1

    def _discard_body(self) -> None:
        """Read away a GET's body, which means nothing here: left unread it would be parsed as the next request."""
        length = self._content_length()
        if self.headers.get("Transfer-Encoding") or not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # a body of no usable length: end the connection after this answer
        elif length:
            self.rfile.read(length)

    def do_GET(self):
        started = time.time()
        self._discard_body()
        if self.path.rstrip("/") == "/v1/models":
            status, payload = 200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                                "created": self.server.created,
                                                                "owned_by": "minitagpr"}]}
        elif self.path.rstrip("/") == "/health":
            status, payload = 200, {"status": "ok"}
        else:
            status, payload = 404, _error_body(404, f"no route GET {self.path}; this server has GET /v1/models, "
                                                    f"GET /health and POST /v1/chat/completions")
        self.server.log_request_line({"time": started, "path": self.path, "method": "GET", "status": status,
                                      "seconds": round(time.time() - started, 4)})
        self._send(status, payload)

    def do_POST(self):
        started = time.time()
        record = {"time": started, "path": self.path, "method": "POST"}
        raw = b""
        try:
            length = self._content_length()
            if not 0 < length <= MAX_BODY_BYTES:
                self.close_connection = True  # the unread body would otherwise be parsed as the next request
                raise RequestError(f"the request needs a JSON body of 1 to {MAX_BODY_BYTES} bytes with a "
                                   f"Content-Length header (got {self.headers.get('Content-Length')!r})")
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestError(f"no route POST {self.path}; this server has POST /v1/chat/completions", status=404)
            try:
                body = json.loads(raw)
            except RecursionError:  # the decoder recurses once per level of nesting
                raise RequestError("the request body is not valid JSON: it is nested too deeply") from None
            except ValueError as err:  # bad syntax, bad UTF-8, or an integer past Python's limit on digits
                raise RequestError(f"the request body is not valid JSON: {err}") from None
            request = parse_chat_request(body, self.server.max_position)
            status, payload = 200, self.server.chat_completion(request, client_gone=self._client_gone)
            record.update(n=request["n"], prompt_tokens=payload["usage"]["prompt_tokens"],
                          completion_tokens=payload["usage"]["completion_tokens"])
        except ClientGone:
            status, payload = 499, None  # nginx's "client closed request": nothing generated, nothing sent
        except RequestError as err:
            status, payload = err.status, _error_body(err.status, str(err), err.param)
        except DivergedError as err:  # the model's fault, not the request's
            status, payload = 500, _error_body(500, str(err))
        except RolloutError as err:
            status, payload = 400, _error_body(400, str(err))
        except Exception as err:  # a bug must not take the server down: answer 500 and keep serving
            status, payload = 500, _error_body(500, f"internal error: {type(err).__name__}: {err}")
        record.update(status=status, body_sha256=hashlib.sha256(raw).hexdigest(),
                      seconds=round(time.time() - started, 4))
        self.server.log_request_line(record)  # logged before answering: a client that got its answer sees the line
        if payload is None:
            self.close_connection = True
        else:
            self._send(status, payload)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:  # a host name (or "" for every interface): IPv4
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if _is_ipv6(host) else f"{host}:{port}"


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def make_server(checkpoint, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                request_log=None, max_batch_rows: int = 64) -> ChatServer:
    """Bind HOST:PORT, then load CHECKPOINT (weights + tokenizer files) into a ChatServer; port 0 picks a free port.
    Binding first finds a busy port or an unknown host before the model loads."""
    if request_log:
        check_request_log(Path(request_log))  # now, not as a failure of every request
    local = Path(checkpoint).expanduser()
    # the id clients see: a folder's own name (also for "."), a hub id as given rather than its snapshot's hash
    # (abspath, not resolve: a symlinked folder such as latest -> step_000100 keeps its own name)
    default_name = (Path(os.path.abspath(local)).name or str(checkpoint)) if local.is_dir() else str(checkpoint)
    try:  # the engine is attached once the checkpoint has loaded
        server = ChatServer((host, port), None, None, model_name or default_name, request_log)
    except OSError as err:  # a busy port, an unknown host, an address not on this machine
        raise ConfigError(f"--host/--port {_host_port(host, port)}: cannot listen there "
                          f"({err.strerror or err})") from None
    try:
        import torch

        from minitagpr.model import load_pretrained
        from minitagpr.model.checkpoint import resolve_checkpoint
        from minitagpr.tokenizer import Tokenizer

        checkpoint = resolve_checkpoint(checkpoint)  # a missing folder is named as a checkpoint, not a tokenizer's
        tokenizer = Tokenizer.from_dir(checkpoint)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_pretrained(checkpoint, dtype=torch.float32, device=device).eval()
        server.attach(BuiltinEngine(model, tokenizer, max_batch_rows=max_batch_rows), tokenizer)
    except BaseException:
        server.server_close()  # free the port: the caller gets the loading error, not a leaked socket
        raise
    return server


def check_request_log(path: Path) -> None:
    """ConfigError naming --request-log unless `path` can be appended to (creates its folder, and the file)."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ConfigError(f"--request-log {path}: cannot append to it ({err.strerror or err})") from None


def _port(text: str) -> int:
    """argparse type of --port: an integer from 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 65535 (0: pick a free one), got {text!r}")
    return port


def _positive(text: str) -> int:
    """argparse type of --threads and --max-batch-rows: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minitagpr.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="HF-format checkpoint folder with tokenizer.json + tokenizer_config.json")
    parser.add_argument("--port", type=_port, required=True, help="TCP port (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--model-name", default=None,
                        help="the id /v1/models reports (default: the checkpoint folder's name, or the hub id)")
    parser.add_argument("--request-log", default=None, help="append one JSON line per request to this file")
    parser.add_argument("--max-batch-rows", type=_positive, default=64, help="most sequences decoded together")
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            print(f"warning: serving on {args.host}, reachable beyond this machine; there is no authentication",
                  file=sys.stderr)
    except ValueError:
        pass  # a host name: leave it to the socket layer
    try:
        server = make_server(args.checkpoint, args.host, args.port, args.model_name, args.request_log,
                             args.max_batch_rows)
    except (*USER_ERRORS, OSError, ValueError) as err:  # a bad checkpoint, tokenizer, log path, busy port...
        sys.exit(f"minitagpr.serve: cannot start: {err}")
    print(f"serving {server.model_name} at {server.base_url}", flush=True)  # parents read the port from this line
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
