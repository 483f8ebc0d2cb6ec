"""telekd.lockfile writes dvc.lock byte for byte as DVC's own modify_yaml does, on the study's lock.

Each test replays what `Lockfile.dump_stages` does after a stage (replace the stage's entry by a new plain dict) once
through DVC's modify_yaml and once through the cache, on two copies of a slice of the committed dvc.lock (its first
12 stages), and compares the files. tests/conftest.py runs the reduced studies through it too.
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
    """The committed dvc.lock cut after its 12th stage (prepare to generate_ref, the prompt's folded lines in)."""
    lines = (ROOT / "dvc.lock").read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"  \S", line)]
    return "".join(lines[:starts[12]])


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
    assert cache.by_entry is True
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
        assert len(data["stages"]) == 12
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


def test_an_entry_by_entry_dump_that_differs_is_dropped_for_whole_dumps(pair, monkeypatch, capsys):
    real = lockfile._dumps

    def off(data):                                   # an entry's text that a whole dump would not contain
        text = real(data)
        return text + "    # drift\n" if set(data) == {"stages"} else text

    monkeypatch.setattr(lockfile, "_dumps", off)
    cache = lockfile.LockfileCache()
    both(pair, cache, lambda d: rerun(d, next(iter(d["stages"]))))
    both(pair, cache, lambda d: rerun(d, list(d["stages"])[1]))
    assert cache.by_entry is False
    assert "dumping it whole from now on" in capsys.readouterr().err


def test_install_routes_dvc_lock_only_and_refuses_a_second_install(tmp_path, monkeypatch, parses):
    import dvc.dvcfile

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)   # restored after the test
    cache = lockfile.install()
    lock, other = tmp_path / "dvc.lock", tmp_path / "dvc.yaml"
    for p in (lock, other):
        p.write_text("stages:\n  a:\n    cmd: echo a  # a comment DVC keeps in dvc.yaml\n")
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
