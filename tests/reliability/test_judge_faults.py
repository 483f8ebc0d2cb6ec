"""The judge down, slow or answering garbage mid-evaluation: bounded retries with backoff, per-sample None + reason,
the run completes; after the judge recovers, a rerun asks only for the missing scores (the cache keeps the rest)."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ragas")

from telekd.judge import scoring as J  # noqa: E402
from telekd.judge import LLM_METRICS, JudgeConfig, JudgeError, LocalBackend, judge_rows  # noqa: E402

ROWS = [
    {"id": "a", "question": "Which RRC state was introduced in NR?", "context": "RRC_INACTIVE was introduced in NR.",
     "prediction": "RRC_INACTIVE", "references": ["RRC_INACTIVE"]},
    {"id": "b", "question": "Which zebra node selects the SMF?", "context": "The zebra AMF selects the SMF.",
     "prediction": "the zebra AMF", "references": ["the zebra AMF"]},
]


def cfg(tmp_path, **kw) -> JudgeConfig:
    base = dict(max_chars=12, max_items=1, max_new_tokens=256, max_retries=2, timeout_s=30.0, backoff_s=0.01,
                cache_dir=str(tmp_path / "judge"))
    return JudgeConfig(**{**base, **kw})


def fake_clock(monkeypatch) -> list:
    """telekd.judge.scoring's own time module, with sleep recorded instead of slept; returns the recorded delays."""
    sleeps = []
    monkeypatch.setattr(J, "time", SimpleNamespace(sleep=sleeps.append, perf_counter=time.perf_counter))
    return sleeps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_down_retries_with_backoff_then_none_with_reason(tmp_path, monkeypatch):
    sleeps = fake_clock(monkeypatch)
    port = free_port()  # nothing listens there: connection refused
    c = cfg(tmp_path, backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", backoff_s=0.5)
    scores, report = judge_rows(ROWS, c, progress=False)
    assert (report.judged, report.failures) == (2, 2) and report.calls == 2 * 3 * 3  # rows x metrics x attempts
    assert sleeps == [0.5, 1.0] * 6  # exponential backoff between the 3 attempts of each metric
    for s in scores:
        assert all(s[m] is None for m in LLM_METRICS)
        assert s["judge_error"].startswith(f"answer_correctness: cannot reach http://127.0.0.1:{port}/v1: ")
        assert "(after 3 attempts)" in s["judge_error"]


def test_backoff_is_bounded(tmp_path, monkeypatch):
    sleeps = fake_clock(monkeypatch)
    c = cfg(tmp_path, backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", backoff_s=20.0,
            max_retries=3)
    judge_rows(ROWS[:1], c, progress=False)
    assert sleeps[:3] == [20.0, J.MAX_BACKOFF_S, J.MAX_BACKOFF_S] and max(sleeps) == J.MAX_BACKOFF_S


@pytest.mark.parametrize("mode", ["sleep", "garbage"])
def test_slow_or_garbage_judge(mode, tmp_path, monkeypatch):
    """Reruns tests/test_judge.py's HTTP judge that answers too late (timeout) or with non-JSON (garbage)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("judge_tests", ROOT / "tests" / "test_judge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.test_failing_judge_gives_none_with_reason(mode, tmp_path, monkeypatch)


class Flaky:
    """The real local judge, down for every prompt that mentions `word` while `down` is set; counts calls."""

    def __init__(self, inner, word: str):
        self.inner, self.word, self.down = inner, word, True
        self.identity = inner.identity
        self.calls = 0

    def complete(self, prompt, schema, name):
        self.calls += 1
        if self.down and self.word in prompt:
            raise JudgeError("judge down (injected)")
        return self.inner.complete(prompt, schema, name)


def test_recovery_fills_only_the_missing_scores(tmp_path, saved_models, monkeypatch):
    fake_clock(monkeypatch)
    c = cfg(tmp_path, judge_model=str(saved_models["llama"]), max_retries=1)
    local = LocalBackend(c.judge_model, max_new_tokens=c.max_new_tokens, timeout_s=c.timeout_s)
    flaky = Flaky(local, "zebra")

    first, r1 = judge_rows(ROWS, c, progress=False, backend=flaky)  # row b fails mid-evaluation
    assert all(isinstance(first[0][m], float) for m in LLM_METRICS) and first[0]["judge_error"] is None
    assert all(first[1][m] is None for m in LLM_METRICS) and "judge down (injected)" in first[1]["judge_error"]
    assert (r1.judged, r1.failures) == (2, 1)

    flaky.down, flaky.calls = False, 0  # the judge recovers; rerun with the same cache
    second, r2 = judge_rows(ROWS, c, progress=False, backend=flaky)
    assert second[0] == first[0]  # row a: from the cache
    assert all(isinstance(second[1][m], float) for m in LLM_METRICS) and second[1]["judge_error"] is None
    fresh = Flaky(local, "zebra")
    fresh.down = False
    only_b, _ = judge_rows(ROWS[1:], cfg(tmp_path / "fresh", judge_model=c.judge_model), progress=False, backend=fresh)
    assert only_b[0] == second[1]
    # the rerun made exactly the calls row b needs on an empty cache; row a's answers all came from the cache
    assert flaky.calls == fresh.calls == r2.calls > 0 and r2.cache_hits > 0


def test_server_that_ignores_the_schema_gives_none_with_reason(tmp_path, monkeypatch):
    """An OpenAI-compatible server that ignores response_format and answers every request with empty lists:
    ragas alone scored that 0.79 (answer correctness; factuality taken as a perfect match). Every metric must be
    None with its reason, nothing cached, and the run completes."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path
    import threading

    fake_clock(monkeypatch)
    content = json.dumps({"statements": [], "claims": [], "TP": [], "FP": [], "FN": []})

    class Lenient(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Lenient)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        c = cfg(tmp_path, backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m",
                max_retries=0)
        scores, report = judge_rows(ROWS, c, progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (report.judged, report.failures) == (2, 2) and report.failed_metrics == {m: 2 for m in LLM_METRICS}
    for s in scores:
        assert all(s[m] is None for m in LLM_METRICS)
        assert s["judge_error"].count("breaks its bounded schema") == 3  # statements / claims: minItems 1
    assert not list(Path(c.cache_dir).rglob("*.json"))
