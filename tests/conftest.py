"""Shared fixtures: tokenizers and models small enough to build in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

import telekd  # noqa: F401  (sets the offline environment first)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "telequad-sample.json"
REAL_TELEQUAD = ROOT.parent / "shared" / "data" / "telequad" / "TeleQuAD-v4-full.json"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: torch's 2-thread pool costs more than it saves (ms per op)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_records():
    from telekd.data import load_telequad

    return load_telequad(SAMPLE).records


@pytest.fixture(scope="session")
def tokenizers(sample_records):
    """Two byte-level BPE tokenizers of equal size and different merges (Llama-like, Mistral-like)."""
    from telekd.prompts import set_chat_template
    from telekd.zoo import train_tokenizer

    contexts = list(dict.fromkeys(r.context for r in sample_records))
    llama = train_tokenizer(contexts, 400)
    mistral = train_tokenizer(contexts + [r.question for r in sample_records], 400)
    set_chat_template(llama, "llama2")
    set_chat_template(mistral, "mistral")
    for t in (llama, mistral):
        t.pad_token = t.unk_token
    return {"llama": llama, "mistral": mistral}


def tiny_model(family: str, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    from telekd.params import Architecture
    from telekd.zoo import make_config

    torch.manual_seed(seed)
    arch = Architecture(hidden=hidden, layers=layers, heads=2, kv_heads=1 if family == "mistral" else 2, mlp=2 * hidden)
    return AutoModelForCausalLM.from_config(make_config(family, arch, vocab_size, max_positions=512)).eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizers):
    """A llama teacher, a mistral teacher and a student saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for role, family, hidden in (("llama", "llama", 48), ("mistral", "mistral", 48), ("student", "llama", 32)):
        model = tiny_model(family, len(tokenizers[family]), hidden=hidden)
        model.save_pretrained(root / role, safe_serialization=True)
        tokenizers[family].save_pretrained(root / role)
        out[role] = root / role
    return out
