"""Cross-tokenizer alignment for token-level KD (exact token alignment, by bytes).

Feeding the student's token ids to a teacher with another vocabulary is a silent bug. Instead each
model tokenizes the same completion text, and everything is compared through the **bytes each token
spells**, never through token strings or character offsets:

* a byte-level BPE token (GPT-2 style, ``Ġthe``, ``âĤ``) spells the bytes its characters stand for
  (the GPT-2 ``bytes_to_unicode`` table);
* a SentencePiece token spells its text with ``▁`` read as a space, and a byte-fallback token
  ``<0xE2>`` spells that one byte;
* an added/special token (``</s>``) spells its content.

The same token string can spell different bytes in the two families (byte-level ``µ`` is the byte
0xB5; SentencePiece ``µ`` is U+00B5, bytes C2 B5) and different strings can spell the same bytes
(``Ġthe`` / ``▁the``; ``â`` / ``<0xE2>``), so strings are no basis for pairing.

`aligned_positions` pairs an answer position of the student with one of the teacher only when the two
predicted tokens spell the same bytes **and** the completion text before them is the same bytes: the
target and its prefix are identical. The pieces of one multi-byte character pair only when they are
the same pieces (byte-level ``[âĤ, ¬]`` against ``[â, Ĥ¬]`` for "€" pairs nothing). A SentencePiece
"dummy prefix" (the extra ``▁`` its normaliser puts before the text) belongs to no completion byte:
it gets negative byte offsets, and a token that starts in it (Llama-2's and Mistral's ``▁`` or ``▁▁``
before an answer that starts with a space) pairs only with a token of the same start and bytes: one
behind a dummy prefix of the same length. A byte-level BPE token never pairs with it. Two copies of the
same tokenizer (the same definition, loaded twice) pair every position, as one object does.

`vocab_map` carries the teacher's distribution to the student's vocabulary through tokens that spell
the same bytes (one-to-one; added tokens pair by content). Mass on teacher tokens without a twin stays
in one residual bin (see losses.divergence_topk). With identical tokenizers every position pairs and
every id maps, so the loss reduces to the plain dense one.
"""

from __future__ import annotations

import json
import re
import weakref
from functools import lru_cache

BYTE_LEVEL, SENTENCEPIECE = "byte-level BPE", "SentencePiece"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_KIND_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DIGEST_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def same_vocab(tok_a, tok_b) -> bool:
    """True when both tokenizers map exactly the same token strings to the same ids (one vocabulary)."""
    return tok_a.get_vocab() == tok_b.get_vocab()


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table inverted: character of a byte-level token -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _spec(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _digest(tokenizer) -> str:
    """sha256 of the fast tokenizer's full definition (vocabulary, merges, normaliser, ...), cached per object:
    two objects loaded from the same files (the student's and the teacher's copy) have the same digest."""
    try:
        return _DIGEST_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    import hashlib

    d = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    try:
        _DIGEST_CACHE[tokenizer] = d
    except TypeError:
        pass
    return d


def token_kind(tokenizer) -> str | None:
    """BYTE_LEVEL, SENTENCEPIECE, or None when the bytes of the tokenizer's tokens cannot be read off them.

    Read from the fast tokenizer's decoder (ByteLevel; Metaspace/ByteFallback/Replace('▁')) and model
    (byte_fallback). Cached per tokenizer object.
    """
    try:
        return _KIND_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    spec = _spec(tokenizer)
    dec = spec.get("decoder") or {}
    decs = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    types = {d.get("type") for d in decs if isinstance(d, dict)}
    metaspace_replace = any(d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁" for d in decs
                            if isinstance(d, dict))
    if "ByteLevel" in types:
        kind = BYTE_LEVEL
    elif types & {"Metaspace", "ByteFallback"} or metaspace_replace or (spec.get("model") or {}).get("byte_fallback"):
        kind = SENTENCEPIECE
    else:
        kind = None
    try:
        _KIND_CACHE[tokenizer] = kind
    except TypeError:
        pass
    return kind


def _added(tokenizer) -> dict[int, str]:
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}


def piece_bytes(piece: str, kind: str) -> bytes:
    """The bytes a (non-added) token string spells in a tokenizer of `kind`.

    Raises ValueError for a byte-level token with a character outside GPT-2's byte table.
    """
    if kind == BYTE_LEVEL:
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            raise ValueError(f"token {piece!r} is not a byte-level BPE token (a character outside GPT-2's byte table)") from None
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")


def _kind_or_raise(tokenizer, what: str) -> str:
    kind = token_kind(tokenizer)
    if kind is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"{what} tokenizer {name!r} is neither byte-level BPE nor SentencePiece: the bytes of its tokens "
                         "are unknown, so it cannot be aligned with another vocabulary (use the same tokenizer or kd.alg: dskd)")
    return kind


def _key(i: int, piece: str, kind: str, added: dict[int, str]) -> tuple[str, bytes]:
    """("bytes", what the token spells) or, for an added token, ("added", its content)."""
    if kind == SENTENCEPIECE and _BYTE_PIECE.fullmatch(piece):  # byte pieces, even when registered as added tokens
        return "bytes", piece_bytes(piece, kind)
    if i in added:
        return "added", added[i].encode("utf-8")
    return "bytes", piece_bytes(piece, kind)


def ids_bytes(tokenizer, ids: list[int], what: str = "the") -> list[bytes]:
    """The bytes each token of `ids` spells (added tokens: their content)."""
    kind = _kind_or_raise(tokenizer, what)
    added = _added(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [_key(i, p, kind, added)[1] for i, p in zip(ids, pieces)]


def vocab_map(student_tok, teacher_tok):
    """(student_ids, teacher_ids) LongTensors pairing tokens that spell the same bytes, one-to-one, in student-id order.

    Identical vocabularies map every id to itself. Otherwise a normal token pairs with the other side's
    normal token of identical bytes (see the module docstring) and an added token with the added token of
    identical content; where one side has several ids of the same bytes (SentencePiece ``▁`` and
    ``<0x20>``), ids with identical strings pair, else the one piece of each side that is not a
    ``<0xHH>`` byte piece, and the rest stay unmapped. Raises ValueError when no
    token pairs, or when a tokenizer's token bytes cannot be read (neither byte-level BPE nor SentencePiece).
    """
    import torch

    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        ids = sorted(s_vocab.values())
        return torch.tensor(ids), torch.tensor(ids)

    def by_key(tok, vocab, what):
        kind, added = _kind_or_raise(tok, what), _added(tok)
        out: dict = {}
        for piece, i in vocab.items():
            out.setdefault(_key(i, piece, kind, added), []).append((piece, i))
        return out

    s_keys, t_keys = by_key(student_tok, s_vocab, "student"), by_key(teacher_tok, t_vocab, "teacher")
    pairs = []
    for key, s_list in s_keys.items():
        t_list = t_keys.get(key)
        if not t_list:
            continue
        if len(s_list) == 1 and len(t_list) == 1:
            pairs.append((s_list[0][1], t_list[0][1]))
            continue
        t_by_piece = dict(t_list)
        same = [(i, t_by_piece[p]) for p, i in s_list if p in t_by_piece]
        if same:
            pairs += same
            continue
        # no identical strings: the one regular piece of each side (SentencePiece "▁" over its unused "<0x20>")
        s_reg = [i for p, i in s_list if not _BYTE_PIECE.fullmatch(p)]
        t_reg = [i for p, i in t_list if not _BYTE_PIECE.fullmatch(p)]
        if len(s_reg) == 1 and len(t_reg) == 1:
            pairs.append((s_reg[0], t_reg[0]))
    if not pairs:
        raise ValueError("student and teacher tokenizers share no token bytes: vanilla KD cannot align them (use kd.alg: dskd)")
    s_ids, t_ids = zip(*sorted(pairs))
    return torch.tensor(s_ids), torch.tensor(t_ids)


def _byte_spans(tokenizer, ex, what: str) -> list[tuple[int, int, bytes]]:
    """(start, end, bytes) of each answer token of `ex` in the completion's UTF-8 bytes.

    A SentencePiece dummy prefix (spaces the tokenizer spells before the completion) gets negative offsets.
    Raises ValueError when the tokens do not spell the completion (a normaliser that rewrites text).
    """
    ids = ex.input_ids[ex.prompt_len:]
    text = ex.completion.encode("utf-8")
    full = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    if full[: len(ids)] != list(ids):
        raise ValueError(f"record {ex.id}: the {what} answer tokens are not the tokenization of its completion "
                         "(build examples with prompts.build_example)")
    spelled = b"".join(ids_bytes(tokenizer, full, what))
    lead = len(spelled) - len(text)
    if lead < 0 or spelled[lead:] != text or spelled[:lead].strip(b" "):
        raise ValueError(f"record {ex.id}: the {what} tokenizer's tokens spell {spelled[:80]!r}, not the completion "
                         f"{text[:80]!r} (its normaliser rewrites the text): it cannot be aligned by bytes (use kd.alg: dskd)")
    spans, pos = [], -lead
    for b in ids_bytes(tokenizer, ids, what):
        spans.append((pos, pos + len(b), b))
        pos += len(b)
    return spans


def _answer(ex, tokenizer) -> str:
    """The completion without the tokenizer's EOS text (SmolLM2 ends an answer with <|im_end|>, Gemma with <eos>)."""
    eos = tokenizer.eos_token or ""
    return ex.completion[: -len(eos)] if eos and ex.completion.endswith(eos) else ex.completion


def aligned_positions(student_ex, teacher_ex, student_tok, teacher_tok) -> list[tuple[int, int]]:
    """Pairs (student logit position, teacher logit position) whose predicted tokens have the same bytes and prefix.

    A position p predicts the token at p + 1; answer token j of an example sits at prompt_len + j. A pair is
    formed only where both tokens start at the same byte of the completion and spell the same bytes, so the
    completion text before them and the target are byte-identical (a SentencePiece dummy prefix counts as
    bytes before the completion: a token that starts in it pairs only behind a dummy prefix of the same length). Raises ValueError when the completions differ or a tokenizer cannot be read
    as bytes (see `token_kind`).
    """
    if _answer(student_ex, student_tok) != _answer(teacher_ex, teacher_tok):   # each ends with its own EOS text
        raise ValueError(f"record {student_ex.id}: student and teacher completions differ; they must share the answer text")
    s_ids, t_ids = student_ex.input_ids[student_ex.prompt_len:], teacher_ex.input_ids[teacher_ex.prompt_len:]
    if student_tok is teacher_tok or (s_ids == t_ids and _digest(student_tok) == _digest(teacher_tok)):
        # the same tokenizer (one object, or two copies of one definition): the same tokens at every position
        n = min(len(s_ids), len(t_ids))
        return [(student_ex.prompt_len + j - 1, teacher_ex.prompt_len + j - 1) for j in range(n)]
    t_at = {(a, b): (i, tb) for i, (a, b, tb) in enumerate(_byte_spans(teacher_tok, teacher_ex, "teacher"))}
    pairs = []
    for j, (a, b, sb) in enumerate(_byte_spans(student_tok, student_ex, "student")):
        hit = t_at.get((a, b))
        if hit is not None and hit[1] == sb:
            pairs.append((student_ex.prompt_len + j - 1, teacher_ex.prompt_len + hit[0] - 1))
    return pairs
