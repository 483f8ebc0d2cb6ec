"""The oracle-LLM judge (telekd.judge, telekd.judge_server): numbers from a tiny constrained judge,
the OpenAI-compatible path, failures, the cache, the API key, and the max_samples subset."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("ragas")

from telekd.judge import (  # noqa: E402
    LLM_METRICS, NOT_JUDGED, JudgeConfig, JudgeSetupError, OpenAIBackend, bounded_schema, judge_rows,
)

SECRET = "sk-telekd-test-0123456789abcdef"
KEY_ENV = "TELEKD_TEST_JUDGE_KEY"

CTX = ("In NR the radio resource control layer places a device in one of three states: RRC_IDLE, "
       "RRC_CONNECTED and RRC_INACTIVE. RRC_INACTIVE was introduced in NR.")
ROWS = [
    {"id": "q-02", "question": "Which RRC state was introduced in NR?", "context": CTX,
     "prediction": "RRC_INACTIVE", "references": ["RRC_INACTIVE", "the RRC_INACTIVE state"]},
    {"id": "q-01", "question": "How many RRC states does NR define?", "context": CTX,
     "prediction": "three states", "references": ["three"]},
    {"id": "q-03", "question": "What does the device monitor in idle?", "context": CTX,
     "prediction": "paging", "references": ["paging"]},
]


def small_cfg(tmp_path: Path, **kw) -> JudgeConfig:
    """Bounds small enough that the tiny judge answers in well under a second per call."""
    base = dict(max_chars=12, max_items=2, max_new_tokens=512, max_retries=1, timeout_s=30.0,
                cache_dir=str(tmp_path / "cache" / "judge"), backoff_s=0.01)
    return JudgeConfig(**{**base, **kw})


def assert_numbers(scores):
    for s in scores:
        assert s["judge_error"] is None, s
        for m in LLM_METRICS:
            assert isinstance(s[m], float) and math.isfinite(s[m]) and 0.0 <= s[m] <= 1.0, (m, s)


def serve(server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


def stop(server, thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def judge_model(saved_models):
    return str(saved_models["llama"])


@pytest.fixture(scope="module")
def local_run(judge_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    cfg = small_cfg(tmp, judge_model=judge_model)
    t0 = time.perf_counter()
    scores, report = judge_rows(ROWS[:2], cfg, progress=False)
    return cfg, scores, report, time.perf_counter() - t0


# -----------------------------------------------------------------------------


def test_bounded_schema_bounds_strings_lists_and_verdicts():
    from ragas.metrics.collections.answer_correctness.util import ClassificationWithReason
    from ragas.metrics.collections.faithfulness.util import NLIStatementOutput, StatementGeneratorOutput

    s = bounded_schema(StatementGeneratorOutput.model_json_schema(), 50, 4)
    arr = s["properties"]["statements"]
    assert (arr["minItems"], arr["maxItems"], arr["items"]["maxLength"]) == (1, 4, 50)
    nli = bounded_schema(NLIStatementOutput.model_json_schema(), 50, 4)
    item = next(iter(nli["$defs"].values()))
    assert item["properties"]["verdict"]["enum"] == [0, 1] and item["properties"]["reason"]["maxLength"] == 50
    cls = bounded_schema(ClassificationWithReason.model_json_schema(), 50, 4)
    assert "minItems" not in cls["properties"]["TP"] and cls["properties"]["FN"]["maxItems"] == 4


def test_local_judge_gives_numbers(local_run):
    _, scores, report, seconds = local_run
    assert_numbers(scores)
    assert (report.judged, report.failures, report.not_judged) == (2, 0, 0)
    assert report.calls > 0
    print(f"local tiny judge: {seconds / 2:.2f}s per sample, {report.calls} calls")


def test_cache_second_run_makes_no_model_calls(local_run):
    cfg, scores, report, _ = local_run

    class NoModel:  # same identity as the local judge, but any model call fails the test
        identity = report.judge
        calls = 0

        def complete(self, prompt, schema, name):
            NoModel.calls += 1
            raise AssertionError("the cache should have answered")

    again, report2 = judge_rows(ROWS[:2], cfg, progress=False, backend=NoModel())
    assert NoModel.calls == 0 and report2.calls == 0 and report2.cache_hits >= report.calls
    assert again == scores
    assert list(Path(cfg.cache_dir).rglob("*.json"))


def test_openai_backend_through_judge_server(judge_model, tmp_path, monkeypatch):
    from telekd.judge_server import make_server

    server = make_server(judge_model, 0, served_name="tiny-judge")
    assert server.server_address[0] == "127.0.0.1"
    thread = serve(server)
    try:
        base = f"http://127.0.0.1:{server.port}/v1"
        with urllib.request.urlopen(f"{base}/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "tiny-judge"
        monkeypatch.delenv(KEY_ENV, raising=False)  # loopback: no key needed, none sent
        cfg = small_cfg(tmp_path, backend="openai", base_url=base, model="tiny-judge", api_key_env=KEY_ENV)
        scores, report = judge_rows(ROWS[1:2], cfg, progress=False)
    finally:
        stop(server, thread)
    assert_numbers(scores)
    assert report.calls > 0 and report.judge.startswith("openai:")


# ---- failing judges ------------------------------------------------------------------------


class FakeJudge(BaseHTTPRequestHandler):
    """mode 'sleep': answers too late; 'garbage': 200 with non-JSON content echoing the Authorization header."""

    protocol_version = "HTTP/1.1"
    mode = "garbage"
    seen_auth: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization")
        type(self).seen_auth.append(auth)
        if self.mode == "sleep":
            time.sleep(1.5)
        content = f"Sure! Here is my verdict: the answer is fine. ({auth})"
        body = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout)


def fake_server(mode: str):
    handler = type(f"Fake{mode}", (FakeJudge,), {"mode": mode, "seen_auth": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server, handler


@pytest.mark.parametrize("mode", ["sleep", "garbage"])
def test_failing_judge_gives_none_with_reason(mode, tmp_path, monkeypatch):
    from telekd import evaluation, layout
    from telekd.io import read_json, read_jsonl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server, handler = fake_server(mode)
    thread = serve(server)
    try:
        cfg = small_cfg(tmp_path, backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                        model="m", api_key_env=KEY_ENV, timeout_s=0.3, max_retries=1)
        scores, report = judge_rows(ROWS[:2], cfg, progress=False)
    finally:
        stop(server, thread)
    assert handler.seen_auth and all(a == f"Bearer {SECRET}" for a in handler.seen_auth)  # the key was sent
    assert (report.judged, report.failures, report.not_judged) == (2, 2, 0)
    assert report.failed_metrics == {m: 2 for m in LLM_METRICS}
    for s in scores:
        assert all(s[m] is None for m in LLM_METRICS)
        assert ("timed out" if mode == "sleep" else "unparseable") in s["judge_error"]
        assert "after 2 attempts" in s["judge_error"]
    assert not list(Path(cfg.cache_dir).rglob("*.json"))  # failures are not cached
    # the written files: None stays None, failures counted, and the key appears nowhere
    evaluation.write_scores("cell", "llm", [r["id"] for r in ROWS[:2]], scores, LLM_METRICS, 200, 0,
                            extra=report.extra())
    assert all(r["answer_correctness"] is None for r in read_jsonl(f"{layout.SCORES}/cell/llm.jsonl"))
    assert read_json(f"{layout.SCORES}/cell/llm.summary.json")["judge_failures"] == 2
    assert set(read_json(f"{layout.METRICS}/eval/cell/llm.json")) == set(LLM_METRICS)  # the metric: means only
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert SECRET not in written and SECRET not in repr(scores) and SECRET not in repr(report)
    if mode == "garbage":
        assert "***" in scores[0]["judge_error"]  # the echoed key was scrubbed


def test_api_key_rules(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeSetupError, match=KEY_ENV):  # remote endpoint, no key: refuse
        OpenAIBackend("https://judge.example.com/v1", "m", api_key_env=KEY_ENV)
    OpenAIBackend("http://localhost:9/v1", "m", api_key_env=KEY_ENV)  # loopback: fine without one
    monkeypatch.setenv(KEY_ENV, SECRET)
    b = OpenAIBackend("https://judge.example.com/v1", "m", api_key_env=KEY_ENV)
    assert SECRET not in repr(b) and SECRET not in b.identity and SECRET not in str(vars(b).keys())
    err = None
    try:  # nothing listens on port 9 of the loopback: a connection error, without the key in it
        OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV, timeout_s=2).complete("p", {}, "X")
    except Exception as e:  # noqa: BLE001
        err = e
    assert err is not None and SECRET not in str(err) and err.__cause__ is None


def test_params_validation():
    from pydantic import ValidationError

    from telekd.params import EvalLLM

    with pytest.raises(ValidationError, match="base_url"):
        EvalLLM(backend="openai", model="m")
    assert EvalLLM(backend="local").api_key_env == "TELEKD_JUDGE_API_KEY"


# ---- the max_samples subset ----------------------------------------------------------------


class Scripted:
    """A judge that answers every schema with a fixed valid object (no model)."""

    identity = "scripted"
    ANSWERS = {
        "StatementGeneratorOutput": {"statements": ["a statement"]},
        "ClaimDecompositionOutput": {"claims": ["a claim"]},
        "NLIStatementOutput": {"statements": [{"statement": "a claim", "reason": "r", "verdict": 1}]},
        "ClassificationWithReason": {"TP": [{"statement": "a statement", "reason": "r"}], "FP": [], "FN": []},
    }

    def __init__(self):
        self.calls = 0

    def complete(self, prompt, schema, name):
        self.calls += 1
        return json.dumps(self.ANSWERS[name])


def test_max_samples_is_the_same_sorted_id_subset(tmp_path):
    rows = [{**ROWS[i % 3], "id": f"q-{i:02d}"} for i in (7, 3, 9, 1, 5)]
    cfg = small_cfg(tmp_path, max_samples=2, cache_dir=None, embedding_model=None)
    scores, report = judge_rows(rows, cfg, progress=False, backend=Scripted())
    judged = {r["id"] for r, s in zip(rows, scores) if s["judge_error"] != NOT_JUDGED}
    assert judged == {"q-01", "q-03"}
    assert (report.judged, report.failures, report.not_judged) == (2, 0, 3)
    assert_numbers([s for s in scores if s["judge_error"] != NOT_JUDGED])
    assert all(s[m] is None for s in scores if s["judge_error"] == NOT_JUDGED for m in LLM_METRICS)
    # another order of the same rows (another cell's file): the same subset and the same scores
    again, _ = judge_rows(rows[::-1], cfg, progress=False, backend=Scripted())
    assert {r["id"]: s for r, s in zip(rows[::-1], again)} == {r["id"]: s for r, s in zip(rows, scores)}


def test_empty_prediction_is_zero_not_failure(tmp_path):
    rows = [{**ROWS[0], "prediction": "  "}]
    backend = Scripted()
    scores, report = judge_rows(rows, small_cfg(tmp_path, cache_dir=None), progress=False, backend=backend)
    assert scores[0]["answer_correctness"] == 0.0 and scores[0]["faithfulness"] is None
    assert (report.failures, report.undefined, backend.calls) == (0, 1, 0)


def test_missing_xgrammar_names_the_fix(monkeypatch, judge_model):
    import sys

    from telekd.judge import LocalGenerator

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    with pytest.raises(JudgeSetupError, match="pip install --no-deps xgrammar==0.2.8"):
        LocalGenerator(judge_model)
