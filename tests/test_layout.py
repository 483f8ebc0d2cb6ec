"""Cell and run names: what dvc.yaml's matrix suffixes and the stages agree on."""

import pytest

from telekd.layout import Cell


def test_cell_and_run_names_round_trip():
    cell = Cell.parse("mistral-sft-base-dskd")
    assert cell.seed is None and cell.name == cell.study == "mistral-sft-base-dskd"
    run = cell.run(2)
    assert run.name == "mistral-sft-base-dskd-s2" and run.study == cell.name
    assert Cell.parse(run.name) == run
    assert run.student_dir == "models/kd/mistral-sft-base-dskd-s2"
    assert run.teacher_dir == "models/sft/mistral" and run.student_init_dir == "models/base/student"


@pytest.mark.parametrize("bad", ["llama-sft-base", "llama-sft-base-dskd-2", "llama-sft-base-dskd-s1-x", "a-b-c-d-sx"])
def test_bad_cell_names_fail_naming_the_format(bad):
    with pytest.raises(ValueError, match=r"teacher-teacher_sft-student_sft-alg\[-s<seed>\]"):
        Cell.parse(bad)


@pytest.mark.parametrize("argv", [["stages/vanilla.py", "--cell", "llama-base-vanilla"],
                                  ["stages/dskd.py", "--cell", "llama-sft-base-dskd-s1-x"],
                                  ["stages/uld.py", "--cell", "llama-sft-base-dskd-s0"],
                                  ["stages/generate.py", "--cell", "llama-x"],
                                  ["stages/generate.py", "--ref", "student"]])
def test_a_stage_refuses_a_bad_cell_in_one_line(argv):
    """A malformed --cell/--ref (or another algorithm's cell) ends the stage with one error line, no traceback, before
    params or models are read."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert any(s in last for s in ("teacher-teacher_sft-student_sft-alg", "role-stage", "run stages/dskd.py")), last
