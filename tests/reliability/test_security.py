"""Security: no remote code unless asked, safetensors only, no pickle, API keys only from the environment."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, study_env
from telekd.models import ModelLoadError, load_model

SOURCES = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
KEY_ENV = "TELEKD_JUDGE_API_KEY"
DUMMY_KEY = "sk-telekd-dummy-5f3c9a1e7d2b4c68"


def calls(name: str):
    """(file, line, ast.Call) of every call of a function or method called `name` in src/ and stages/."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                    yield path.relative_to(ROOT), node.lineno, node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_from_pretrained_passes_trust_remote_code_from_params():
    found = list(calls("from_pretrained"))
    assert len(found) >= 4
    for where, line, call in found:
        value = keyword(call, "trust_remote_code")
        assert value is not None, f"{where}:{line}: from_pretrained without trust_remote_code"
        assert not isinstance(value, ast.Constant), f"{where}:{line}: trust_remote_code is a constant, not the param"
        assert "trust_remote_code" in ast.unparse(value), f"{where}:{line}: {ast.unparse(value)}"


def test_models_load_from_safetensors_only_and_nothing_unpickles():
    models = [(w, n, c) for w, n, c in calls("from_pretrained") if "Model" in ast.unparse(c.func)]
    assert models
    for where, line, call in models:
        v = keyword(call, "use_safetensors")
        if keyword(call, "gguf_file") is not None:  # a GGUF file: tensors read by the gguf package, nothing unpickles
            continue
        assert isinstance(v, ast.Constant) and v.value is True, f"{where}:{line}: use_safetensors=True missing"
    for where, line, call in calls("load"):
        if ast.unparse(call.func) == "torch.load":
            v = keyword(call, "weights_only")
            assert isinstance(v, ast.Constant) and v.value is True, f"{where}:{line}: torch.load without weights_only=True"
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno}: imports {bad}"


def test_trust_remote_code_is_false_by_default_and_read_from_params():
    from telekd.params import load_params

    assert load_params(ROOT / "params.yaml").models.trust_remote_code is False


def test_checkpoint_with_only_pytorch_model_bin_is_refused(tmp_path, saved_models):
    import torch
    from safetensors.torch import load_file

    bad = tmp_path / "pickled"
    shutil.copytree(saved_models["student"], bad)
    state = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")  # a pickle: loading it could run code
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights \(telekd loads safetensors only\)"):
        load_model(str(bad))


def test_api_key_never_leaves_the_environment(tmp_path, saved_models):
    """eval_llm with backend openai against the local judge server (loopback) and a dummy key: the stage succeeds
    with no network beyond loopback, and the key appears in no file it wrote, nor in its output."""
    pytest.importorskip("ragas")
    import yaml

    from telekd.judge_server import make_server

    server = make_server(str(saved_models["llama"]), 0, served_name="tiny-judge")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["eval_llm"].update(backend="openai", base_url=f"http://127.0.0.1:{server.port}/v1", model="tiny-judge",
                                  max_new_tokens=256, max_retries=0)
        params["profiles"]["tiny"]["eval"].update(max_samples=1, max_chars=12, max_items=1)
        params["stats"]["bootstrap_resamples"] = 100
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp_path / "predictions").mkdir()
        ctx = "RRC_INACTIVE was introduced in NR."
        rows = [{"id": f"q{i}", "question": "Which RRC state was introduced in NR?", "context": ctx,
                 "prediction": "RRC_INACTIVE", "references": ["RRC_INACTIVE"], "generation_s": 0.1} for i in range(2)]
        (tmp_path / "predictions/cell.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {**study_env(tmp_path / "network.log"), KEY_ENV: DUMMY_KEY}
        p = subprocess.run([sys.executable, str(ROOT / "stages/eval_llm.py"), "--name", "cell"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval_llm cell: 1 judged, 0 with judge failures" in p.stdout
    assert not (tmp_path / "network.log").exists()
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.match("cache/judge/*/*.json") for f in written) and (tmp_path / "scores/cell/llm.jsonl").exists()
    for f in written:
        assert DUMMY_KEY.encode() not in f.read_bytes(), f
    assert DUMMY_KEY not in p.stdout + p.stderr


@pytest.mark.slow
def test_api_key_in_no_file_of_a_whole_study_run(study):
    """The reduced study ran with a judge key in its environment: no output, log, metric, dvc.lock or DVC cache
    file holds it, and neither does DVC's or the stages' output."""
    from conftest import STUDY_KEY

    files = [f for f in study["dir"].rglob("*") if f.is_file() and ".git" not in f.parts]
    assert any(f.name == "dvc.lock" for f in files) and any(f.match("metrics/eval/*/*.json") for f in files)
    leaked = [f for f in files if STUDY_KEY.encode() in f.read_bytes()]
    assert not leaked, leaked
    assert STUDY_KEY not in study["output"]
