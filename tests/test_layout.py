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
