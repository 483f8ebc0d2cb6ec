"""telekd.lockfile writes dvc.lock byte for byte as DVC's own modify_yaml does, on the study's lock.

Each test replays what `Lockfile.dump_stages` does after a stage (replace the stage's entry by a new plain dict) once
through DVC's modify_yaml and once through the cache, on two copies of a slice of the committed dvc.lock (its first
6 stages), and compares the files. tests/conftest.py runs the reduced studies through it too.
"""

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from telekd import lockfile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lock_text():
    """The committed dvc.lock cut after its 6th stage (prepare to teacher_cache, the prompt's folded lines in)."""
    lines = (ROOT / "dvc.lock").read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"  \S", line)]
    return "".join(lines[:starts[6]])


@pytest.fixture
def pair(tmp_path, lock_text):
    """Two copies of the slice: `dvc/dvc.lock` for DVC's modify_yaml, `ours/dvc.lock` for the cache."""
    paths = []
    for name in ("dvc", "ours"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dvc.lock").write_text(lock_text)
        paths.append(tmp_path / name / "dvc.lock")
    return paths


@pytest.fixture
def parses(monkeypatch):
    """Counts the round-trip parses DVC's parser does."""
    from dvc.utils.serialize import _yaml

    calls = []
    real = _yaml.parse_yaml_for_update

    def counting(text, path):
        calls.append(path)
        return real(text, path)

    monkeypatch.setattr(_yaml, "parse_yaml_for_update", counting)
    return calls


def rerun(data, name, md5="0" * 32):
    """What dump_stages does for a stage that ran: a new plain-dict entry (here with its first out's md5 changed)."""
    plain = json.loads(json.dumps(data["stages"].get(name) or {"cmd": f"python {name}.py"}))
    for out in plain.get("outs", [])[:1]:
        out["md5"] = md5
    data["stages"].update({name: plain})


def both(pair, cache, edit):
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(pair[0]) as data:
        edit(data)
    with cache.modify_yaml(pair[1]) as data:
        edit(data)
    assert pair[1].read_text() == pair[0].read_text()


def test_a_study_s_worth_of_stage_updates_gives_dvc_s_file_and_parses_once(pair, parses, lock_text):
    cache = lockfile.LockfileCache()
    names = list(yaml.safe_load(lock_text)["stages"])
    for i, name in enumerate([names[0], names[5], names[-1], names[5], "a_new_stage@x"]):
        both(pair, cache, lambda d: rerun(d, name, md5=f"{i:032d}"))
    assert os.path.abspath(pair[1]) in cache.entries and not cache.whole
    assert parses.count(pair[1]) == 1               # the first call only: then its own text each time
    assert "  a_new_stage@x:\n" in pair[1].read_text()


def test_a_removed_stage_and_an_entry_changed_in_place_are_dumped_anew(pair):
    cache = lockfile.LockfileCache()
    both(pair, cache, lambda d: rerun(d, next(iter(d["stages"]))))
    both(pair, cache, lambda d: d["stages"].pop(list(d["stages"])[3]))
    both(pair, cache, lambda d: d["stages"][list(d["stages"])[2]]["outs"][0].update(md5="f" * 32))
    assert "f" * 32 in pair[1].read_text()


def test_text_written_by_another_process_is_parsed_again(pair, parses):
    from dvc.utils.serialize import modify_yaml

    cache = lockfile.LockfileCache()
    with cache.modify_yaml(pair[1]) as data:
        rerun(data, next(iter(data["stages"])))
    with modify_yaml(pair[1]) as data:              # e.g. `dvc commit` in another terminal
        rerun(data, list(data["stages"])[1], md5="e" * 32)
    with cache.modify_yaml(pair[1]) as data:
        assert data["stages"][list(data["stages"])[1]]["outs"][0]["md5"] == "e" * 32
    assert parses.count(pair[1]) == 3


def test_a_failing_update_writes_nothing_and_is_forgotten(pair, parses):
    cache = lockfile.LockfileCache()
    with cache.modify_yaml(pair[1]) as data:
        rerun(data, next(iter(data["stages"])))
    written = pair[1].read_text()
    with pytest.raises(ValueError), cache.modify_yaml(pair[1]) as data:
        data["stages"].clear()
        raise ValueError("a stage failed to serialize")
    assert pair[1].read_text() == written
    with cache.modify_yaml(pair[1]) as data:        # parsed anew, not the cleared object
        assert len(data["stages"]) == 6
    assert parses.count(pair[1]) == 2


def test_a_missing_lock_is_created_as_dvc_creates_it(tmp_path):
    from dvc.utils.serialize import modify_yaml

    def first(data):
        data.update({"schema": "2.0"})
        data["stages"] = {"prepare": {"cmd": "python stages/prepare.py", "outs": [{"path": "data", "md5": "1"}]}}

    paths = [tmp_path / "a" / "dvc.lock", tmp_path / "b" / "dvc.lock"]
    for p in paths:
        p.parent.mkdir()
    both(paths, lockfile.LockfileCache(), first)


@pytest.fixture
def notes(monkeypatch):
    """What telekd.lockfile logs through DVC's logger (a child of "dvc", so `dvc -q` hides it as it hides DVC's)."""
    said = []
    assert lockfile._log.name.startswith("dvc.")
    monkeypatch.setattr(lockfile._log, "info", lambda msg, *args: said.append(msg % args))
    return said


def test_an_entry_by_entry_dump_that_differs_is_dropped_for_whole_dumps(pair, monkeypatch, notes):
    real = lockfile._dumps

    def off(data):                                   # an entry's text that a whole dump would not contain
        text = real(data)
        return text + "    # drift\n" if set(data) == {"stages"} and len(data["stages"]) == 1 else text

    monkeypatch.setattr(lockfile, "_dumps", off)
    monkeypatch.setattr(lockfile, "_stands_alone", lambda text: True)
    cache = lockfile.LockfileCache()
    both(pair, cache, lambda d: rerun(d, next(iter(d["stages"]))))
    both(pair, cache, lambda d: rerun(d, list(d["stages"])[1]))
    assert cache.whole == {os.path.abspath(pair[1])}
    assert len(notes) == 1 and "whole after each stage" in notes[0]


def test_objects_shared_between_entries_are_dumped_whole_with_dvc_s_anchors(pair, parses):
    """DVC's params reader hands the same mapping to every stage that reads a YAML anchor (or a section and its key):
    ruamel writes &id001 / *id001 numbered across the file, which entries dumped one by one would restart."""
    cache = lockfile.LockfileCache()
    shared = {"layers": [8, 8], "lr": 0.1}

    def share(data):
        for name in list(data["stages"])[:3]:
            rerun(data, name)
            data["stages"][name]["params"] = {"params.yaml": {"base": shared}}

    for _ in range(2):
        both(pair, cache, share)
    assert "&id001" in pair[1].read_text() and "*id001" in pair[1].read_text()
    assert parses.count(pair[1]) == 2                       # nothing kept: parsed each time, as DVC does


def test_a_tuple_shared_between_entries_is_dumped_whole_with_dvc_s_anchors(pair):
    """params.py values reach DVC as Python objects: a tuple read by two stages is one object, which ruamel anchors
    as it does a shared mapping (a second review's input: `params: [D, D.t]` in two stages of params.py)."""
    cache = lockfile.LockfileCache()

    def share(i):
        def edit(data):
            name = list(data["stages"])[i]
            rerun(data, name)
            t = (i, 2)                              # the stage's own tuple, twice in its entry
            data["stages"][name]["params"] = {"params.py": {"D": {"t": t, "a": 3}, "D.t": t}}
        return edit

    both(pair, cache, share(0))                     # one anchored entry: the whole-dump check passes
    both(pair, cache, share(1))                     # a second one: &id002 in a whole dump, not &id001 again
    assert "&id002" in pair[1].read_text()
    yaml.load(pair[1].read_text(), Loader=yaml.CSafeLoader)   # valid: no anchor twice


def test_an_entry_that_ends_the_document_is_dumped_whole(pair):
    """A keep-chomping block scalar (`|+`) last in the file makes ruamel end the document with `...`: that entry's
    own text carries the marker, which a stage appended after it would follow (a second review's input)."""
    from ruamel.yaml.scalarstring import LiteralScalarString

    def keep_chomping_last(data):
        rerun(data, "prepare")
        data["stages"]["z"] = {"cmd": LiteralScalarString("echo z > oz\n\n")}

    cache = lockfile.LockfileCache()
    both(pair, cache, keep_chomping_last)
    assert pair[1].read_text().endswith("...\n")
    both(pair, cache, lambda d: rerun(d, "n@appended"))
    assert "\n...\n" not in pair[1].read_text()


def test_an_entry_whose_text_does_not_round_trip_is_parsed_again_as_dvc_does(pair, parses):
    """U+0085 (NEL) in a param: ruamel's dump of it parses back as another string, so DVC's next dump differs."""
    def first(data):
        rerun(data, "prepare")
        data["stages"]["prepare"]["params"] = {"params.yaml": {"sep": "a\x85b"}}

    cache = lockfile.LockfileCache()
    both(pair, cache, first)
    both(pair, cache, lambda d: rerun(d, "base_models"))
    both(pair, cache, lambda d: rerun(d, "sft@llama"))
    assert parses.count(pair[1]) == 2          # again after the write that did not round-trip; its text then does


def test_a_comment_at_the_top_is_kept_in_every_file_and_after_every_parse(tmp_path, pair, lock_text, notes):
    """The entry-by-entry check is made per file and again after each parse: a comment another writer adds later,
    or one in a second dvc.lock (a pipeline in a subfolder), is written back as DVC writes it."""
    from dvc.utils.serialize import modify_yaml

    cache = lockfile.LockfileCache()
    both(pair, cache, lambda d: rerun(d, "prepare"))          # checked: entry by entry from here on
    for p in pair:
        p.write_text("# kept by DVC\n" + p.read_text())
    both(pair, cache, lambda d: rerun(d, "base_models"))
    both(pair, cache, lambda d: rerun(d, "sft@llama"))
    sub = [tmp_path / "dvc" / "sub" / "dvc.lock", tmp_path / "ours" / "sub" / "dvc.lock"]
    for p in sub:
        p.parent.mkdir()
        p.write_text("# a subfolder's pipeline\n" + lock_text)
    both(sub, cache, lambda d: rerun(d, "prepare"))
    assert pair[1].read_text().startswith("# kept by DVC\n") and sub[1].read_text().startswith("# a subfolder")
    assert sum("whole after each stage" in n for n in notes) == 2
    with modify_yaml(pair[0]) as data:                       # DVC's own next write: the same text again
        rerun(data, "sft@mistral")
    with cache.modify_yaml(pair[1]) as data:
        rerun(data, "sft@mistral")
    assert pair[1].read_text() == pair[0].read_text()


def test_dvc_repro_with_anchored_params_writes_dvc_s_lock(tmp_path):
    """End to end, a toy pipeline whose params.yaml merges an anchor (DVC then shares the mapping between stages):
    `python -m telekd.lockfile repro` and `dvc repro` write the same dvc.lock, and DVC reads it back."""
    import subprocess
    import sys

    params = "base: &base\n  layers: [8, 8]\n  lr: 0.1\ntrain:\n  <<: *base\n  lr: 0.2\n"
    pipeline = ("stages:\n  prep: {cmd: echo 0 > p0.txt, params: [base, train], outs: [p0.txt]}\n"
                "  train: {cmd: cat p0.txt > p1.txt, deps: [p0.txt], params: [base, train], outs: [p1.txt]}\n")
    locks = []
    for name, dvc in (("dvc", ["dvc"]), ("ours", [sys.executable, "-m", "telekd.lockfile"])):
        repo = tmp_path / name
        repo.mkdir()
        (repo / "params.yaml").write_text(params)
        (repo / "dvc.yaml").write_text(pipeline)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], [*dvc, "repro", "-q"], ["dvc", "status", "-q"]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        locks.append((repo / "dvc.lock").read_text())
    assert locks[1] == locks[0]
    assert "&id001" in locks[0]


def test_install_routes_dvc_lock_only_and_refuses_a_second_install(tmp_path, monkeypatch, parses):
    import dvc.dvcfile

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)   # restored after the test
    cache = lockfile.install()
    lock, other = tmp_path / "dvc.lock", tmp_path / "dvc.yaml"
    for p in (lock, other):
        p.write_text("schema: '2.0'\nstages:\n  a:\n    cmd: echo a  # a comment DVC keeps in dvc.yaml\n")
    for _ in range(2):
        for p in (lock, other):
            with dvc.dvcfile.modify_yaml(p) as data:
                data["stages"]["a"]["cmd"] = "echo b"
    assert parses.count(lock) == 1 and parses.count(other) == 2
    assert os.path.abspath(lock) in cache.written and os.path.abspath(other) not in cache.written
    assert "# a comment DVC keeps" in other.read_text()
    with pytest.raises(RuntimeError, match="run plain `dvc`"):
        lockfile.install()


def test_the_object_handed_back_equals_a_fresh_parse(pair):
    from dvc.utils.serialize._yaml import parse_yaml_for_update

    cache = lockfile.LockfileCache()
    with cache.modify_yaml(pair[1]) as data:
        rerun(data, next(iter(data["stages"])))
    with cache.modify_yaml(pair[1]) as data:
        kept = copy.deepcopy(data)
    assert kept == parse_yaml_for_update(pair[1].read_text(), "dvc.lock")


@pytest.mark.slow
def test_the_reduced_study_s_dvc_lock_is_what_dvc_writes(study):
    """The reduced study ran as `make repro` runs it, its dvc.lock written through the cache after every stage: DVC's
    own dump of that data, as plain dicts (as dump_stages hands it new entries) or as parsed, gives the same text."""
    from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml_for_update

    text = study["lock"]
    assert text.count("\n  kd@") >= 2 and "schema: '2.0'\nstages:\n" in text
    assert dumps_yaml(json.loads(json.dumps(parse_yaml_for_update(text, "dvc.lock")))) == text
    assert dumps_yaml(parse_yaml_for_update(text, "dvc.lock")) == text
