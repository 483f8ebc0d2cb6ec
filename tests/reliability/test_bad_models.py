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
    """kd.vocab_mismatch: error and a teacher whose vocabulary differs: refused before any data or model loads."""
    from telekd.distill import kd_inputs
    from telekd.params import load_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/base").mkdir(parents=True)
    shutil.copytree(saved_models["student"], tmp_path / "models/base/student")
    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"kd": p.kd.model_copy(update={"vocab_mismatch": "error"})})
    with pytest.raises(ValueError) as e:
        kd_inputs(p, str(saved_models["mistral"]), need_alignment=True)
    assert one_line(e) == (f"{saved_models['mistral']}: teacher vocabulary differs from the student's and "
                           "kd.vocab_mismatch is error: set kd.vocab_mismatch: align or use kd.alg: dskd")
    assert not (tmp_path / "data").exists()  # it stopped before reading the split
