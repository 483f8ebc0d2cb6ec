"""A hub checkpoint that cannot be fetched fails in one line: the model, the licence, HF_TOKEN, how downloads are allowed."""

import httpx
import pytest
from huggingface_hub import errors as hf

from telekd.models import ModelLoadError, load_model, load_tokenizer

REV = "01c7f73d771dfac7d292323805ebc428287df4f9"


def _raise(exc):
    def from_pretrained(*args, **kwargs):
        try:
            raise exc
        except Exception as inner:  # transformers re-raises hub errors as OSError with the cause chained
            raise OSError(f"bare hub traceback: {inner}") from inner
    return from_pretrained


def _response(code):
    return httpx.Response(code, request=httpx.Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize("exc, words", [
    (hf.GatedRepoError("403 gated", response=_response(403)),
     ["meta-llama/Llama-2-7b-hf@01c7f73d771d", "gated", "Llama 2 Community License", "HF_TOKEN",
      "https://huggingface.co/meta-llama/Llama-2-7b-hf", f"--revision {REV}"]),
    (hf.LocalEntryNotFoundError("not cached and offline"),
     ["meta-llama/Llama-2-7b-hf@01c7f73d771d", "HF_HUB_OFFLINE=1", "TELEKD_ALLOW_DOWNLOADS=1 HF_HUB_OFFLINE=0", "HF_TOKEN",
      "Llama 2 Community License", f"huggingface-cli download meta-llama/Llama-2-7b-hf --revision {REV}"]),
    (hf.OfflineModeIsEnabled("offline"), ["downloads are off", "HF_TOKEN"]),
])
@pytest.mark.parametrize("loader", ["tokenizer", "model"])
def test_hub_failure_is_one_line_naming_the_fix(monkeypatch, exc, words, loader):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _raise(exc))
    if loader == "model":
        monkeypatch.setattr("telekd.models.load_tokenizer", lambda *a, **k: None)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _raise(exc))
    fn = load_tokenizer if loader == "tokenizer" else load_model
    with pytest.raises(ModelLoadError) as info:
        fn("meta-llama/Llama-2-7b-hf", REV)
    msg = str(info.value)
    assert "\n" not in msg and "bare hub traceback" not in msg
    for w in words:
        assert w in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_errors_pass_through(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _raise(RuntimeError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        load_tokenizer("meta-llama/Llama-2-7b-hf", REV)


def test_head_and_embeddings_without_the_blocks(saved_models, tmp_path, monkeypatch):
    """DSKD's teacher tables equal the full model's, read from only the shards that hold them."""
    import torch
    import safetensors

    from telekd.models import load_head_and_embeddings

    model, _ = load_model(str(saved_models["llama"]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    (sharded / "tokenizer.json").write_bytes((saved_models["llama"] / "tokenizer.json").read_bytes())
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 3
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
    embed, head = load_head_and_embeddings(str(sharded), dtype="bfloat16")
    assert torch.equal(embed, model.get_input_embeddings().weight.to(torch.bfloat16))
    assert torch.equal(head, model.get_output_embeddings().weight.to(torch.bfloat16))
    assert 1 <= len(set(opened)) <= 2 < len(shards)
