"""DVC with dvc.lock kept parsed between stages: the same file, without re-reading and re-dumping all of it per stage.

After every stage it runs, DVC re-reads dvc.lock with ruamel's pure-Python round-trip parser and dumps all of it
again (`dvc.dvcfile.Lockfile.dump_stages` -> `dvc.utils.serialize.modify_yaml`). On the study's lock (104 stages,
9,000 lines) that is 0.9 s of parsing and 0.5 s of dumping per stage, about 150 s of a 10-minute study, growing with
the square of the stage count (treeverse/dvc#10629). Within one DVC process, `install()` replaces the
`modify_yaml` that dvc.dvcfile calls, for files named dvc.lock only, by `LockfileCache.modify_yaml`, which
- skips the parse when the file holds exactly the text this process last wrote there: it hands DVC back the very
  object whose dump that text is (a parse of it would give equal values);
- dumps each stage's entry on its own and reuses the text of the entries that are the same objects with the same
  contents (`repr`) as at the last dump; DVC replaces the entry of each stage it runs.
What it writes is ruamel's dump through DVC's own dumper (`dvc.utils.serialize._yaml._dump`). The entry-by-entry
text is used only after it has reproduced a whole dump byte for byte in this process; if it ever doesn't, the
process goes on dumping whole and says so once on stderr. tests/test_lockfile.py checks both against DVC's own
modify_yaml on the study's dvc.lock.

    python -m telekd.lockfile repro                            # = dvc repro
    python -m telekd.forkserver python -m telekd.lockfile repro # what `make repro` runs
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

LOCK_FILE = "dvc.lock"          # dvc.dvcfile.LOCK_FILE
_STAGES = "stages:\n"


def _dumps(data: Any) -> str:
    from dvc.utils.serialize._yaml import _dump

    stream = io.StringIO()
    _dump(data, stream)
    return stream.getvalue()


@dataclass
class _Entry:
    """One stage's entry as last dumped: the object, its repr then, and its text under `stages:`."""
    obj: Any
    contents: str
    text: str


@dataclass
class LockfileCache:
    """What one process last wrote to each dvc.lock (the text and the object dumped), and its stages' texts."""
    written: dict[str, tuple[str, Any]] = field(default_factory=dict)   # absolute path -> (text, data)
    entries: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # absolute path -> stage name -> entry
    by_entry: bool | None = None    # None: not checked against a whole dump yet; False: a check failed

    @contextmanager
    def modify_yaml(self, path, fs=None):
        """DVC's `modify_yaml(path, fs)` for a dvc.lock: yields its data (a ruamel round-trip mapping), then writes it.

        Raises what DVC's would (YAMLFileCorruptedError for a corrupt file). If the body raises, nothing is written
        and the data is forgotten, so the next call parses the file again.
        """
        from dvc.utils.serialize._common import _dump_data, _load_data
        from dvc.utils.serialize._yaml import parse_yaml_for_update

        key = os.path.abspath(os.fspath(path))
        exists = fs.exists(os.fspath(path)) if fs else os.path.exists(path)
        text = _load_data(path, parser=lambda text, _: text, fs=fs) if exists else None   # DVC's reading, unparsed
        last = self.written.pop(key, None)
        if text is None:
            data = {}
        elif last is not None and last[0] == text:
            data = last[1]
        else:
            data = parse_yaml_for_update(text, path)
            self.entries.pop(key, None)
        yield data
        out = self.dumps(key, data)
        _dump_data(path, out, dumper=lambda text, stream: stream.write(text), fs=fs)
        self.written[key] = (out, data)

    def dumps(self, key: str, data: Any) -> str:
        """ruamel's dump of `data` (DVC's dumper), from the texts of unchanged stage entries where it can."""
        stages = data.get("stages") if isinstance(data, dict) else None
        if self.by_entry is False or not stages or not isinstance(stages, dict) or list(data) != ["schema", "stages"]:
            self.entries.pop(key, None)
            return _dumps(data)
        old = self.entries.get(key, {})
        new = {}
        for name, obj in stages.items():
            entry = old.get(name)
            contents = repr(obj)
            if entry is None or entry.obj is not obj or entry.contents != contents:
                text = _dumps({"stages": {name: obj}})
                assert text.startswith(_STAGES), text[:40]
                entry = _Entry(obj, contents, text[len(_STAGES):])
            new[name] = entry
        out = _dumps({"schema": data["schema"]}) + _STAGES + "".join(e.text for e in new.values())
        if not self.by_entry:
            whole = _dumps(data)
            if out != whole:
                print("telekd.lockfile: an entry-by-entry dump of dvc.lock differed from ruamel's whole dump; "
                      "dumping it whole from now on (slower, same file)", file=sys.stderr)
                self.by_entry = False
                self.entries.pop(key, None)
                return whole
            self.by_entry = True
        self.entries[key] = new
        return out


def install(cache: LockfileCache | None = None) -> LockfileCache:
    """Make dvc.dvcfile write dvc.lock through `cache` (a new one by default) in this process; other files as before.

    Raises RuntimeError if dvc.dvcfile no longer calls a `modify_yaml` (a DVC this module does not know).
    """
    import dvc.dvcfile
    from dvc.utils.serialize import modify_yaml as dvc_modify_yaml

    if getattr(dvc.dvcfile, "modify_yaml", None) is not dvc_modify_yaml:
        raise RuntimeError("dvc.dvcfile.modify_yaml is missing or already replaced: telekd.lockfile knows DVC 3.67's "
                           "dvcfile; run plain `dvc` instead")
    cache = cache or LockfileCache()

    @contextmanager
    def modify_yaml(path, fs=None):
        if os.path.basename(os.fspath(path)) != LOCK_FILE:
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
