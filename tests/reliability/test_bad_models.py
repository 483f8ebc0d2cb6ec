"""Models that cannot be served fail in one line that names the fix."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from telekd.models import ModelLoadError, load_model


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_without_weights(tmp_path, saved_models):
    bad = copy(saved_models["student"], tmp_path / "noweights")
    for f in bad.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(bad))
    assert one_line(e) == (f"{bad}: no *.safetensors weights (telekd loads safetensors only): "
                           "re-save the model with safe_serialization=True")


def test_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "empty"))
    assert "no config.json" in one_line(e) and "dvc repro" in one_line(e)


def test_tokenizer_that_does_not_match_its_model(tmp_path, saved_models, tokenizers):
    """A 400-token model with a tokenizer of 400 + 50 tokens (e.g. another checkpoint's) is refused."""
    bad = copy(saved_models["student"], tmp_path / "mixed")
    tok = tokenizers["llama"]
    tok = type(tok).from_pretrained(saved_models["student"])
    tok.add_tokens([f"tok{i}" for i in range(50)])
    tok.save_pretrained(bad)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(bad))
    assert one_line(e) == (f"{bad}: tokenizer has {len(tok)} tokens but the model embeds {len(tok) - 50}: they do not "
                           "belong together; load both from the same checkpoint")


def test_vanilla_kd_across_vocabularies_with_vocab_mismatch_error(tmp_path, saved_models, monkeypatch):
    """vanilla.vocab_mismatch: error and a teacher whose vocabulary differs: refused before training, in one line."""
    from telekd.kd.run import Built, KDRun
    from telekd.params import load_params

    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"vanilla": p.vanilla.model_copy(update={"vocab_mismatch": "error"})})
    seen = {}

    def run_cell(params, section, cell, build, divergence=None):  # the shared flow, reduced to the build step
        seen["section"] = section
        build(KDRun(cell, None, type("Inp", (), {"vocab_match": False})(), None, "cpu"))

    monkeypatch.setattr("telekd.kd.run.run_cell", run_cell)
    monkeypatch.setattr("telekd.params.load_params", lambda *a, **k: p)
    monkeypatch.setattr("sys.argv", ["vanilla.py", "--cell", "mistral-base-base-vanilla"])
    import runpy

    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "stages" / "vanilla.py"), run_name="__main__")
    assert str(e.value) == ("models/base/mistral: teacher vocabulary differs from the student's and "
                            "vanilla.vocab_mismatch is error: set it to align or use kd.alg: dskd")
    assert seen["section"] is p.vanilla and Built
