"""The paper models' real tokenizers (telekd.vocab), offline: reference ids, and the properties the study relies on."""

import pytest

from telekd import vocab

try:
    vocab.llama_gguf_file(), vocab.mistral_model_file()
except vocab.VocabMissing as e:  # make setup installs them; say so instead of failing obscurely
    pytest.skip(f"paper vocabularies not installed: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def llama():
    return vocab.load("llama2")


@pytest.fixture(scope="module")
def mistral():
    return vocab.load("mistral")


def test_llama_reproduces_llama_cpp_reference_ids(llama):
    cases = vocab.reference_cases()
    assert len(cases) == 46
    wrong = [(t, ids) for t, ids in cases if llama(t, add_special_tokens=False)["input_ids"] != ids]
    assert wrong == []


@pytest.mark.parametrize("text, ids", [
    (" Hello world", [29871, 15043, 3186]),   # a leading space keeps its own '▁' (transformers' GGUF path drops it)
    ("  ", [1678]),                          # whitespace-only pieces
    ("\t\n", [29871, 12, 13]),
    ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378]),  # digits split, '½' a piece
])
def test_llama_leading_space_and_digit_cases(llama, text, ids):
    assert dict(vocab.reference_cases())[text] == ids   # the reference file says so
    assert llama(text, add_special_tokens=False)["input_ids"] == ids


def test_digits_split_and_byte_fallback(llama, mistral):
    for tok in (llama, mistral):
        pieces = tok.convert_ids_to_tokens(tok("2025", add_special_tokens=False)["input_ids"])
        assert pieces == ["▁", "2", "0", "2", "5"]
        # a character outside the vocabulary falls back to its UTF-8 bytes (🦙 = F0 9F A6 99)
        pieces = tok.convert_ids_to_tokens(tok("🦙", add_special_tokens=False)["input_ids"])
        assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def test_mistral_matches_sentencepiece_and_special_ids(mistral, llama):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab.mistral_model_file()))
    for text, _ in vocab.reference_cases():
        assert mistral(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    for tok in (llama, mistral):
        assert len(tok) == 32000
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        # the study tokenizes chat-template text without added specials: the template's "<s>" is the BOS id
        text = tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False)["input_ids"][0] == 1
    assert llama.get_vocab() != mistral.get_vocab()


def test_missing_gguf_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TELEKD_VOCAB_DIR", str(tmp_path))
    with pytest.raises(vocab.VocabMissing, match="make setup"):
        vocab.llama_gguf_file()


def _tiny(cls_name: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_name)(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32000)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("teacher", ["llama2", "mistral"])
def test_vanilla_and_dskd_terms_run_on_real_tokenizations(teacher, llama, mistral):
    """Real Llama-2 / Mistral tokenizations of sample TeleQuAD records; tiny random models at the real
    vocabulary size: the cache, vanilla KD (through the alignment) and DSKD / CMA give finite losses and
    gradients to the student."""
    import math
    from pathlib import Path

    import torch

    from telekd.align import vocab_map
    from telekd.cache import compute_targets
    from telekd.data import load_records
    from telekd.kd.dskd import cma_term, dskd_term, make_projectors
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.teacher_inputs import build_pairs
    from telekd.examples import tokenized
    from telekd.prompts import collate

    records = load_records(Path(__file__).resolve().parents[1] / "data/sample/telequad-sample.json").records[:3]
    s_tok, t_tok = llama, {"llama2": llama, "mistral": mistral}[teacher]
    examples = tokenized(records, s_tok, "Answer.", 160, 128)
    pairs = build_pairs(examples, records, s_tok, t_tok, "Answer.", 160, 128)
    assert all(p[2] for p in pairs)                                  # some answer tokens align in every record
    s_map, t_map = vocab_map(s_tok, t_tok)
    t_model = _tiny("MistralConfig" if teacher == "mistral" else "LlamaConfig", 1)
    targets = compute_targets(t_model, pairs, s_map, t_map, 8, 2, t_tok.pad_token_id, temperature=2.0)
    kd = Divergence("forward_kl", 2.0, 0.1, 0.5)
    student = _tiny("LlamaConfig", 2)
    proj = make_projectors(16, 16, cma=teacher == "mistral")
    heads = (student.get_output_embeddings().weight, t_model.get_output_embeddings().weight)
    made = [vanilla_term(targets, pairs, kd)]
    if teacher == "mistral":
        embeds = (student.get_input_embeddings().weight, t_model.get_input_embeddings().weight)
        made.append(cma_term(targets, pairs, proj, *embeds, *heads, kd))
    else:
        made.append(dskd_term(targets, pairs, proj, *heads, kd))
    batch = collate(examples, s_tok.pad_token_id)
    for term in made:
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        loss, _ = term(out.logits, out.hidden_states[-1], batch, [0, 1, 2])
        assert math.isfinite(loss.item()) and loss.item() > 0
        student.zero_grad()
        loss.backward()   # (CMA's student-space term counts only where the random projector is right: often none)
        assert sum(float(q.grad.abs().sum()) for q in student.parameters() if q.grad is not None) > 0


def test_alignment_pairs_the_first_answer_token_behind_the_dummy_prefix(llama, mistral):
    """The first answer token of Llama-2 and Mistral starts in the dummy prefix ('▁▁' before a digit, '▁' before a
    word): two copies of one tokenizer pair every position, and the two vocabularies pair it too where it is the
    same (same start, same bytes), so an example does not lose its first answer token to vanilla KD."""
    from telekd.align import aligned_positions
    from telekd.data import QARecord
    from telekd.prompts import build_example

    ctx = "The UE reports the RSRP of 5 cells within ±3 dB."
    rec = QARecord(id="q", doc_id="d", source="", title="", context=ctx, question="How many cells?",
                   answers=("5 cells",), answer_starts=(ctx.index("5 cells"),), is_impossible=False)
    copy = vocab.load("llama2")  # the kd stage loads the student's and the teacher's tokenizer separately
    s_ex = build_example(llama, rec, "Answer.", 600, 500)
    first = llama.convert_ids_to_tokens(s_ex.input_ids[s_ex.prompt_len])
    assert first == "▁▁"
    n = len(s_ex.input_ids) - s_ex.prompt_len
    same = aligned_positions(s_ex, build_example(copy, rec, "Answer.", 600, 500, context=s_ex.context), llama, copy)
    assert len(same) == n and same[0] == (s_ex.prompt_len - 1,) * 2
    t_ex = build_example(mistral, rec, "Answer.", 600, 500, context=s_ex.context)
    assert mistral.convert_ids_to_tokens(t_ex.input_ids[t_ex.prompt_len]) == "▁▁"
    cross = aligned_positions(s_ex, t_ex, llama, mistral)
    assert cross[0] == (s_ex.prompt_len - 1, t_ex.prompt_len - 1)
