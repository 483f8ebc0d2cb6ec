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
    assert s["additionalProperties"] is False and item["additionalProperties"] is False
    assert cls["additionalProperties"] is False and all(d["additionalProperties"] is False for d in cls["$defs"].values())


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
        # a timeout may pass; a reply at temperature 0 comes back the same, so garbage is not asked again
        assert ("after 2 attempts" if mode == "sleep" else "not retried: deterministic") in s["judge_error"]
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


# ---- replies checked against the bounded schema and the metrics' definitions (hand-computed) -----------------

PRED, REF, CTX2 = "the UDM", "the SMF", "The AMF selects the SMF for a PDU session."
STMTS = {PRED: ["The UDM is selected.", "It is a core node."], REF: ["The SMF is selected.", "It handles sessions."]}


class Fixed:
    """A judge that answers each prompt from fixed JSON; `replace` overrides answers by schema name."""

    identity = "fixed"

    def __init__(self, deterministic=False, **replace):
        self.replace, self.calls, self.deterministic = replace, 0, deterministic

    def complete(self, prompt, schema, name):
        self.calls += 1
        task = prompt.rsplit("Now perform the same", 1)[-1]  # the prompt's own input, after ragas's examples
        if name in self.replace:
            reply = self.replace[name]
            return reply(task) if callable(reply) else json.dumps(reply)
        if name == "StatementGeneratorOutput":
            return json.dumps({"statements": STMTS[PRED] if PRED in task else STMTS[REF]})
        if name == "ClaimDecompositionOutput":
            return json.dumps({"claims": ["resp claim one", "resp claim two"] if PRED in task
                               else ["ref claim one", "ref claim two"]})
        if name == "NLIStatementOutput":  # FactualCorrectness: response claims 1, 1; reference claims 0, 1
            verdicts = ([1, 1] if "resp claim" in task else [0, 1] if "ref claim" in task
                        else [1, 0])        # Faithfulness: the answer's two statements against the context
            return json.dumps({"statements": [{"statement": f"s{i}", "reason": "r", "verdict": v}
                                              for i, v in enumerate(verdicts)]})
        if name == "ClassificationWithReason":  # TP 1, FP 1, FN 1
            item = {"statement": "s", "reason": "r"}
            return json.dumps({"TP": [item], "FP": [item], "FN": [item]})
        raise AssertionError(name)


def _judge_one(tmp_path, backend, **kw):
    row = {"id": "q", "question": "Which function does the AMF select?", "context": CTX2, "prediction": PRED,
           "references": [REF]}
    cfg = small_cfg(tmp_path, cache_dir=None, max_chars=40, max_items=3, **kw)
    [s], report = judge_rows([row], cfg, progress=False, backend=backend)
    return s, report


def test_judge_metrics_match_their_published_formulas(tmp_path):
    """ragas 0.4.3 definitions, computed by hand from the fixed replies:
    answer correctness = 0.75 F1(TP 1, FP 1, FN 1) + 0.25 cos(MiniLM) = 0.75 * 0.5 + 0.25 cos;
    factual correctness = F1(tp 2, fp 0, fn 1) = 2 * 1 * (2/3) / (1 + 2/3) = 0.8 (rounded to 2 places as ragas does);
    faithfulness = supported / statements = 1 / 2."""
    from telekd.metrics import cosine_scores

    s, report = _judge_one(tmp_path, Fixed())
    cos = cosine_scores([PRED], [[REF]])[0]
    assert s["judge_error"] is None and report.failures == 0
    assert s["answer_correctness"] == pytest.approx(0.75 * 0.5 + 0.25 * cos, abs=1e-6)
    assert s["factual_correctness"] == pytest.approx(0.8)
    assert s["faithfulness"] == pytest.approx(0.5)


def test_judge_metric_weights_are_ragas_defaults(tmp_path):
    from telekd.judge import Judge

    j = Judge(small_cfg(tmp_path, cache_dir=None), backend=Fixed())
    assert j.answer_correctness.weights == [0.75, 0.25] and j.answer_correctness.beta == 1.0
    assert j.factual_correctness.mode == "f1" and j.factual_correctness.beta == 1.0


EMPTY_CLASSIFICATION = {"TP": [], "FP": [], "FN": []}


@pytest.mark.parametrize("name,reply,metrics,reason", [
    # the case: "the UDM" against "the SMF" with an empty classification scored 0.83
    ("ClassificationWithReason", EMPTY_CLASSIFICATION, {"answer_correctness"}, "empty classification"),
    # a server that ignores the schema: an empty statement list scored 0.79 (factuality taken as perfect)
    ("StatementGeneratorOutput", {"statements": []}, {"answer_correctness", "faithfulness"}, "bounded schema"),
    ("ClaimDecompositionOutput", {"claims": []}, {"factual_correctness"}, "bounded schema"),
    ("NLIStatementOutput", {"statements": []}, {"factual_correctness", "faithfulness"}, "bounded schema"),
    # out of the bounded schema: a verdict of 7, a string over max_chars, a list over max_items, a missing key
    ("NLIStatementOutput", {"statements": [{"statement": "s", "reason": "r", "verdict": 7}] * 2},
     {"factual_correctness", "faithfulness"}, "bounded schema"),
    ("StatementGeneratorOutput", {"statements": ["x" * 41]}, {"answer_correctness", "faithfulness"}, "bounded schema"),
    ("ClaimDecompositionOutput", {"claims": ["c"] * 4}, {"factual_correctness"}, "bounded schema"),
    ("ClassificationWithReason", {"TP": [{"statement": "s"}], "FP": [], "FN": []}, {"answer_correctness"},
     "bounded schema"),
    # an extra key (a server that ignores response_format): out of schema, at the top or inside an item
    ("ClassificationWithReason", {"TP": [{"statement": "s", "reason": "r"}], "FP": [], "FN": [], "score": 1},
     {"answer_correctness"}, "bounded schema"),
    ("NLIStatementOutput", {"statements": [{"statement": "s", "reason": "r", "verdict": 1, "confidence": 1}] * 2},
     {"factual_correctness", "faithfulness"}, "bounded schema"),
    # degenerate: fewer verdicts than statements would shrink the denominator (1 of 1 instead of 1 of 2)
    ("NLIStatementOutput", {"statements": [{"statement": "s", "reason": "r", "verdict": 1}]},
     {"factual_correctness", "faithfulness"}, "1 verdicts for 2 statements"),
])
def test_bad_judge_replies_are_failed_judgments(tmp_path, name, reply, metrics, reason):
    s, report = _judge_one(tmp_path, Fixed(**{name: reply}))
    for m in LLM_METRICS:
        if m in metrics:
            assert s[m] is None and f"{m}: " in s["judge_error"], (m, s)
        else:
            assert isinstance(s[m], float), (m, s)
    assert reason in s["judge_error"] and report.failures == 1
    assert {m for m, n in report.failed_metrics.items() if n} == metrics


def test_unparseable_reply_names_the_schema(tmp_path):
    s, _ = _judge_one(tmp_path, Fixed(ClassificationWithReason=lambda task: "Sure! TP: all of them"))
    assert s["answer_correctness"] is None and "unparseable judge output for ClassificationWithReason" in s["judge_error"]


def test_strict_classification_holds_tp_plus_fp_to_the_answer_statements(tmp_path):
    from telekd.judge import check_classification

    assert check_classification(0, 0, 0, 2, 2).startswith("empty classification")
    assert check_classification(3, 1, 0, 2, 2) is None                        # ragas's convention: accepted
    assert "puts 4 statements in TP/FP, but the answer has 2" in check_classification(3, 1, 0, 2, 2, strict=True)
    assert "3 FN statements" in check_classification(1, 1, 3, 2, 2, strict=True)
    assert check_classification(1, 1, 1, 2, 2, strict=True) is None
    item = {"statement": "s", "reason": "r"}
    four = {"TP": [item] * 3, "FP": [item], "FN": []}
    s, _ = _judge_one(tmp_path, Fixed(ClassificationWithReason=four))
    assert s["answer_correctness"] is not None                                # ragas's convention: a number
    s, _ = _judge_one(tmp_path / "strict", Fixed(ClassificationWithReason=four), strict_classification=True)
    assert s["answer_correctness"] is None and "answer has 2" in s["judge_error"]


def test_deterministic_judge_failures_are_not_retried(tmp_path):
    flaky = Fixed(ClassificationWithReason=EMPTY_CLASSIFICATION)
    s, _ = _judge_one(tmp_path, flaky)  # max_retries=1: two classification calls
    assert "(after 2 attempts)" in s["judge_error"]
    greedy = Fixed(deterministic=True, ClassificationWithReason=EMPTY_CLASSIFICATION)
    s, _ = _judge_one(tmp_path, greedy)
    # the retry re-asks only the classification (the statements come from the cache)
    assert "not retried: deterministic" in s["judge_error"] and greedy.calls == flaky.calls - 1


def test_cached_reply_out_of_schema_is_asked_again(tmp_path):
    from telekd.judge import JudgeCache

    cache = JudgeCache(tmp_path / "c")
    backend = Fixed()
    row = {"id": "q", "question": "Q?", "context": CTX2, "prediction": PRED, "references": [REF]}
    cfg = small_cfg(tmp_path, cache_dir=str(tmp_path / "c"), max_chars=40, max_items=3)
    first, _ = judge_rows([row], cfg, progress=False, backend=backend)
    for f in (tmp_path / "c").rglob("*.json"):  # poison every entry with an out-of-schema reply
        entry = json.loads(f.read_text())
        entry["output"] = json.dumps({"statements": []})
        f.write_text(json.dumps(entry))
    calls = backend.calls
    again, report = judge_rows([row], cfg, progress=False, backend=backend)
    assert again == first and backend.calls == 2 * calls  # every poisoned entry was asked again
    del cache


# ---- concurrency and what is retried (OpenAI-compatible backend) ----------------------------------------------


class SchemaServer(BaseHTTPRequestHandler):
    """Answers each request with Scripted's reply for its schema after `delay` s; records the most requests in
    flight at once. mode: ok | length (finish_reason length) | http400 | http503."""

    protocol_version = "HTTP/1.1"
    mode, delay = "ok", 0.0
    lock = threading.Lock()
    inflight = peak = requests = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with cls.lock:
            cls.inflight += 1
            cls.requests += 1
            cls.peak = max(cls.peak, cls.inflight)
        time.sleep(cls.delay)
        with cls.lock:
            cls.inflight -= 1
        if cls.mode.startswith("http"):
            code = int(cls.mode[4:])
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
            return
        name = body["response_format"]["json_schema"]["name"]
        content = json.dumps(Scripted.ANSWERS[name])
        finish = "length" if cls.mode == "length" else "stop"
        out = json.dumps({"choices": [{"index": 0, "finish_reason": finish,
                                       "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def schema_server(mode="ok", delay=0.0):
    handler = type(f"Schema{mode}", (SchemaServer,), {"mode": mode, "delay": delay, "lock": threading.Lock(),
                                                      "inflight": 0, "peak": 0, "requests": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server, handler


def _openai_cfg(tmp_path, server, **kw):
    return small_cfg(tmp_path, backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                     model="m", api_key_env=KEY_ENV, cache_dir=None, **kw)


def test_concurrent_judging_is_bounded_and_gives_the_same_scores(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    rows = [{**ROWS[i % 3], "id": f"q-{i:02d}"} for i in range(8)]
    runs = {}
    for n in (1, 3):
        server, handler = schema_server(delay=0.05)
        thread = serve(server)
        try:
            scores, report = judge_rows(rows, _openai_cfg(tmp_path, server, concurrency=n), progress=False)
        finally:
            stop(server, thread)
        runs[n] = (scores, report, handler.peak, handler.requests)
    (s1, r1, peak1, req1), (s3, r3, peak3, req3) = runs[1], runs[3]
    assert peak1 == 1 and 1 < peak3 <= 3            # bounded by eval_llm.concurrency
    same = lambda r: {k: v for k, v in r.extra().items() if k != "judge"}  # noqa: E731 (the judge names its port)
    assert s3 == s1 and same(r3) == same(r1)        # the same scores, in the same order
    assert req3 == req1 == r1.calls == r3.calls     # per-row counts add up to every request made
    assert_numbers(s3)


def test_concurrency_needs_the_openai_backend(tmp_path):
    from telekd.judge import Judge

    with pytest.raises(JudgeSetupError, match="concurrency 2 needs backend openai"):
        Judge(small_cfg(tmp_path, judge_model="x", concurrency=2))
    with pytest.raises(JudgeSetupError, match="must be >= 1"):
        Judge(small_cfg(tmp_path, concurrency=0), backend=Scripted())


@pytest.mark.parametrize("mode,retried,reason", [
    ("length", False, "finish_reason length"),   # temperature 0: cut at the same place again
    ("http400", False, "HTTP 400"),              # a bad request stays bad
    ("http503", True, "HTTP 503"),               # the server may recover
])
def test_only_failures_that_can_pass_are_retried(tmp_path, monkeypatch, mode, retried, reason):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server, handler = schema_server(mode)
    thread = serve(server)
    try:
        [s], report = judge_rows(ROWS[1:2], _openai_cfg(tmp_path, server, max_retries=2), progress=False)
    finally:
        stop(server, thread)
    assert all(s[m] is None for m in LLM_METRICS) and reason in s["judge_error"]
    # the first call of each of the 3 metrics fails; retried: 3 attempts each
    assert handler.requests == (9 if retried else 3)
    assert ("(after 3 attempts)" if retried else "not retried: deterministic") in s["judge_error"]


# a blank statement fits the bounded schema but states nothing: ragas counted it (a TP of "" scored 0.83)
@pytest.mark.parametrize("name,reply,metrics", [
    ("StatementGeneratorOutput", {"statements": [""]}, {"answer_correctness", "faithfulness"}),
    ("StatementGeneratorOutput", {"statements": ["a", "   "]}, {"answer_correctness", "faithfulness"}),
    ("ClaimDecompositionOutput", {"claims": [" "]}, {"factual_correctness"}),
    ("NLIStatementOutput", {"statements": [{"statement": "", "reason": "r", "verdict": 1}] * 2},
     {"factual_correctness", "faithfulness"}),
    ("ClassificationWithReason", {"TP": [{"statement": "", "reason": "r"}], "FP": [], "FN": []},
     {"answer_correctness"}),
])
def test_blank_statements_are_failed_judgments(tmp_path, name, reply, metrics):
    from telekd.judge import blank_statement

    assert blank_statement(reply) is not None
    s, report = _judge_one(tmp_path, Fixed(**{name: reply}))
    for m in LLM_METRICS:
        assert (s[m] is None) == (m in metrics), (m, s)
    assert "blank statement" in s["judge_error"] and report.failures == 1


def test_blank_statement_finds_the_first_blank_and_passes_text():
    from telekd.judge import blank_statement

    assert blank_statement({"statements": ["a", "b"]}) is None
    assert blank_statement({"TP": [{"statement": "s", "reason": ""}], "FP": [], "FN": []}) is None  # reason may be ""
    assert blank_statement({"FN": [{"statement": "s", "reason": "r"}, {"statement": "\n", "reason": "r"}]}) == \
        "FN/1/statement"
    assert blank_statement({"claims": ["c", ""]}) == "claims/1"
