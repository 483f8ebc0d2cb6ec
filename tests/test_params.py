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
    assert p.profile == "tiny" and set(p.profiles) == {"tiny", "small", "paper"}
    paper = p.profiles["paper"].models
    assert paper["llama"].hub == "meta-llama/Llama-2-7b-hf" and len(paper["llama"].revision) == 40
    assert paper["student"].hub == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["kd"].update(alg="dsdk"), "kd.alg"),
    (lambda p: p["vanilla"]["divergence"].update(kind="kl"), "vanilla.divergence.kind"),
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


def _one_line(tmp_path, edit) -> str:
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, edit))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _set(path: str, value):
    """An edit that sets params[a][b]... = value."""
    *head, last = path.split(".")

    def edit(p):
        for k in head:
            p = p[k]
        p[last] = value
    return edit


# Every numeric (and bounded) param: a value just outside its valid range is refused in one line naming the key,
# the range and the value. (skew_lambda 1 makes both skewed KLs identically 0; float16 turns the weights NaN.)
OUT_OF_RANGE = [
    ("vanilla.divergence.skew_lambda", 1.0, "less than 1"),
    ("dskd.divergence.skew_lambda", -0.1, "greater than or equal to 0"),
    ("vanilla.divergence.akl_alpha", 1.5, "less than or equal to 1"),
    ("dskd.divergence.akl_alpha", -0.5, "greater than or equal to 0"),
    ("vanilla.divergence.temperature", 0.0, "greater than 0"), ("dskd.divergence.temperature", -1.0, "greater than 0"),
    ("kd.kd_rate", 1.5, "less than or equal to 1"), ("kd.kd_rate", -0.1, "greater than or equal to 0"),
    ("dskd.projector_lr", 0.0, "greater than 0"), ("uld.weight", 0.0, "greater than 0"),
    ("teacher_cache.top_k", 0, "greater than or equal to 1"),
    ("profiles.tiny.train.lr", 0.0, "greater than 0"), ("profiles.tiny.train.epochs", 0, "greater than 0"),
    ("profiles.tiny.train.batch_size", 0, "greater than or equal to 1"),
    ("profiles.tiny.train.grad_accum", 0, "greater than or equal to 1"),
    ("profiles.tiny.train.lora_r", 0, "greater than or equal to 1"),
    ("profiles.tiny.train.lora_alpha", 0, "greater than 0"),
    ("profiles.tiny.train.save_steps", 0, "greater than or equal to 1"),
    ("profiles.tiny.train.max_length", 8, "greater than or equal to 16"),
    ("profiles.tiny.generate.batch_size", 0, "greater than or equal to 1"),
    ("profiles.tiny.generate.max_new_tokens", 0, "greater than or equal to 1"),
    ("profiles.tiny.dtype", "float16", "Input should be 'float32' or 'bfloat16'"),
    ("sft.lora_dropout", 1.0, "less than 1"), ("sft.weight_decay", -0.01, "greater than or equal to 0"),
    ("sft.max_grad_norm", 0.0, "greater than 0"), ("sft.lr_scheduler", "cosin", "Input should be 'linear'"),
    ("base_models.pretrain_lr", 0.0, "greater than 0"), ("base_models.pretrain_batch", 0, "greater than or equal to 1"),
    ("base_models.pretrain_steps.student", 0, "greater than or equal to 1"),
    ("base_models.threads", 0, "greater than or equal to 1"),
    ("generate.temperature", 0.0, "greater than 0"), ("generate.top_p", 1.5, "less than or equal to 1"),
    ("generate.top_p", 0.0, "greater than 0"),
    ("profiles.tiny.eval.max_items", 0, "greater than or equal to 1"),
    ("profiles.tiny.eval.max_samples", 0, "greater than or equal to 1"),
    ("eval_llm.max_retries", -1, "greater than or equal to 0"), ("eval_llm.timeout_s", 0, "greater than 0"),
    ("profiles.tiny.eval.max_chars", 4, "greater than or equal to 8"),
    ("stats.alpha", 1.0, "less than 1"), ("stats.alpha", 0.0, "greater than 0"),
    ("stats.bootstrap_resamples", 10, "greater than or equal to 100"),
    ("data.max_train", 0, "greater than or equal to 1"), ("seed", -1, "greater than or equal to 0"),
    ("split.seed", -1, "greater than or equal to 0"),
]


@pytest.mark.parametrize("key, value, rule", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE])
def test_out_of_range_value_is_refused_naming_key_range_and_value(tmp_path, key, value, rule):
    msg = _one_line(tmp_path, _set(key, value))
    assert msg.startswith(f"{tmp_path / 'params.yaml'}: {key}: "), msg
    assert rule in msg and msg.endswith(f"got {value!r}"), msg


@pytest.mark.parametrize("key, value", [("vanilla.divergence.skew_lambda", 0.0), ("dskd.divergence.skew_lambda", 0.999),
                                        ("vanilla.divergence.akl_alpha", 0.0), ("dskd.divergence.akl_alpha", 1.0),
                                        ("kd.kd_rate", 0.0),
                                        ("kd.kd_rate", 1.0), ("sft.lora_dropout", 0.0), ("generate.top_p", 1.0)])
def test_range_ends_that_are_valid_are_accepted(tmp_path, key, value):
    load_params(_write(tmp_path, _set(key, value)))


@pytest.mark.parametrize("fractions, bad", [({"train": 1.2, "validation": -0.2, "test": 0.0}, "train 1.2"),
                                            ({"train": 0.9, "validation": 0.1, "test": 0.0}, "test 0.0")])
def test_split_fractions_must_each_be_in_range(tmp_path, fractions, bad):
    msg = _one_line(tmp_path, _set("split.fractions", fractions))
    assert "split.fractions" in msg and bad in msg, msg


@pytest.mark.parametrize("arch, rule", [({"heads": 3}, "heads 3 must divide hidden 256"),
                                        ({"kv_heads": 3}, "kv_heads 3 must divide heads 4")])
def test_architecture_heads_must_divide(tmp_path, arch, rule):
    msg = _one_line(tmp_path, lambda p: p["profiles"]["tiny"]["architectures"]["llama"].update(arch))
    assert "profiles.tiny.architectures.llama" in msg and rule in msg, msg


def test_each_algorithm_has_its_own_divergence_uld_has_none():
    """Vanilla KD and DSKD each hold their divergence (the same defaults: H_Alg compares them at equal settings);
    kd.* holds only what every cell shares; ULD's section holds only what ULD reads."""
    p = load_params(ROOT / "params.yaml")
    assert set(p.kd.model_dump()) == {"alg", "versus", "kd_rate", "use_cache"}
    assert p.vanilla.divergence == p.dskd.divergence
    assert p.vanilla.divergence.model_dump() == {"kind": "forward_kl", "temperature": 2.0, "skew_lambda": 0.1,
                                                 "akl_alpha": 0.5}
    assert set(p.vanilla.model_dump()) == {"divergence", "vocab_mismatch"}
    assert set(p.uld.model_dump()) == {"weight"}


# params.yaml is read with DVC's rules (ruamel.yaml typ="safe", YAML 1.2): the value `dvc exp run -S` writes is the
# value DVC hashes and the value the stage gets. PyYAML (YAML 1.1) reads several of them differently (right column).
YAML_12 = [
    ("off", "off", False), ("on", "on", True), ("yes", "yes", True), ("no", "no", False), ("Off", "Off", False),
    ("NO", "NO", False), ("y", "y", "y"), ("n", "n", "n"),
    ("010", 10, 8), ("08", 8, "08"), ("0o10", 8, "0o10"), ("0x10", 16, 16), ("1_000", 1000, 1000),
    ("1e3", 1000.0, "1e3"), ("1.0e3", 1000.0, "1.0e3"), ("1.0e-3", 0.001, 0.001), ("1:20", "1:20", 80),
    ("~", None, None), ("null", None, None), ("true", True, True),
]


@pytest.mark.parametrize("text, dvc_value, pyyaml_value", YAML_12, ids=[t for t, *_ in YAML_12])
def test_params_are_read_with_dvcs_yaml_rules(tmp_path, text, dvc_value, pyyaml_value):
    from dvc.utils.serialize import parse_yaml

    from telekd.params import read_yaml

    f = tmp_path / "x.yaml"
    f.write_text(f"a: {text}\n")
    ours, dvcs = read_yaml(f)["a"], parse_yaml(f.read_text(), str(f))["a"]
    assert ours == dvc_value and type(ours) is type(dvc_value) and dvcs == ours and type(dvcs) is type(ours)
    assert yaml.safe_load(f.read_text())["a"] == pyyaml_value  # what a YAML 1.1 reader would have made of it


def test_no_answer_text_off_as_dvc_writes_it_is_the_string_off(tmp_path):
    """`dvc exp run -S data.no_answer_text=off` writes `no_answer_text: off` (unquoted)."""
    text = (ROOT / "params.yaml").read_text().replace("no_answer_text: unanswerable", "no_answer_text: off")
    assert "no_answer_text: off" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").data.no_answer_text == "off"


def test_checkpoint_interval_is_sized_per_profile():
    """KD's paper-scale state is 6.6 GB and SFT's 7.7 GB: the paper profile saves every 100 optimizer steps, not 10/20."""
    p = load_params(ROOT / "params.yaml")
    assert p.profiles["tiny"].train.save_steps == 20 and p.profiles["paper"].train.save_steps == 100
    assert "save_steps" not in p.kd.model_dump() and "eval_steps" not in p.sft.model_dump()


def test_top_k_beyond_the_vocabulary_is_refused(tmp_path):
    msg = _one_line(tmp_path, _set("teacher_cache.top_k", 4096))
    assert "teacher_cache.top_k 4096 exceeds the vocabulary (base_models.vocab_size 2048)" in msg
    load_params(_write(tmp_path, _set("teacher_cache.top_k", 2048)))  # k = V: the dense divergence


@pytest.mark.parametrize("edit, line", [
    (_set("generate.temperature", 0.7), "generate: temperature 0.7 / top_p 1.0 have no effect with do_sample false"),
    (_set("generate.top_p", 0.9), "generate: temperature 1.0 / top_p 0.9 have no effect with do_sample false"),
    (_set("teacher_cache.hidden", False), "teacher_cache.hidden: false, but DSKD (kd.alg / kd.versus) needs"),
])
def test_settings_that_would_silently_do_nothing_are_refused(tmp_path, edit, line):
    assert line in _one_line(tmp_path, edit)


def test_sampling_knobs_are_accepted_with_sampling_and_hidden_off_without_dskd(tmp_path):
    load_params(_write(tmp_path, lambda p: p["generate"].update(do_sample=True, temperature=0.7, top_p=0.9)))
    load_params(_write(tmp_path, lambda p: (p["teacher_cache"].update(hidden=False),
                                            p["kd"].update(alg="vanilla", versus="uld"))))
