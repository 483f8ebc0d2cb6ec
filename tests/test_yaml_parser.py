"""DVC's YAML loads with the C parser (ruamel.yaml.clib, requirements.txt) read the same values as ruamel's
pure-Python parser: params.yaml, dvc.yaml and dvc.lock as DVC parses them (typ="safe", YAML 1.2), and the YAML 1.2
scalars whose reading differs from YAML 1.1 (`no`, `on`, `0o17`). The C parser only makes the parse faster:
DVC parses params.yaml once per stage (status and repro) and dvc.lock on every run.
"""

from __future__ import annotations

import pytest
from ruamel.yaml import YAML

from conftest import ROOT

C = pytest.importorskip("_ruamel_yaml", reason="ruamel.yaml.clib is not installed (requirements.txt pins it)")

SCALARS = "a: no\nb: yes\nc: on\nd: 0o17\ne: 017\nf: 1_000\ng: 1e3\nh: .inf\ni: ~\nj: 2026-11-30\n"


def parse(text: str, pure: bool):
    """`text` parsed as DVC does (dvc.utils.serialize.parse_yaml: YAML(typ="safe")), by the pure or the C parser."""
    y = YAML(typ="safe", pure=pure)
    assert (y.Parser is C.CParser) == (not pure)
    return y.load(text)


def test_dvc_default_load_uses_the_c_parser():
    assert YAML(typ="safe").Parser is C.CParser


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "dvc.lock"])
def test_c_parser_reads_the_project_files_as_the_pure_one(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    assert parse(text, pure=False) == parse(text, pure=True)


def test_c_parser_keeps_yaml_1_2_scalars():
    expected = {"a": "no", "b": "yes", "c": "on", "d": 15, "e": 17, "f": 1000, "g": 1000.0, "h": float("inf"),
                "i": None}
    for pure in (True, False):
        got = parse(SCALARS, pure)
        assert {k: v for k, v in got.items() if k != "j"} == expected and str(got["j"]) == "2026-11-30"
