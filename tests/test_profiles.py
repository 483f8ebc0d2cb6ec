"""`-S profile=paper` carries every setting that differs with scale: its data, the judge's sample count and bounds;
the report states what it ran with."""

import pytest
import yaml

from telekd.params import ParamsError, load_params


def _write(tmp_path, **changes):
    raw = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_paper_profile_refuses_the_toy_sample_as_data(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, profile="paper"))
    msg = str(e.value)
    assert "data.source data/sample/telequad-sample.json" in msg
    assert "-S profile=paper -S data.source=data/telequad/TeleQuAD-v4-full.json" in msg and "\n" not in msg


def test_paper_profile_judges_every_question_with_real_bounds(tmp_path):
    from telekd.judge import JudgeConfig

    p = load_params(_write(tmp_path, profile="paper", **{"data.source": "data/telequad/TeleQuAD-v4-full.json"}))
    cfg = JudgeConfig.from_params(p)
    assert (cfg.max_samples, cfg.max_chars, cfg.max_items) == (None, 400, 32)
    tiny = JudgeConfig.from_params(load_params("params.yaml"))
    assert (tiny.max_samples, tiny.max_chars, tiny.max_items) == (2, 16, 1)  # a smoke-test judge: cheap bounds


def test_judge_caps_are_no_longer_global_keys(tmp_path):
    with pytest.raises(ParamsError, match="eval_llm.max_samples"):
        load_params(_write(tmp_path, **{"eval_llm.max_samples": 5}))


def test_report_header_states_data_judge_and_counts():
    from telekd.report.sections import _judge_caps, _split_counts

    assert _split_counts({"questions": {"train": 2988, "validation": 424, "test": 850}}) == \
        "2988 train, 424 validation, 850 test questions"
    assert _judge_caps({"judge_max_samples": None, "judge_max_chars": 400, "judge_max_items": 32}) == (
        "every test question judged per run, answers bounded to 400 characters per string and 32 items per list")
    assert _judge_caps({"judge_max_samples": 2, "judge_max_chars": 48, "judge_max_items": 2}).startswith(
        "the first 2 test questions judged")


# --- profile small: real pretrained models, its own model names, a layer-pruned student ---

def _small(tmp_path, **changes):
    """params.yaml with profile small and `changes`, its key order kept (the fix names the models in that order)."""
    raw = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    for key, value in {"profile": "small", **changes}.items():
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node[k]
        node[last] = value
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f


def test_small_profile_needs_its_model_names_in_the_grid_in_one_line(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(_small(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "llama, mistral not a model of profile small (smollm2, gemma3, student)" in msg
    assert ("dvc exp run -S profile=small -S 'grid.teachers=[smollm2,gemma3]' "
            "-S 'sft.models=[smollm2,gemma3,student]'") in msg


def test_small_profile_loads_with_its_grid(tmp_path):
    p = load_params(_small(tmp_path, **{"grid.teachers": ["smollm2", "gemma3"],
                                        "sft.models": ["smollm2", "gemma3", "student"]}))
    m = p.active.models
    assert (m["smollm2"].pretrained, m["gemma3"].pretrained) == ("smollm2-135m-instruct", "gemma-3-270m")
    assert (m["student"].pretrained, m["student"].keep_layers) == ("smollm2-135m-instruct", 24)
    assert (m["student"].heal.steps, m["student"].heal.lr, m["student"].heal.objective) == (60, 3.0e-4, "kd")
    assert not p.active.student_kd.lora   # full-weight KD: LoRA r 16 leaves the student empty-handed (params.yaml)
    assert set(p.active.pretrained) == {"smollm2-135m-instruct", "gemma-3-270m"}
    assert load_params("params.yaml").active.pretrained == []   # tiny converts nothing


@pytest.mark.parametrize("changes, match", [
    ({"profiles.small.pretrained": ["gemma-3-270m"]}, "models use pretrained smollm2-135m-instruct"),
    ({"profiles.small.models.gemma3": {"pretrained": "gemma-9b"}}, "gemma-9b"),
    ({"profiles.small.models.gemma3": {"hub": "google/gemma-3-270m", "revision": "abc", "pretrained": "gemma-3-270m"}},
     "exactly one of build, path, hub or pretrained"),
    ({"profiles.small.models.gemma3": {"hub": "google/gemma-3-270m", "revision": "abc", "keep_layers": 4}},
     "keep_layers prunes a pretrained model"),
    ({"profiles.small.models.student": {"pretrained": "smollm2-135m-instruct", "keep_layers": 1}}, "keep_layers"),
    ({"profiles.small.models.gemma3": {"pretrained": "gemma-3-270m", "heal": {"steps": 1, "lr": 1.0, "batch": 1,
                                                                            "seq_len": 16}}}, "heal retrains a layer-pruned"),
    ({"grid.teachers": ["smol-lm2"]}, "grid.teachers.0"),   # "-" would break the cell names
])
def test_small_profile_bad_model_settings_fail_in_params(tmp_path, changes, match):
    ok = {"grid.teachers": ["smollm2", "gemma3"], "sft.models": ["smollm2", "gemma3", "student"]}
    with pytest.raises(ParamsError, match=match):
        load_params(_small(tmp_path, **{**ok, **changes}))


def test_kept_layers_evenly_spaced_first_and_last():
    from telekd.zoo import kept_layers

    # round(i * 29 / 9) for i = 0..9: 0, 3.22, 6.44, 9.67, 12.89, 16.11, 19.33, 22.56, 25.78, 29
    assert kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    # round(i * 29 / 7): 0, 4.14, 8.29, 12.43, 16.57, 20.71, 24.86, 29
    assert kept_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    # round(i * 29 / 23) for i = 0..23 (the small profile's student): 2, 7, 12, 17, 22, 27 dropped (README's list)
    assert sorted(set(range(30)) - set(kept_layers(30, 24))) == [2, 7, 12, 17, 22, 27]
    assert kept_layers(4, 4) == [0, 1, 2, 3] and kept_layers(5, 3) == [0, 2, 4]   # 2 / 2 = 1 exactly: no rounding
    with pytest.raises(ValueError, match=r"keep_layers 31: must be in \[2, 30\]"):
        kept_layers(30, 31)


def test_pruned_student_holds_the_kept_layers_and_computes_as_them():
    import torch

    from conftest import tiny_model
    from telekd.zoo import prune_layers

    src = tiny_model("llama", 64, hidden=32, layers=5)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    keep = [0, 2, 4]
    pruned = prune_layers(src, keep)
    assert pruned.config.num_hidden_layers == 3 and src.config.num_hidden_layers == 5
    for j, i in enumerate(keep):
        for (n_p, p), (n_s, s) in zip(pruned.model.layers[j].named_parameters(), src.model.layers[i].named_parameters()):
            assert n_p == n_s and torch.equal(p, s)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(pruned.state_dict()[name], src.state_dict()[name])
    assert all(torch.equal(v, before[k]) for k, v in src.state_dict().items())   # the source is unchanged
    # the same function: the source model run through layers 0, 2, 4 only
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want = pruned(input_ids=ids).logits
        src.model.layers = torch.nn.ModuleList([src.model.layers[i] for i in keep])
        src.config.num_hidden_layers = 3
        for j, layer in enumerate(src.model.layers):
            layer.self_attn.layer_idx = j
        assert torch.equal(src(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="distinct indices"):
        prune_layers(pruned, [0, 0])


@pytest.mark.parametrize("objective", ["kd", "lm"])
def test_build_pretrained_copies_teachers_and_prunes_then_heals_the_student(tmp_path, tokenizers, sample_records,
                                                                            objective, monkeypatch):
    """base_models for the small profile on a 3-layer stand-in for the converted SmolLM2 checkpoint; the heal
    distils from the unpruned model (objective kd, the default) or trains on the text alone (lm)."""
    from types import SimpleNamespace as NS

    import torch
    from safetensors.torch import load_file

    from conftest import tiny_model
    from telekd import zoo
    from telekd.params import Heal, ModelSource
    from telekd.zoo import build_pretrained

    src = tmp_path / "pretrained" / "smollm2-135m-instruct"
    tiny_model("llama", len(tokenizers["llama"]), layers=3).save_pretrained(src, safe_serialization=True)
    tokenizers["llama"].save_pretrained(src)
    teachers, real = [], zoo.pretrain
    monkeypatch.setattr(zoo, "pretrain", lambda *a, teacher=None, **k: teachers.append(teacher) or real(
        *a, teacher=teacher, **k))
    heal = Heal(steps=2, lr=1e-3, batch=2, seq_len=16, **({} if objective == "kd" else {"objective": "lm"}))
    models = {"smollm2": ModelSource(pretrained="smollm2-135m-instruct", chat_template="own"),
              "student": ModelSource(pretrained="smollm2-135m-instruct", keep_layers=2, heal=heal, chat_template="mistral")}
    params = NS(active=NS(models=models), models=NS(trust_remote_code=False), base_models=NS(threads=1), seed=0)
    contexts = list(dict.fromkeys(r.context for r in sample_records))[:8]
    summary = build_pretrained(params, tmp_path / "pretrained", tmp_path / "base", contexts)["models"]

    assert (tmp_path / "base/smollm2/model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert summary["smollm2"]["layers"] == 3 and "kept_layers" not in summary["smollm2"]
    s = summary["student"]
    assert (s["layers"], s["kept_layers"], s["pretrained"]) == (2, [0, 2], "smollm2-135m-instruct")
    assert s["heal_loss_first"] != s["heal_loss_last"]
    if objective == "kd":   # the teacher is the whole source model
        assert [t.config.num_hidden_layers for t in teachers] == [3]
    else:
        assert teachers == [None]
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "base/student/model.safetensors")
    assert set(after) == {k for k in before if not k.startswith("model.layers.2.")}   # layers 0, 2 -> 0, 1
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.2.mlp.up_proj.weight"])  # healed
    from telekd.models import load_tokenizer
    assert "[INST]" in load_tokenizer(str(tmp_path / "base/student")).chat_template   # its own template: mistral
