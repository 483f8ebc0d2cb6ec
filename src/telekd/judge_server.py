"""A minimal OpenAI-compatible server for a local transformers model (loopback only).

    python -m telekd.judge_server --model models/base/llama --port 8011

Serves POST /v1/chat/completions and GET /v1/models. Decoding is greedy (temperature and top_p are
accepted and ignored). `response_format` is honoured with the local judge's constrained decoding
(xgrammar): {"type": "json_schema", "json_schema": {"schema": ...}} constrains the answer to the schema,
{"type": "json_object"} to any JSON, "text" or none leaves it free. Generations run one at a time.
The server binds 127.0.0.1 only and checks no API key (a client may send any).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
MAX_BODY = 16 << 20


class BadRequest(ValueError):
    """A request this server cannot answer (answered with HTTP 400 and the message)."""


def _content(message: dict) -> str:
    c = message.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    if c is None:
        return ""
    raise BadRequest("message content must be a string or a list of text parts")


def parse_request(body: dict, default_max_tokens: int) -> tuple[list[dict], object, int]:
    """(messages, schema | "json" | None, max_tokens) from a chat completion request body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    messages = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest("each message needs a role among system, user, assistant")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m)})
    rf = body.get("response_format") or {"type": "text"}
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
    elif kind == "json_object":
        schema = "json"
    elif kind == "text":
        schema = None
    else:
        raise BadRequest(f"unsupported response_format type {kind!r}")
    n = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    if not isinstance(n, int) or n < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return messages, schema, n


class JudgeServer(ThreadingHTTPServer):
    """The HTTP server on 127.0.0.1:`port` around `generator` (a telekd.judge.local.LocalGenerator or alike)."""

    daemon_threads = True

    def __init__(self, port: int, generator, served_name: str, default_max_tokens: int = 1024,
                 verbose: bool = False):
        self.generator = generator
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self.verbose = verbose
        self.lock = threading.Lock()
        super().__init__((HOST, port), Handler)

    @property
    def port(self) -> int:
        """The port the server listens on (the free one chosen when asked for 0)."""
        return self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    """GET /v1/models and POST /v1/chat/completions; errors as OpenAI error objects (HTTP 400/404/500)."""

    server_version = "telekd-judge/0.1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        """The request line only (never headers), and only with --verbose."""
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(code, {"error": {"message": message, "type": kind, "code": code}})

    def do_GET(self):
        """The served model list, or 404."""
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [
                {"id": self.server.served_name, "object": "model", "created": 0, "owned_by": "telekd"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self):
        """One greedy chat completion (constrained by the request's response_format), or 400/404/500."""
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                raise BadRequest("missing or oversized body")
            body = json.loads(self.rfile.read(length))
            messages, schema, max_tokens = parse_request(body, self.server.default_max_tokens)
        except (BadRequest, ValueError) as e:
            self._error(400, str(e))
            return
        try:
            with self.server.lock:
                g = self.server.generator.complete(messages, schema, max_tokens)
        except Exception as e:  # e.g. a schema xgrammar cannot compile
            self._error(500, f"{type(e).__name__}: {e}"[:500], "server_error")
            return
        finish = "stop" if g.finish_reason == "stop" else "length"
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                      "total_tokens": g.prompt_tokens + g.completion_tokens},
        })


def make_server(model: str, port: int = 0, *, dtype: str = "float32", served_name: str | None = None,
                default_max_tokens: int = 1024, trust_remote_code: bool = False, verbose: bool = False,
                generator=None) -> JudgeServer:
    """A JudgeServer on 127.0.0.1:`port` (0: a free port, see `.port`); call serve_forever() / shutdown()."""
    from pathlib import Path

    from .judge.local import LocalGenerator

    gen = generator or LocalGenerator(model, dtype=dtype, trust_remote_code=trust_remote_code)
    return JudgeServer(port, gen, served_name or Path(model).name, default_max_tokens, verbose)


def main(argv=None) -> None:
    """Command line: serve `--model` on 127.0.0.1:`--port` until interrupted."""
    import telekd  # noqa: F401  (offline environment)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (or hub.json pointer folder)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--served-name", default=None, help="model id reported to clients (default: folder name)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="default max_tokens when a request gives none")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    server = make_server(a.model, a.port, dtype=a.dtype, served_name=a.served_name, default_max_tokens=a.max_tokens,
                         verbose=a.verbose)
    print(f"telekd judge server: http://{HOST}:{server.port}/v1 serving {server.served_name}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
