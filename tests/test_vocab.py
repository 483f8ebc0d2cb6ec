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
