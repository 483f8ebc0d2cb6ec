"""The OpenAI-compatible judge backend: POST {base_url}/chat/completions over stdlib HTTP.

Any OpenAI-compatible server (vLLM, telekd.judge_server, ...) is asked at temperature 0 for
``response_format: json_schema`` with the bounded schema (telekd.judge.schema). Key rules: the API key is read
only from the environment variable named by ``eval_llm.api_key_env``, is required unless ``base_url`` is a
loopback address, is never written anywhere, and every message that leaves this module is scrubbed of it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Optional
from urllib.parse import urlparse

from .errors import JudgeError, JudgeSetupError

RETRYABLE_HTTP = (408, 409, 429)  # and every 5xx: the server may answer next time


def is_loopback(url: str) -> bool:
    """True when `url`'s host is localhost or a loopback IP address (127.0.0.0/8, ::1)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIBackend:
    """POST {base_url}/chat/completions with response_format json_schema (stdlib HTTP, no retries of its own).

    Thread-safe: `Judge` sends up to eval_llm.concurrency requests at once. At temperature 0 a reply is
    deterministic, so a reply that fails (cut at max_tokens, refused, empty, out of schema) is not retried;
    timeouts, connection errors, HTTP 408/409/429 and 5xx are (the server may recover), other HTTP 4xx are not.
    """

    name = "openai"
    deterministic = True  # temperature 0

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "TELEKD_JUDGE_API_KEY",
                 max_new_tokens: int = 1024, timeout_s: float = 120.0):
        if not base_url or not model:
            raise JudgeSetupError("backend openai needs eval_llm.base_url and eval_llm.model")
        if urlparse(base_url).scheme not in ("http", "https"):
            raise JudgeSetupError(f"eval_llm.base_url {base_url!r} is not an http(s) URL")
        key = os.environ.get(api_key_env) or None
        if key is None and not is_loopback(base_url):
            raise JudgeSetupError(f"eval_llm.base_url {base_url} is not a loopback address: put the API key in the "
                                  f"environment variable {api_key_env} (eval_llm.api_key_env)")
        self.__key = key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.identity = f"openai:{self.base_url}:{model}"

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, {self.model!r})"

    def scrub(self, text: str) -> str:
        """`text` with the API key replaced by ``***``."""
        return text.replace(self.__key, "***") if self.__key else text

    def complete(self, prompt: str, schema: dict, schema_name: str) -> str:
        """The reply's content for `prompt` under `schema`; JudgeError (scrubbed, `retryable` as above) if none."""
        import socket
        import urllib.error
        import urllib.request

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": schema_name, "schema": schema, "strict": True}},
        }
        headers = {"Content-Type": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        error: Optional[str] = None
        retryable = True
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = self.scrub(e.read(4096).decode("utf-8", "replace"))[:300]
            error = f"HTTP {e.code} from {self.base_url}: {detail}"
            retryable = e.code in RETRYABLE_HTTP or e.code >= 500
        except (TimeoutError, socket.timeout):
            error = f"judge timed out after {self.timeout_s:g}s ({self.base_url})"
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                error = f"judge timed out after {self.timeout_s:g}s ({self.base_url})"
            else:
                error = f"cannot reach {self.base_url}: {reason}"
        except OSError as e:
            error = f"connection error with {self.base_url}: {type(e).__name__}: {e}"
        if error is not None:
            raise JudgeError(self.scrub(error), retryable=retryable) from None
        try:
            msg = json.loads(raw)["choices"][0]
            content = msg["message"].get("content")
            refusal = msg["message"].get("refusal")
            finish = msg.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raw_text = self.scrub(raw.decode("utf-8", "replace"))[:200]
            raise JudgeError(f"not an OpenAI chat completion from {self.base_url}: {raw_text!r}") from None
        if refusal:
            raise JudgeError(f"judge refused: {self.scrub(str(refusal))[:200]}", retryable=False)
        if not isinstance(content, str) or not content.strip():
            raise JudgeError(f"empty judge answer (finish_reason {finish})", retryable=False)
        if finish == "length":  # temperature 0: the same prompt is cut at the same place again
            raise JudgeError(f"judge output cut at max_tokens={self.max_new_tokens} (finish_reason length; raise "
                             "eval_llm.max_new_tokens or lower max_chars/max_items)", retryable=False)
        return content

