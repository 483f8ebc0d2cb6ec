"""DVC with dvc.lock kept parsed between stages: the same file, without re-reading and re-dumping all of it per stage.

After every stage it runs, DVC re-reads dvc.lock with ruamel's pure-Python round-trip parser and dumps all of it
again (`dvc.dvcfile.Lockfile.dump_stages` -> `dvc.utils.serialize.modify_yaml`). On the study's lock (104 stages,
9,000 lines) that is 0.9 s of parsing and 0.5 s of dumping per stage, about 150 s of a 10-minute study, growing with
the square of the stage count (treeverse/dvc#10629). Within one DVC process, `install()` replaces the
`modify_yaml` that dvc.dvcfile calls, for files named dvc.lock only, by `LockfileCache.modify_yaml`, which
- skips the parse when the file holds exactly the text this process last wrote there: it hands DVC back the very
  object whose dump that text is, kept only when DVC's parse of the text would dump the same text again;
- dumps each stage's entry on its own and reuses the text of the entries that are the same objects with the same
  contents (`repr`) as at the last dump (DVC replaces the entry of each stage it runs).
The file is DVC's own dump (`dvc.utils.serialize._yaml._dump`), read and written by DVC's `_load_data` and
`_dump_data`. Entry by entry is used only where it cannot differ: the data is {schema, stages} alone; no object
that ruamel would alias is reached twice (ruamel numbers anchors across the file: DVC shares a params mapping
between stages that read a YAML anchor, params.py tuples too); each entry's text stands alone (indented through,
so no `...` or `---` marker, and round-tripping); and for data just parsed (or new) the entry-by-entry text equals
the whole dump (a comment at the top of the file would not), else that file is dumped whole, as DVC does, for the
rest of the process, which DVC's logger says once (hidden by -q). tests/test_lockfile.py compares with DVC's own
modify_yaml, and with `dvc repro` end to end.

    python -m telekd.lockfile repro                            # = dvc repro
    python -m telekd.forkserver python -m telekd.lockfile repro # what `make repro` runs
"""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_STAGES = "stages:\n"
_PLAIN = (str, int, float, bool, bytes, type(None))
_log = logging.getLogger("dvc.telekd_lockfile")    # under DVC's logger: quiet with -q, as DVC's own messages


def _dumps(data: Any) -> str:
    from dvc.utils.serialize._yaml import _dump

    stream = io.StringIO()
    _dump(data, stream)
    return stream.getvalue()


def _round_trips(text: str) -> bool:
    """Whether DVC's parse of `text` dumps as `text` again (not so for some exotic strings, e.g. one holding U+0085)."""
    from dvc.dvcfile import LOCK_FILE
    from dvc.utils.serialize._yaml import parse_yaml_for_update

    return _dumps(parse_yaml_for_update(text, LOCK_FILE)) == text


def _aliasable(obj: Any) -> bool:
    """Whether ruamel's round-trip representer writes `obj` once with an anchor and then as aliases if it meets it
    twice: anything but None, (), str, bytes, bool, int and float, and those too when they carry an anchor of
    their own (ruamel.yaml.representer.RoundTripRepresenter.ignore_aliases, negated)."""
    from ruamel.yaml.anchor import Anchor

    anchor = getattr(obj, Anchor.attrib, None)
    if anchor is not None and anchor.value is not None:
        return True
    return not (obj is None or isinstance(obj, (bytes, str, bool, int, float)) or (isinstance(obj, tuple) and not obj))


def _shares_objects(data: Any) -> bool:
    """Whether an object ruamel would alias is reached twice in `data` (a params mapping DVC hands two stages, a
    tuple of params.py): ruamel then writes an anchor and aliases (&id001, *id001) numbered across the whole
    document, so no entry can be dumped on its own."""
    seen, todo = set(), [data]
    while todo:
        obj = todo.pop()
        if type(obj) in _PLAIN:                   # most of a lock: no anchor possible, nothing inside
            continue
        if _aliasable(obj):
            if id(obj) in seen:
                return True
            seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
    return False


def _stands_alone(text: str) -> bool:
    """Whether an entry's text holds nothing of the document around it: every line inside the entry (indented), so
    no end marker (`...`, which ruamel writes after a keep-chomping `|+` scalar that ends a document), start marker
    or top-level comment; and DVC's parse of it dumps it again (not so for some strings, e.g. one holding U+0085)."""
    return all(line.startswith(" ") or not line for line in text[len(_STAGES):].split("\n")) and _round_trips(text)


@dataclass
class _Entry:
    """One stage's entry as last dumped: the object, its repr then, and its text under `stages:`."""
    obj: Any
    contents: str
    text: str


@dataclass
class LockfileCache:
    """What one process last wrote to each dvc.lock (text and object), and the texts of its stages' entries."""
    written: dict[str, tuple[str, Any]] = field(default_factory=dict)   # absolute path -> (text, data)
    entries: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # absolute path -> stage name -> entry
    whole: set[str] = field(default_factory=set)    # paths whose entry-by-entry dump failed its check: dumped whole

    @contextmanager
    def modify_yaml(self, path, fs=None):
        """DVC's `modify_yaml(path, fs)` for a dvc.lock: yields its data (a ruamel round-trip mapping), then writes it.

        Raises what DVC's would (YAMLFileCorruptedError for a corrupt file, EncodingError). If the body raises,
        nothing is written and the data is forgotten, so the next call parses the file again.
        """
        from dvc.utils.serialize._common import _dump_data, _load_data
        from dvc.utils.serialize._yaml import parse_yaml_for_update

        key = os.path.abspath(os.fspath(path))
        exists = fs.exists(os.fspath(path)) if fs else os.path.exists(path)
        text = _load_data(path, parser=lambda text, _: text, fs=fs) if exists else None   # DVC's reading, unparsed
        last = self.written.pop(key, None)
        if last is not None and last[0] == text:
            data = last[1]
        else:
            data = parse_yaml_for_update(text, path) if text is not None else {}
            self.entries.pop(key, None)
        yield data
        out, stands_for_text = self.dumps(key, data)
        _dump_data(path, out, dumper=lambda text, stream: stream.write(text), fs=fs)
        if stands_for_text:
            self.written[key] = (out, data)

    def dumps(self, key: str, data: Any) -> tuple[str, bool]:
        """ruamel's dump of `data` (DVC's dumper), from the texts of unchanged stage entries where it can; and whether
        `data` may stand for a parse of that text next time (DVC's parse of it would dump the same text).

        Entry by entry only when: data is {schema, stages} alone; no object ruamel would alias is reached twice (no
        anchors); every entry's text stands alone (`_stands_alone`); and, for data not yet checked (just parsed or
        new), the result equals the whole dump (which a comment at the top of the file, for one, would not).
        Otherwise the whole dump, and no reuse.
        """
        stages = data.get("stages") if isinstance(data, dict) else None
        if (key in self.whole or not stages or not isinstance(stages, dict) or list(data) != ["schema", "stages"]
                or _shares_objects(data)):
            return self._whole_dump(key, data)
        old = self.entries.get(key)               # None: this data has not been checked against a whole dump
        new = {}
        for name, obj in stages.items():
            entry = (old or {}).get(name)
            contents = repr(obj)
            if entry is None or entry.obj is not obj or entry.contents != contents:
                text = _dumps({"stages": {name: obj}})
                if not _stands_alone(text):
                    return self._whole_dump(key, data)
                entry = _Entry(obj, contents, text[len(_STAGES):])
            new[name] = entry
        out = _dumps({"schema": data["schema"]}) + _STAGES + "".join(e.text for e in new.values())
        if old is None and out != (whole := _dumps(data)):
            _log.info("telekd.lockfile: writing %s whole after each stage, as DVC does: it holds what an "
                      "entry-by-entry dump does not reproduce (a comment, flow style)", key)
            self.whole.add(key)
            return self._whole_dump(key, data, whole)
        self.entries[key] = new
        return out, True

    def _whole_dump(self, key: str, data: Any, whole: str | None = None) -> tuple[str, bool]:
        """DVC's own whole dump of `data` (`whole` if already made), keeping nothing of it: the next write parses
        the file as DVC does."""
        self.entries.pop(key, None)
        return (_dumps(data) if whole is None else whole), False


def install(cache: LockfileCache | None = None) -> LockfileCache:
    """Make dvc.dvcfile write dvc.lock through `cache` (a new one by default) in this process; other files as before.

    Raises RuntimeError if dvc.dvcfile no longer calls a `modify_yaml` (a DVC this module does not know).
    """
    import dvc.dvcfile
    from dvc.dvcfile import is_lock_file
    from dvc.utils.serialize import modify_yaml as dvc_modify_yaml

    if getattr(dvc.dvcfile, "modify_yaml", None) is not dvc_modify_yaml:
        raise RuntimeError("dvc.dvcfile.modify_yaml is missing or already replaced: telekd.lockfile knows DVC 3.67's "
                           "dvcfile; run plain `dvc` instead")
    cache = cache or LockfileCache()

    @contextmanager
    def modify_yaml(path, fs=None):
        if not is_lock_file(os.fspath(path)):
            with dvc_modify_yaml(path, fs=fs) as data:
                yield data
        else:
            with cache.modify_yaml(path, fs=fs) as data:
                yield data

    dvc.dvcfile.modify_yaml = modify_yaml
    return cache


def main(argv: list[str]) -> int:
    """`python -m telekd.lockfile <dvc arguments>`: DVC's command line, with dvc.lock written through the cache."""
    install()
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
