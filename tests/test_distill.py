"""Cross-tokenizer alignment, the teacher cache and the vanilla KD loop."""

import torch

from telekd.align import same_vocab, vocab_map
from telekd.cache import compute_targets, load_targets, save_targets
from telekd.kd.dskd import cma_term, make_projectors
from telekd.kd.loop import KDConfig, train_kd
from telekd.kd.vanilla import vanilla_term
from telekd.losses import Divergence, divergence
from telekd.prompts import build_example
from telekd.teacher_inputs import build_pairs, live_term

SYSTEM = "Answer from the context."


def _pairs(tokenizers, records, teacher="llama"):
    s_tok, t_tok = tokenizers["llama"], tokenizers[teacher]
    exs = [build_example(s_tok, r, SYSTEM, 600, 500) for r in records]
    return exs, build_pairs(exs, records, s_tok, t_tok, SYSTEM, 600, 500)


def test_identical_tokenizers_align_every_answer_token(tokenizers, sample_records):
    tok = tokenizers["llama"]
    s_map, t_map = vocab_map(tok, tok)
    assert same_vocab(tok, tok) and torch.equal(s_map, t_map) and len(s_map) == len(tok)
    exs, pairs = _pairs(tokenizers, sample_records[:8])
    for s_ex, t_ex, aligned in pairs:
        n = len(s_ex.input_ids) - s_ex.prompt_len
        assert aligned == [(s_ex.prompt_len + j - 1, t_ex.prompt_len + j - 1) for j in range(n)]


def test_different_tokenizers_align_equal_spans_only(tokenizers, sample_records):
    s_tok, t_tok = tokenizers["llama"], tokenizers["mistral"]
    assert not same_vocab(s_tok, t_tok)
    s_map, t_map = vocab_map(s_tok, t_tok)
    s_strings, t_strings = s_tok.convert_ids_to_tokens(s_map.tolist()), t_tok.convert_ids_to_tokens(t_map.tolist())
    assert s_strings == t_strings and len(s_map) < len(s_tok)
    exs, pairs = _pairs(tokenizers, sample_records[:20], teacher="mistral")
    total = sum(len(s.input_ids) - s.prompt_len for s, _, _ in pairs)
    aligned = sum(len(a) for _, _, a in pairs)
    assert 0.5 < aligned / total < 1.0
    for s_ex, t_ex, pos in pairs:
        for sp, tp in pos:  # the tokens predicted at paired positions decode to the same text
            assert s_tok.decode([s_ex.input_ids[sp + 1]]) == t_tok.decode([t_ex.input_ids[tp + 1]])
    # the teacher saw the same text in its own template
    assert all(s.context == t.context and s.completion == t.completion for s, t, _ in pairs)


def test_cached_full_vocabulary_targets_equal_the_live_teacher(tokenizers, sample_records, tmp_path):
    from conftest import tiny_model

    tok = tokenizers["llama"]
    teacher = tiny_model("llama", len(tok), hidden=48)
    exs, pairs = _pairs(tokenizers, sample_records[:6])
    s_map, t_map = vocab_map(tok, tok)
    live = compute_targets(teacher, pairs, s_map, t_map, top_k=len(tok), batch_size=3, pad_id=tok.pad_token_id,
                           temperature=2.0)
    key = {"test": 1}
    save_targets(live, "vanilla", key, tmp_path)
    cached = load_targets(tmp_path, key)
    # k = V: the cached top-k form gives the dense teacher's divergence
    student = tiny_model("llama", len(tok), hidden=32, seed=1)
    batch_logits = [student(input_ids=torch.tensor([s.input_ids])).logits[0] for s in exs]
    with torch.no_grad():
        t_logits = [teacher(input_ids=torch.tensor([t.input_ids])).logits[0] for _, t, _ in pairs]
    from telekd.losses import divergence_topk

    for i, (s_ex, t_ex, aligned) in enumerate(pairs):
        rows = cached.rows(i)
        s_pos = torch.tensor([a for a, _ in aligned])
        t_pos = torch.tensor([b for _, b in aligned])
        mask = torch.ones(len(aligned), dtype=torch.bool)
        dense = divergence(Divergence("forward_kl", 2.0), batch_logits[i][s_pos], t_logits[i][t_pos], mask)
        sparse = divergence_topk(Divergence("forward_kl", 2.0), batch_logits[i][cached.student_pos[rows]],
                                 cached.logprobs[rows], cached.ids[rows], mask, teacher_rest_logprob=cached.rest[rows])
        assert torch.allclose(dense, sparse, atol=1e-5)


def test_corrupted_cache_entry_is_refused(tokenizers, sample_records, tmp_path):
    import pytest

    from conftest import tiny_model
    from telekd.cache import TARGETS, CacheError, key_digest

    tok = tokenizers["llama"]
    exs, pairs = _pairs(tokenizers, sample_records[:2])
    s_map, t_map = vocab_map(tok, tok)
    save_targets(compute_targets(tiny_model("llama", len(tok)), pairs, s_map, t_map, 8, 2, tok.pad_token_id,
                                 temperature=1.0), "vanilla", {"k": 1}, tmp_path)
    f = tmp_path / key_digest({"k": 1}) / TARGETS
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="hash mismatch"):
        load_targets(tmp_path, {"k": 1})
    with pytest.raises(CacheError, match="no teacher cache entry"):
        load_targets(tmp_path, {"k": 2})


def test_two_kd_steps_change_the_student_not_the_teacher(tokenizers, sample_records):
    from conftest import tiny_model

    tok = tokenizers["mistral"]
    s_tok = tokenizers["llama"]
    teacher = tiny_model("mistral", len(tok), hidden=48)
    student = tiny_model("llama", len(s_tok), hidden=32, seed=1)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    exs, pairs = _pairs(tokenizers, sample_records[:4], teacher="mistral")
    s_map, t_map = vocab_map(s_tok, tok)
    targets = compute_targets(teacher, pairs, s_map, t_map, top_k=32, batch_size=2, pad_id=tok.pad_token_id,
                              temperature=2.0)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 2.0, 0.1, 0.5), epochs=1,
                   lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0, seed=0)
    out = train_kd(student, exs, s, s_tok.pad_token_id, vanilla_term(targets, pairs, s.divergence))
    assert out["metrics"]["steps"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in out["log"])
    assert any(not torch.equal(s_before[k], v) for k, v in out["model"].state_dict().items())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_lora_student_is_merged_back(tokenizers, sample_records):
    from conftest import tiny_model

    tok = tokenizers["llama"]
    teacher, student = tiny_model("llama", len(tok), hidden=48), tiny_model("llama", len(tok), hidden=32, seed=1)
    exs, pairs = _pairs(tokenizers, sample_records[:4])
    s_map, t_map = vocab_map(tok, tok)
    targets = compute_targets(teacher, pairs, s_map, t_map, top_k=16, batch_size=2, pad_id=tok.pad_token_id,
                              temperature=1.0)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("reverse_kl", 1.0, 0.1, 0.5), epochs=1,
                   lr=1e-2, batch_size=2, grad_accum=2, max_grad_norm=1.0, weight_decay=0.0, seed=0,
                   student_lora=True, lora_r=4, lora_alpha=8, lora_targets=("q_proj", "v_proj"))
    out = train_kd(student, exs, s, tok.pad_token_id, vanilla_term(targets, pairs, s.divergence), val_examples=exs[:2])
    names = [n for n, _ in out["model"].named_parameters()]
    assert not any("lora" in n for n in names)
    assert out["metrics"]["val_ce_after"] is not None


def test_dskd_with_cross_model_attention_trains_student_and_projectors(tokenizers, sample_records):
    from conftest import tiny_model

    t_tok, s_tok = tokenizers["mistral"], tokenizers["llama"]
    teacher = tiny_model("mistral", len(t_tok), hidden=48).requires_grad_(False)
    student = tiny_model("llama", len(s_tok), hidden=32, seed=1)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    exs, pairs = _pairs(tokenizers, sample_records[:4], teacher="mistral")
    s_map, t_map = vocab_map(s_tok, t_tok)
    proj = make_projectors(32, 48, cma=True)
    p_before = {k: v.clone() for k, v in proj.state_dict().items()}
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 1.0, 0.1, 0.5), epochs=1,
                   lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0, seed=0)
    heads = (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    embeds = (student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    make = lambda tg, ps: cma_term(tg, ps, proj, *embeds, *heads, s.divergence)  # noqa: E731
    term = live_term(teacher, pairs, s_map, t_map, top_k=len(t_tok), pad_id=t_tok.pad_token_id, make_term=make,
                     hidden=True, temperature=1.0)
    out = train_kd(student, exs, s, s_tok.pad_token_id, term, extra_modules=proj, projector_lr=1e-3)
    assert out["metrics"]["steps"] == 2 and term.examples == 4
    assert {"ce_t2s", "kd_stu", "kd_tea", "t2s_acc"} <= set(out["log"][0])
    assert any(not torch.equal(s_before[k], v) for k, v in out["model"].state_dict().items())
    assert all(not torch.equal(p_before[k], v) for k, v in proj.state_dict().items())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())


def test_uld_trains_across_vocabularies_without_projectors(tokenizers, sample_records):
    from conftest import tiny_model
    from telekd.kd.uld import uld_term

    t_tok, s_tok = tokenizers["mistral"], tokenizers["llama"]
    teacher = tiny_model("mistral", len(t_tok), hidden=48)
    student = tiny_model("llama", len(s_tok), hidden=32, seed=1)
    exs, pairs = _pairs(tokenizers, sample_records[:4], teacher="mistral")
    s_map, t_map = vocab_map(s_tok, t_tok)
    targets = compute_targets(teacher, pairs, s_map, t_map, top_k=len(t_tok), batch_size=2, pad_id=t_tok.pad_token_id,
                              hidden=False, temperature=1.0)
    assert targets.hidden is None and int(targets.t_offsets[-1]) == sum(len(t.input_ids) - t.prompt_len for _, t, _ in pairs)
    s = KDConfig(kd_rate=0.5, divergence=Divergence("forward_kl", 1.0, 0.1, 0.5), epochs=1,
                   lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0, seed=0)
    out = train_kd(student, exs, s, s_tok.pad_token_id, uld_term(targets, pairs, weight=1.0))
    assert out["metrics"]["steps"] == 2 and all(0 <= r["kd"] <= 2 for r in out["log"])


def test_non_finite_loss_stops_kd_in_one_line_and_keeps_the_last_good_checkpoint(tokenizers, sample_records, tmp_path):
    """A term that turns NaN at batch 3 (after checkpoints at steps 1 and 2) stops the loop before the optimizer
    applies it: the error names the run, the batch and the likely cause, and the checkpoint is step 2's, finite."""
    import pytest

    from conftest import tiny_model
    from telekd.checkpoint import Checkpoint, NonFinite

    tok = tokenizers["llama"]
    student = tiny_model("llama", len(tok), hidden=32, seed=1)
    exs, _ = _pairs(tokenizers, sample_records[:8])
    s = KDConfig(kd_rate=0.5, epochs=1, lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0,
                   seed=0)
    calls = []

    def term(logits, hidden, batch, idx):
        calls.append(1)
        kd = logits.float().logsumexp(-1).mean() * 0
        return (kd + float("nan")) if len(calls) == 3 else kd, {}

    ckpt = Checkpoint(tmp_path / "ck", "fp", save_steps=1)
    with pytest.raises(NonFinite) as e:
        train_kd(student, exs, s, tok.pad_token_id, term, desc="llama-base-base-vanilla-s0", checkpoint=ckpt)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llama-base-base-vanilla-s0: the loss is nan at batch 3/4 (optimizer step 3)")
    assert "learning rate" in msg and f"last good checkpoint kept: {ckpt.file}" in msg
    saved = ckpt.load()
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["student"].values())
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the NaN never reached the weights


def test_non_finite_gradient_stops_kd_before_the_step(tokenizers, sample_records):
    import pytest

    from conftest import tiny_model
    from telekd.checkpoint import NonFinite

    tok = tokenizers["llama"]
    student = tiny_model("llama", len(tok), hidden=32, seed=1)
    exs, _ = _pairs(tokenizers, sample_records[:4])
    s = KDConfig(kd_rate=0.5, epochs=1, lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0,
                   seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    def term(logits, hidden, batch, idx):  # finite value, infinite gradient: sqrt'(0) = inf
        return torch.sqrt(logits.float().sum() * 0), {}

    with pytest.raises(NonFinite, match=r"^kd: the gradient norm is (nan|inf) at batch 1/2 .*nothing was saved$"):
        train_kd(student, exs, s, tok.pad_token_id, term)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_pretraining_stops_at_a_non_finite_loss(tokenizers, sample_records):
    import pytest

    from conftest import tiny_model
    from telekd.checkpoint import NonFinite
    from telekd.zoo import pretrain

    tok = tokenizers["llama"]
    model = tiny_model("llama", len(tok), hidden=32, seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("inf")
    with pytest.raises(NonFinite, match=r"^pretrain student: the loss is nan at step 1/3"):
        pretrain(model, tok, [r.context for r in sample_records[:4]], steps=3, lr=1e-3, batch=2, seq_len=32, seed=0,
                 desc="pretrain student")


def test_lora_kd_checkpoint_holds_the_adapter_and_its_optimizer_state_only(tokenizers, sample_records, tmp_path):
    """A checkpoint of a LoRA student is the adapter (not the frozen base weights) and AdamW's state of it; one file,
    replaced at each save."""
    from conftest import tiny_model
    from telekd.checkpoint import Checkpoint

    tok = tokenizers["llama"]
    student = tiny_model("llama", len(tok), hidden=32, seed=1)
    n_base = sum(p.numel() for p in student.parameters())
    exs, _ = _pairs(tokenizers, sample_records[:6])
    s = KDConfig(kd_rate=0.0, epochs=1, lr=1e-2, batch_size=2, grad_accum=1, max_grad_norm=1.0, weight_decay=0.0,
                   seed=0, student_lora=True, lora_r=2, lora_alpha=4, lora_targets=("q_proj", "v_proj"))
    term = lambda logits, hidden, batch, idx: (logits.sum() * 0, {})  # noqa: E731
    ckpt = Checkpoint(tmp_path / "ck", "fp", save_steps=1)
    train_kd(student, exs, s, tok.pad_token_id, term, checkpoint=ckpt)
    saved = ckpt.load()
    assert saved["step"] == 2 and list(ckpt.dir.iterdir()) == [ckpt.file]  # the latest only
    assert saved["student"] and all("lora_" in k for k in saved["student"])
    n_saved = sum(v.numel() for v in saved["student"].values())
    assert n_saved < n_base / 10
    states = saved["opt"]["state"]
    assert len(states) == len(saved["student"])
    assert sum(v["exp_avg"].numel() + v["exp_avg_sq"].numel() for v in states.values()) == 2 * n_saved


def test_weights_that_overflow_are_never_checkpointed(tokenizers, sample_records, tmp_path):
    """An infinite learning rate: loss and gradients are finite, the updated weights are not. The save of that step
    is refused in one line (a good checkpoint is never replaced by non-finite weights)."""
    import pytest

    from conftest import tiny_model
    from telekd.checkpoint import Checkpoint, NonFinite

    tok = tokenizers["llama"]
    student = tiny_model("llama", len(tok), hidden=32, seed=1)
    exs, _ = _pairs(tokenizers, sample_records[:6])
    s = KDConfig(kd_rate=0.0, epochs=1, lr=float("inf"), batch_size=2, grad_accum=1, max_grad_norm=1.0,
                   weight_decay=0.0, seed=0)
    term = lambda logits, hidden, batch, idx: (logits.sum() * 0, {})  # noqa: E731
    ckpt = Checkpoint(tmp_path / "ck", "fp", save_steps=1)
    with pytest.raises(NonFinite, match=r"^kd: the trained weights \(\d+ not finite\) is nan at optimizer step 1: .*"
                                        r"nothing was saved$"):
        train_kd(student, exs, s, tok.pad_token_id, term, checkpoint=ckpt)
    assert not ckpt.file.exists()
