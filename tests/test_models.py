"""Model loading (safetensors only, local or hub pointer) and the tiny zoo."""

import json

import pytest

from telekd.models import ModelLoadError, load_model, load_tokenizer


def test_base_models_load_and_generate(saved_models, sample_records):
    from telekd.generation import generate_answers

    for role, path in saved_models.items():
        model, tok = load_model(str(path))
        rows = generate_answers(model, tok, sample_records[:5], "Answer.", max_prompt_length=400, max_new_tokens=4,
                                batch_size=2)
        assert [r["id"] for r in rows] == [r.id for r in sample_records[:5]]
        assert all(isinstance(r["prediction"], str) and r["references"] for r in rows)


def test_batched_generation_equals_one_at_a_time(saved_models, sample_records):
    from telekd.generation import generate_answers

    model, tok = load_model(str(saved_models["llama"]))
    recs = sample_records[:4]
    batched = generate_answers(model, tok, recs, "Answer.", 400, 6, batch_size=4)
    single = generate_answers(model, tok, recs, "Answer.", 400, 6, batch_size=1)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]


def test_folder_without_safetensors_is_refused(tmp_path, saved_models):
    import shutil

    bad = tmp_path / "nobin"
    shutil.copytree(saved_models["student"], bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(bad))


def test_hub_id_needs_a_revision_and_paths_must_exist():
    with pytest.raises(ModelLoadError, match="revision"):
        load_model("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model("./no/such/folder")


def test_hub_pointer_is_followed(tmp_path):
    (tmp_path / "hub.json").write_text(json.dumps({"hub": "org/model", "revision": "abc", "chat_template": "llama2"}))
    from telekd.models import _resolve

    assert _resolve(str(tmp_path), None) == ("org/model", "abc", "llama2")


def test_tokenizers_share_most_strings_but_not_merges(tokenizers):
    from telekd.zoo import vocab_overlap

    a, b = tokenizers["llama"], tokenizers["mistral"]
    assert len(a) == len(b)
    assert 0.6 < vocab_overlap(a, b) < 1.0
    assert a.get_vocab() != b.get_vocab()


def test_pretraining_lowers_the_loss(tokenizers, sample_records):
    from conftest import tiny_model
    from telekd.zoo import pretrain

    tok = tokenizers["llama"]
    model = tiny_model("llama", len(tok))
    contexts = list(dict.fromkeys(r.context for r in sample_records))[:10]
    losses = pretrain(model, tok, contexts, steps=30, lr=3e-3, batch=4, seq_len=64, seed=0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_healing_by_distillation_is_the_forward_kl_to_the_teacher(tokenizers, sample_records):
    """heal.objective kd: step 1's loss is KL(teacher || model) of the first window batch by hand (sum over the
    vocabulary, mean over positions); 0 for a copy of the teacher; it falls as the model learns the teacher."""
    import copy
    import random

    import torch
    from conftest import tiny_model
    from telekd.zoo import pretrain

    tok = tokenizers["llama"]
    teacher, model = tiny_model("llama", len(tok)), tiny_model("llama", len(tok), seed=1)
    contexts = list(dict.fromkeys(r.context for r in sample_records))[:10]
    assert pretrain(copy.deepcopy(teacher), tok, contexts, steps=1, lr=1e-9, batch=2, seq_len=32, seed=0,
                    teacher=teacher) == [pytest.approx(0.0, abs=1e-6)]

    stream = []
    for t in contexts:
        stream += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rng = random.Random(0)
    x = torch.stack([torch.tensor(stream[s: s + 32]) for s in [rng.randrange(len(stream) - 33) for _ in range(2)]])
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=x).logits.double(), -1)
        q = torch.softmax(model(input_ids=x).logits.double(), -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean().item()
    losses = pretrain(model, tok, contexts, steps=30, lr=3e-3, batch=2, seq_len=32, seed=0, teacher=teacher)
    assert losses[0] == pytest.approx(by_hand, rel=1e-5)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_healing_refuses_a_teacher_on_another_vocabulary(tokenizers, sample_records):
    from conftest import tiny_model
    from telekd.zoo import pretrain

    tok = tokenizers["llama"]
    with pytest.raises(ValueError, match=r"heal teacher's vocabulary \(\d+\) differs from the model's"):
        pretrain(tiny_model("llama", len(tok)), tok, [r.context for r in sample_records[:4]], steps=1, lr=1e-3,
                 batch=2, seq_len=32, seed=0, teacher=tiny_model("llama", len(tok) + 8))


def test_trust_remote_code_is_off_by_default(saved_models, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*a, **k):
        seen["trust"] = k.get("trust_remote_code")
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(str(saved_models["student"]))
    assert seen["trust"] is False
