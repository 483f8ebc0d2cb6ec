"""params.yaml validation: one line naming the key and the allowed values."""

import pytest
import yaml

from conftest import ROOT
from telekd.params import ParamsError, load_params


def _write(tmp_path, edit):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(p)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    return f


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.profile == "tiny" and set(p.profiles) == {"tiny", "paper"}
    paper = p.profiles["paper"].models
    assert paper["llama"].hub == "meta-llama/Llama-2-7b-hf" and len(paper["llama"].revision) == 40
    assert paper["student"].hub == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["kd"].update(alg="dsdk"), "kd.alg"),
    (lambda p: p["kd"].update(divergence="kl"), "kd.divergence"),
    (lambda p: p["grid"].update(teachers=["llama", "gpt"]), "grid.teachers"),
    (lambda p: p.update(profile="huge"), "profile"),
    (lambda p: p["kd"].update(kd_rate="half"), "kd.kd_rate"),
    (lambda p: p["data"].update(on_invalid="ignore"), "data.on_invalid"),
    (lambda p: p["kd"].update(temprature=2.0), "kd.temprature"),
])
def test_bad_values_fail_naming_the_key(tmp_path, edit, key):
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, edit))
    assert key in str(e.value)


def test_hub_model_without_revision_is_refused(tmp_path):
    f = _write(tmp_path, lambda p: p["profiles"]["paper"]["models"]["llama"].pop("revision"))
    with pytest.raises(ParamsError, match="revision"):
        load_params(f)
