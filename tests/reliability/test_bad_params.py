"""A bad params.yaml stops every stage at once: one line naming the key (and the allowed values), no traceback,
before torch (hence any model) is even imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

STAGES = {
    "prepare": [], "base_models": [], "sft": ["--model", "student"],
    "teacher_cache": ["--teacher", "llama", "--teacher-sft", "base"], "vanilla": ["--cell", "llama-base-base-vanilla"],
    "dskd": ["--cell", "llama-base-base-dskd"], "uld": ["--cell", "llama-base-base-uld"],
    "generate": ["--cell", "llama-base-base-vanilla"], "eval_ngram": ["--name", "x"], "eval_embed": ["--name", "x"],
    "eval_llm": ["--name", "x"], "stats": [], "report": [],
}
# Every stage in one interpreter, each from a clean slate: (exit message, was torch imported?) per stage.
RUNNER = r"""
import json, runpy, sys
stages = json.loads(sys.argv[1])
out = {}
for name, args in stages.items():
    for m in [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "telekd")]:
        del sys.modules[m]
    sys.argv = [f"stages/{name}.py", *args]
    try:
        runpy.run_path(f"{sys.argv[0]}", run_name="__main__")
        code = None
    except SystemExit as e:
        code = e.code
    out[name] = [code if isinstance(code, (str, type(None))) else int(code), "torch" in sys.modules]
print(json.dumps(out))
"""


@pytest.mark.parametrize("edit, line", [
    (lambda p: p["kd"].update(alg="dsdk"), "params.yaml: kd.alg: Input should be 'vanilla', 'dskd' or 'uld'"),
    (lambda p: p["vanilla"]["divergence"].update(kind="kl"),
     "params.yaml: vanilla.divergence.kind: Input should be 'forward_kl', 'reverse_kl'"),
    (lambda p: p["grid"].update(teachers=["llama", "gpt"]), "params.yaml: grid.teachers ['llama', 'gpt'] / sft.models ['llama', 'mistral', 'student']: gpt not a model"),
    (lambda p: p.update(profile="huge"), "params.yaml: profile: 'huge' is not one of the profiles: paper, small, tiny"),
    (lambda p: p.update(seed="abc"), "params.yaml: seed: Input should be a valid integer, unable to parse string as an integer, got 'abc'"),
    (lambda p: p["profiles"]["tiny"].update(dtype="float16"),
     "params.yaml: profiles.tiny.dtype: Input should be 'float32' or 'bfloat16', got 'float16'"),
    (lambda p: p["dskd"]["divergence"].update(skew_lambda=1.0),
     "params.yaml: dskd.divergence.skew_lambda: Input should be less than 1, got 1.0"),
    (lambda p: p["kd"].update(temperature=1.0),
     "params.yaml: kd: kd.temperature moved to vanilla.divergence.temperature and dskd.divergence.temperature"),
])
def test_every_stage_fails_fast_naming_the_key(tmp_path, edit, line):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "stages").symlink_to(ROOT / "stages")
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(STAGES)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.splitlines()[-1])
    assert set(result) == set(STAGES)
    for stage, (message, torch_loaded) in result.items():
        assert isinstance(message, str) and message.startswith(line), (stage, message)
        assert "\n" not in message and "Traceback" not in message, (stage, message)
        assert torch_loaded is False, f"{stage} imported torch before validating params.yaml"
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()  # nothing written


def test_a_stage_process_prints_the_line_and_exits_1(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["vanilla"]["divergence"]["kind"] = "kl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = subprocess.run([sys.executable, str(ROOT / "stages/vanilla.py"), "--cell", "llama-base-base-vanilla"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "params.yaml: vanilla.divergence.kind: Input should be 'forward_kl', 'reverse_kl', 'js', 'skewed_forward_kl', "
        "'skewed_reverse_kl', 'tvd' or 'adaptive_kl', got 'kl'"]
