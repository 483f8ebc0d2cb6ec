"""A corrupted teacher-cache entry is recomputed by the kd stage, never used, never rewritten."""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil

from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, reduce_study
from telekd.cache import TARGETS, TENSORS, CorruptEntry, compute_targets, key_digest, load_or_recompute, save_targets


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_or_recompute_gives_the_original_targets(tokenizers, sample_records, tmp_path):
    import torch

    from conftest import tiny_model
    from telekd.align import vocab_map
    from telekd.teacher_inputs import build_pairs
    from telekd.prompts import build_example

    tok = tokenizers["llama"]
    exs = [build_example(tok, r, "Answer.", 600, 500) for r in sample_records[:3]]
    pairs = build_pairs(exs, sample_records[:3], tok, tok, "Answer.", 600, 500)
    s_map, t_map = vocab_map(tok, tok)
    teacher = tiny_model("llama", len(tok))
    compute = lambda: compute_targets(teacher, pairs, s_map, t_map, 8, 2, tok.pad_token_id, temperature=2.0)  # noqa: E731
    original = compute()
    save_targets(original, "vanilla", {"k": 1}, tmp_path)
    got, recomputed = load_or_recompute(tmp_path, {"k": 1}, compute)
    assert recomputed == 0 and torch.equal(got.logprobs, original.logprobs)
    f = tmp_path / key_digest({"k": 1}) / TARGETS
    flip_a_byte(f)
    corrupted = f.read_bytes()
    got, recomputed = load_or_recompute(tmp_path, {"k": 1}, compute)
    assert recomputed == 1
    for name in TENSORS["vanilla"]:
        assert torch.equal(getattr(got, name), getattr(original, name)), name
    assert got.temperature == original.temperature == 2.0
    assert f.read_bytes() == corrupted  # left as is


def test_a_corrupted_entry_is_recomputed_on_the_stages_device(tokenizers, sample_records, tmp_path, monkeypatch):
    """Issue 14: the kd stage recomputed a corrupted entry with the (7B) teacher loaded on the CPU. The recompute must
    load the teacher onto the stage's device; `meta` stands for a GPU here (the loader is recorded, a tiny CPU model
    does the work) and the targets come back on that device."""
    import torch

    from conftest import tiny_model
    from telekd import models
    from telekd.align import vocab_map
    from telekd.cache import kd_targets, load_targets, teacher_pass
    from telekd.teacher_inputs import KDInputs, build_pairs
    from telekd.prompts import build_example

    tok = tokenizers["llama"]
    exs = [build_example(tok, r, "Answer.", 600, 500) for r in sample_records[:2]]
    pairs = build_pairs(exs, sample_records[:2], tok, tok, "Answer.", 600, 500)
    inp = KDInputs(tok, tok, exs, pairs, *vocab_map(tok, tok), True, {"vanilla": {"k": 2}})
    p = SimpleNamespace(teacher_cache=SimpleNamespace(top_k=8, hidden=True),
                        active=SimpleNamespace(dtype="float32", train=SimpleNamespace(batch_size=2)),
                        models=SimpleNamespace(trust_remote_code=False))
    teacher = tiny_model("llama", len(tok))
    at = dict(temperature=2.0, t_temperature=2.0, hidden=False)
    save_targets(teacher_pass(p, inp, teacher, **at), "vanilla", inp.keys["vanilla"], tmp_path / "vanilla")
    loads = []

    def load_model(source, **kw):
        loads.append((source, kw["device"]))
        return teacher, tok

    monkeypatch.setattr(models, "load_model", load_model)
    clean, recomputed = kd_targets(tmp_path, p, inp, "vanilla", "models/base/llama", "meta", temperature=2.0)
    assert recomputed == 0 and loads == [] and clean.logprobs.device.type == "meta"
    flip_a_byte(tmp_path / "vanilla" / key_digest(inp.keys["vanilla"]) / TARGETS)
    got, recomputed = kd_targets(tmp_path, p, inp, "vanilla", "models/base/llama", "meta", temperature=2.0)
    assert recomputed == 1 and loads == [("models/base/llama", "meta")]
    assert got.logprobs.device.type == "meta" and got.temperature == 2.0
    # a teacher the stage holds already (DSKD) is used as it is, not loaded again
    got, recomputed = kd_targets(tmp_path, p, inp, "vanilla", "models/base/llama", "cpu", teacher=teacher,
                                 temperature=2.0)
    assert recomputed == 1 and len(loads) == 1
    with pytest.raises(CorruptEntry):
        load_targets(tmp_path / "vanilla", inp.keys["vanilla"])
    ref = teacher_pass(p, inp, teacher, **at)
    assert all(torch.equal(getattr(got, n), getattr(ref, n)) for n in TENSORS["vanilla"])


def tree(d):
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


def test_kd_stage_recomputes_a_corrupted_entry(tmp_path, saved_models, monkeypatch, capsys):
    params = reduce_study(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["data"].update(max_train=8, source=str(ROOT / params["data"]["source"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for role in ("llama", "student"):
        shutil.copytree(saved_models[role], tmp_path / "models/base" / role)
    monkeypatch.chdir(tmp_path)

    def stage(name, *args):
        monkeypatch.setattr("sys.argv", [name, *args])
        runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
        return capsys.readouterr().out

    stage("prepare")
    stage("teacher_cache", "--teacher", "llama", "--teacher-sft", "base")
    cell = "llama-base-base-vanilla"
    stage("vanilla", "--cell", cell)
    clean = json.loads((tmp_path / f"metrics/kd/{cell}.json").read_text())
    clean_model = (tmp_path / f"models/kd/{cell}/model.safetensors").read_bytes()
    [entry] = (tmp_path / "cache/teacher/llama-base/vanilla").iterdir()
    flip_a_byte(entry / TARGETS)
    cache_before = tree(tmp_path / "cache")

    out = stage("vanilla", "--cell", cell)
    [line] = [x for x in out.splitlines() if "recomputing" in x]
    assert line == (f"kd: cache/teacher/llama-base/vanilla/{entry.name}/{TARGETS}: content hash mismatch (corrupted): dvc checkout "
                    "or dvc repro restores it; recomputing the teacher targets in memory (the cache is left as is)")
    m = json.loads((tmp_path / f"metrics/kd/{cell}.json").read_text())
    assert (clean["cache_recomputed"], m["cache_recomputed"]) == (0, 1)
    assert m["val_ce_after"] == clean["val_ce_after"] and m["train_loss_last"] == clean["train_loss_last"]
    assert (tmp_path / f"models/kd/{cell}/model.safetensors").read_bytes() == clean_model  # as with the clean cache
    assert tree(tmp_path / "cache") == cache_before  # nothing written into the teacher_cache stage's output


@pytest.mark.parametrize("teacher", ["llama", "mistral"])
def test_changing_vanilla_temperature_leaves_the_dskd_and_uld_entries_byte_identical(tmp_path, saved_models,
                                                                                       monkeypatch, teacher):
    """One teacher pass writes an entry per algorithm, each keyed only by what determines it: rebuilding the cache at
    another vanilla.divergence.temperature rewrites the vanilla entry, while the dskd and uld entries come out with
    the same bytes (same paths, same sha256), so DVC reruns no DSKD or ULD cell (the forward pass is deterministic).
    Changing dskd.divergence.temperature likewise leaves vanilla's and ULD's entries as they are."""
    params = reduce_study(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["data"].update(max_train=6, source=str(ROOT / params["data"]["source"]))
    for role in (teacher, "student"):
        shutil.copytree(saved_models[role], tmp_path / "models/base" / role)
    monkeypatch.chdir(tmp_path)

    def build(vanilla_t, dskd_t):
        params["vanilla"]["divergence"]["temperature"] = vanilla_t
        params["dskd"]["divergence"]["temperature"] = dskd_t
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        for name, args in (("prepare", []), ("teacher_cache", ["--teacher", teacher, "--teacher-sft", "base"])):
            monkeypatch.setattr("sys.argv", [name, *args])
            runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
        root = tmp_path / f"cache/teacher/{teacher}-base"
        return {e: tree(root / e) for e in ("vanilla", "dskd", "uld")}

    first, second, third = build(2.0, 2.0), build(1.0, 2.0), build(1.0, 4.0)
    assert all(first[e] for e in first)  # each entry: a manifest and its targets
    assert second["dskd"] == first["dskd"] and second["uld"] == first["uld"]
    assert second["vanilla"] != first["vanilla"]
    assert third["vanilla"] == second["vanilla"] and third["uld"] == first["uld"]
    assert third["dskd"] != second["dskd"]
