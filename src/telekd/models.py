"""The one way models are loaded: a local checkpoint or a hub id at a pinned revision.

Safetensors only (no pickle), and `trust_remote_code` only when params say so. A checkpoint folder
may hold the weights, or a `hub.json` pointer {"hub": id, "revision": sha, "chat_template": name}
that the paper profile's base_models stage writes instead of copying 7B weights.
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded, in one line naming it and the fix."""


# Licences a user must accept on the hub before a gated checkpoint downloads (per organisation).
LICENCES = {"meta-llama": "the Llama 2 Community License", "mistralai": "Mistral AI's access conditions"}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def hub_error(source: str, revision: str | None, e: BaseException) -> ModelLoadError | None:
    """One line for a hub model that cannot be fetched (gated without a token, offline, missing), or None
    when `e` is something else. Names the model, the licence to accept, HF_TOKEN and how downloads are allowed."""
    import os

    from huggingface_hub import errors as hf

    chain = list(_chain(e))
    at = f"{source}@{revision[:12]}" if revision else source
    licence = LICENCES.get(source.split("/")[0], "its licence")
    fetch = f"huggingface-cli download {source} --revision {revision}" if revision else f"huggingface-cli download {source}"
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if any(isinstance(x, hf.GatedRepoError) for x in chain):
        return ModelLoadError(f"{at}: gated checkpoint, access refused ({token}): accept {licence} at "
                              f"https://huggingface.co/{source} with your account, then export HF_TOKEN=<a read token> "
                              f"and rerun, or pre-download it: {fetch} (README: Running the paper profile)")
    if any(isinstance(x, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) for x in chain):
        return ModelLoadError(f"{at}: not in the local Hugging Face cache and downloads are off (telekd sets "
                              f"HF_HUB_OFFLINE=1 unless TELEKD_ALLOW_DOWNLOADS=1; make exports it too): accept {licence} "
                              f"at https://huggingface.co/{source}, export HF_TOKEN, then pre-download it with `{fetch}` "
                              "or allow downloads with TELEKD_ALLOW_DOWNLOADS=1 HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0")
    if any(isinstance(x, hf.RevisionNotFoundError) for x in chain):
        return ModelLoadError(f"{at}: revision not found on the hub: fix profiles.<profile>.models revision")
    if any(isinstance(x, hf.RepositoryNotFoundError) for x in chain):
        return ModelLoadError(f"{source}: no such repository on the hub, or a gated/private one without access "
                              f"({token}): check the id, accept {licence} and export HF_TOKEN")
    return None


def _from_hub(load, where: str, rev: str | None, source_is_hub: bool):
    """load() (a from_pretrained call of `where` at `rev`), with hub failures turned into one ModelLoadError line."""
    try:
        return load()
    except (OSError, ValueError) as e:  # transformers wraps hub errors in OSError (or raises them directly)
        err = hub_error(where, rev, e) if source_is_hub else None
        if err is None:
            raise
        raise err from None


def _resolve(source: str, revision: str | None) -> tuple[str, str | None, str | None]:
    """(what to pass to from_pretrained, revision, chat template name or None)."""
    p = Path(source)
    if p.is_dir():
        pointer = p / "hub.json"
        if pointer.exists():
            ref = json.loads(pointer.read_text())
            return ref["hub"], ref["revision"], ref.get("chat_template")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: no config.json: not a checkpoint folder (run its producing stage: dvc repro)")
        if not list(p.glob("*.safetensors")):
            raise ModelLoadError(f"{p}: no *.safetensors weights (telekd loads safetensors only): re-save the model with safe_serialization=True")
        return str(p), None, None
    if p.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelLoadError(f"{source}: neither a checkpoint folder nor a hub id like org/name")
    if not revision:
        raise ModelLoadError(f"hub model {source} needs a pinned revision (a commit hash)")
    return source, revision, None


def load_tokenizer(source: str, revision: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint folder or hub id + revision, with its chat template and a pad token."""
    from transformers import AutoTokenizer

    from .prompts import set_chat_template

    where, rev, template = _resolve(source, revision)
    tok = _from_hub(lambda: AutoTokenizer.from_pretrained(where, revision=rev, trust_remote_code=trust_remote_code),
                    where, rev, rev is not None)
    if template:
        set_chat_template(tok, template)
    if tok.pad_token is None:  # Llama-2 and Mistral ship without one; padding is masked anyway
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load_model(source: str, revision: str | None = None, *, dtype: str = "float32", trust_remote_code: bool = False,
               device: str = "cpu"):
    """Return (model, tokenizer) from a checkpoint folder or a hub id + revision."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tok = load_tokenizer(source, revision, trust_remote_code=trust_remote_code)
    where, rev, _ = _resolve(source, revision)
    model = _from_hub(lambda: AutoModelForCausalLM.from_pretrained(
        where, revision=rev, dtype=getattr(torch, DTYPES[dtype]), use_safetensors=True,
        trust_remote_code=trust_remote_code), where, rev, rev is not None).to(device)
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise ModelLoadError(
            f"{source}: tokenizer has {len(tok)} tokens but the model embeds {model.get_input_embeddings().num_embeddings}: "
            "they do not belong together; load both from the same checkpoint"
        )
    return model, tok


def count_parameters(model) -> int:
    """Parameters of `model` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _weight_files(source: str, revision: str | None, names: tuple[str, ...]) -> dict[str, str]:
    """{tensor name: local safetensors file holding it}, fetching only the files needed (hub: index + shards)."""
    where, rev, _ = _resolve(source, revision)
    local = Path(where).is_dir()

    def get(fname: str) -> str | None:
        if local:
            return str(Path(where) / fname) if (Path(where) / fname).exists() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return _from_hub(lambda: hf_hub_download(where, fname, revision=rev), where, rev, True)
        except EntryNotFoundError:
            return None

    index = get("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        return {n: get(weight_map[n]) for n in names if n in weight_map}
    single = get("model.safetensors")
    if single is None:
        raise ModelLoadError(f"{source}: no model.safetensors(.index.json): telekd loads safetensors only")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        keys = set(f.keys())
    return {n: single for n in names if n in keys}


def load_head_and_embeddings(source: str, revision: str | None = None, *, dtype: str = "float32", device: str = "cpu"):
    """(input embedding [V, d], output head [V, d]) of a causal LM without loading its blocks.

    DSKD needs only these two tables of the teacher (its forward pass is in the cache): for a 7B teacher
    0.5 GB in bf16 instead of 13.5 GB. Read by name from the safetensors files (model.embed_tokens.weight,
    lm_head.weight; a tied head is the embedding); on the hub only the shards that hold them are fetched.
    """
    import torch
    from safetensors import safe_open

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    names = ("model.embed_tokens.weight", "lm_head.weight")
    files = _weight_files(source, revision, names)
    if names[0] not in files:
        raise ModelLoadError(f"{source}: no tensor {names[0]} in its safetensors: not a Llama/Mistral-style causal LM")
    out = {}
    for n, f in files.items():
        with safe_open(f, "pt") as sf:
            out[n] = sf.get_tensor(n).to(dtype=getattr(torch, DTYPES[dtype]), device=device)
    embed = out[names[0]]
    return embed, out.get(names[1], embed)
