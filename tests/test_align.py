"""Cross-tokenizer alignment by bytes: byte-level BPE and SentencePiece with byte fallback, multi-byte answers."""

import re

import pytest

from telekd.align import (BYTE_LEVEL, SENTENCEPIECE, aligned_positions, ids_bytes, piece_bytes, token_kind,
                          vocab_map)
from telekd.data import QARecord
from telekd.prompts import build_example, set_chat_template

SYSTEM = "Answer from the context."
# TeleQuAD-like answers with multi-byte characters: €, ±, µ, ˚, ≤/≥, Greek, CJK
ANSWERS = ["5€", "±3 seconds", "≤ 10 ms", "≥ 10 ms", "2 µs at 25 ˚C", "中文 3GPP", "α = 0.5 and β ≥ 2", "the SMF"]


def _finish(tok, template):
    set_chat_template(tok, template)
    tok.pad_token = tok.unk_token
    return tok


def byte_level_bpe(merges: list[tuple[str, str]]):
    """A byte-level BPE tokenizer with exactly the given merges (GPT-2 byte alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _finish(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                   "llama2")


def sentencepiece_bpe(texts: list[str], vocab_size: int, template: str = "mistral"):
    """A Llama-2/Mistral-style SentencePiece BPE: normaliser Prepend('▁') + Replace(' ', '▁'), byte fallback
    over the 256 <0xHH> pieces, decoder Replace/ByteFallback/Fuse/Strip (as in their tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False))
    return _finish(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                   template)


@pytest.fixture(scope="module")
def family(tokenizers, sample_records):
    """Two byte-level BPE and two SentencePiece byte-fallback tokenizers with different merges."""
    contexts = list(dict.fromkeys(r.context for r in sample_records))
    return {
        "bpe_a": tokenizers["llama"], "bpe_b": tokenizers["mistral"],
        # µ and ˚ are characters of the first SentencePiece vocabulary; €, ±, ≤, Greek and CJK go through bytes
        "sp_a": sentencepiece_bpe(contexts + ["2 µs at 25 ˚C"] * 20, 700, "llama2"),
        "sp_b": sentencepiece_bpe(contexts[::2], 600),
    }


def _record(answer: str) -> QARecord:
    context = f"The value is {answer} in this release."
    return QARecord(id="q1", doc_id="d", source="", title="", context=context, question="What is the value?",
                    answers=(answer,), answer_starts=(context.index(answer),), is_impossible=False)


def _answer_bytes(tok, ex) -> tuple[list[bytes], int]:
    """The bytes of each answer token and the dummy-prefix length, computed independently of the alignment."""
    pieces = ids_bytes(tok, ex.input_ids[ex.prompt_len:])
    lead = len(b"".join(pieces)) - len(ex.completion.encode("utf-8"))
    return pieces, lead


def _check_pairs(s_tok, t_tok, s_ex, t_ex, pairs):
    s_pieces, s_lead = _answer_bytes(s_tok, s_ex)
    t_pieces, t_lead = _answer_bytes(t_tok, t_ex)
    for sp, tp in pairs:
        j, i = sp + 1 - s_ex.prompt_len, tp + 1 - t_ex.prompt_len
        assert s_pieces[j] == t_pieces[i], (s_tok.convert_ids_to_tokens([s_ex.input_ids[sp + 1]]),
                                            t_tok.convert_ids_to_tokens([t_ex.input_ids[tp + 1]]))
        s_prefix, t_prefix = b"".join(s_pieces[:j]), b"".join(t_pieces[:i])
        assert len(s_prefix) - s_lead == len(t_prefix) - t_lead  # the same start (a dummy prefix: the same length)
        assert s_prefix[s_lead:] == t_prefix[t_lead:]


# ---- the bytes of a token ------------------------------------------------------------------------------------

def test_piece_bytes_of_both_families():
    assert piece_bytes("âĤ", BYTE_LEVEL) == b"\xe2\x82" and piece_bytes("¬", BYTE_LEVEL) == b"\xac"
    assert piece_bytes("Ġthe", BYTE_LEVEL) == b" the" and piece_bytes("Ċ", BYTE_LEVEL) == b"\n"
    assert piece_bytes("µ", BYTE_LEVEL) == b"\xb5"                       # one byte in byte-level BPE ...
    assert piece_bytes("µ", SENTENCEPIECE) == "µ".encode() == b"\xc2\xb5"  # ... a character in SentencePiece
    assert piece_bytes("<0xE2>", SENTENCEPIECE) == b"\xe2" and piece_bytes("▁the", SENTENCEPIECE) == b" the"
    with pytest.raises(ValueError, match="not a byte-level BPE token"):
        piece_bytes("▁x", BYTE_LEVEL)


def test_token_bytes_spell_the_text(family):
    """Concatenated token bytes are the text (SentencePiece: after its dummy-prefix space)."""
    assert token_kind(family["bpe_a"]) == BYTE_LEVEL and token_kind(family["sp_a"]) == SENTENCEPIECE
    for text in ANSWERS:
        for name, tok in family.items():
            spelled = b"".join(ids_bytes(tok, tok(text, add_special_tokens=False)["input_ids"]))
            want = (b" " if name.startswith("sp") else b"") + text.encode()
            assert spelled == want, (name, text)
    # byte fallback really is exercised: € is three <0xHH> pieces in SentencePiece
    assert family["sp_a"].tokenize("5€")[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]


# ---- aligned positions -----------------------------------------------------------------------------------------

def test_issue_example_5_euro_pairs_no_different_pieces():
    """Student [âĤ, ¬] against teacher [â, Ĥ¬] for '€': same count, different pieces -> no pair."""
    s_tok = byte_level_bpe([("â", "Ĥ")])
    t_tok = byte_level_bpe([("Ĥ", "¬")])
    rec = _record("5€")
    s_ex = build_example(s_tok, rec, SYSTEM, 600, 500)
    t_ex = build_example(t_tok, rec, SYSTEM, 600, 500, context=s_ex.context)
    s_ans = s_tok.convert_ids_to_tokens(s_ex.input_ids[s_ex.prompt_len:])
    t_ans = t_tok.convert_ids_to_tokens(t_ex.input_ids[t_ex.prompt_len:])
    assert s_ans == ["Ġ", "5", "âĤ", "¬", "</s>"] and t_ans == ["Ġ", "5", "â", "Ĥ¬", "</s>"]
    pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
    s0, t0 = s_ex.prompt_len - 1, t_ex.prompt_len - 1
    assert pairs == [(s0, t0), (s0 + 1, t0 + 1), (s0 + 4, t0 + 4)]  # " ", "5", "</s>"; no piece of "€"
    _check_pairs(s_tok, t_tok, s_ex, t_ex, pairs)


def test_identical_pieces_of_a_multibyte_character_pair():
    s_tok, t_tok = byte_level_bpe([("â", "Ĥ")]), byte_level_bpe([("â", "Ĥ"), ("Ġ", "5")])
    rec = _record("5€")
    s_ex = build_example(s_tok, rec, SYSTEM, 600, 500)
    t_ex = build_example(t_tok, rec, SYSTEM, 600, 500, context=s_ex.context)
    pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
    s0, t0 = s_ex.prompt_len - 1, t_ex.prompt_len - 1
    # teacher [Ġ5, âĤ, ¬, </s>] vs student [Ġ, 5, âĤ, ¬, </s>]: âĤ, ¬ and </s> share bytes and prefix
    assert pairs == [(s0 + 2, t0 + 1), (s0 + 3, t0 + 2), (s0 + 4, t0 + 3)]
    _check_pairs(s_tok, t_tok, s_ex, t_ex, pairs)


@pytest.mark.parametrize("student,teacher", [("bpe_a", "bpe_b"), ("bpe_a", "sp_a"), ("sp_a", "bpe_b"),
                                             ("sp_a", "sp_b"), ("sp_b", "sp_a")])
def test_every_pair_has_the_same_target_and_prefix_bytes(family, student, teacher):
    s_tok, t_tok = family[student], family[teacher]
    total = 0
    for answer in ANSWERS:
        rec = _record(answer)
        s_ex = build_example(s_tok, rec, SYSTEM, 600, 500)
        t_ex = build_example(t_tok, rec, SYSTEM, 600, 500, context=s_ex.context)
        pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
        _check_pairs(s_tok, t_tok, s_ex, t_ex, pairs)
        assert pairs == sorted(pairs) and len({t for _, t in pairs}) == len(pairs)
        total += len(pairs)
    assert total > 0


def test_same_family_identical_pieces_pair_every_byte_piece(family):
    """Both SentencePiece tokenizers spell € as <0xE2><0x82><0xAC>: all three pair, each with itself."""
    s_tok, t_tok = family["sp_a"], family["sp_b"]
    rec = _record("5€")
    s_ex = build_example(s_tok, rec, SYSTEM, 600, 500)
    t_ex = build_example(t_tok, rec, SYSTEM, 600, 500, context=s_ex.context)
    pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
    s_pieces = s_tok.convert_ids_to_tokens([s_ex.input_ids[p + 1] for p, _ in pairs])
    t_pieces = t_tok.convert_ids_to_tokens([t_ex.input_ids[p + 1] for _, p in pairs])
    assert s_pieces == t_pieces and {"<0xE2>", "<0x82>", "<0xAC>", "</s>"} <= set(s_pieces)
    # the dummy-prefix "▁" (first answer token of both, the same length of dummy prefix) pairs with itself
    assert s_tok.convert_ids_to_tokens(s_ex.input_ids[s_ex.prompt_len]) == "▁"
    assert pairs[0] == (s_ex.prompt_len - 1, t_ex.prompt_len - 1)


def test_truncated_answers_align_their_kept_tokens(family):
    s_tok, t_tok = family["bpe_a"], family["sp_a"]
    rec = _record("2 µs at 25 ˚C")
    full = build_example(s_tok, rec, SYSTEM, 600, 500)
    s_ex = build_example(s_tok, rec, SYSTEM, full.prompt_len + 3, 500)  # the answer cut after 3 tokens
    t_ex = build_example(t_tok, rec, SYSTEM, 600, 500, context=s_ex.context)
    pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
    assert all(p < len(s_ex.input_ids) - 1 for p, _ in pairs)
    _check_pairs(s_tok, t_tok, s_ex, t_ex, pairs)


def test_unreadable_tokenizer_is_refused(family):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##s": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(ValueError, match="neither byte-level BPE nor SentencePiece"):
        vocab_map(family["bpe_a"], tok)


# ---- the vocabulary map ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("student,teacher", [("bpe_a", "bpe_b"), ("bpe_a", "sp_a"), ("sp_a", "bpe_a"),
                                             ("sp_a", "sp_b")])
def test_vocab_map_pairs_identical_bytes_one_to_one(family, student, teacher):
    s_tok, t_tok = family[student], family[teacher]
    s_map, t_map = vocab_map(s_tok, t_tok)
    s_ids, t_ids = s_map.tolist(), t_map.tolist()
    assert s_ids == sorted(s_ids) and len(set(s_ids)) == len(s_ids) and len(set(t_ids)) == len(t_ids)
    def added(tok):  # added tokens other than SentencePiece byte pieces (which spell their byte)
        return {i for i, a in tok.added_tokens_decoder.items() if not re.fullmatch(r"<0x[0-9A-F]{2}>", a.content)}

    s_added, t_added = added(s_tok), added(t_tok)
    for s, t in zip(s_ids, t_ids):
        assert (s in s_added) == (t in t_added)
        assert ids_bytes(s_tok, [s]) == ids_bytes(t_tok, [t])


def test_vocab_map_across_families_by_bytes_not_strings(family):
    bpe, sp = family["bpe_a"], family["sp_a"]
    pairs = dict(zip(*(m.tolist() for m in vocab_map(bpe, sp))))
    bv, sv = bpe.get_vocab(), sp.get_vocab()
    assert "µ" in bv and "µ" in sv
    assert pairs.get(bv["µ"]) != sv["µ"]               # byte 0xB5 is not the character µ (C2 B5)
    assert pairs[bv["µ"]] == sv["<0xB5>"]
    assert pairs[bv["â"]] == sv["<0xE2>"]               # the same byte, different strings
    assert pairs[bv["Ġ"]] == sv["▁"]                    # the space: SentencePiece's "▁", not its "<0x20>"
    assert pairs[bv["</s>"]] == sv["</s>"]
    both = [p for p in bv if p in sv and p.isascii() and p.isalnum()]
    assert all(pairs[bv[p]] == sv[p] for p in both)     # plain ASCII pieces keep their twins
