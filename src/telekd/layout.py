"""Where every artefact of the study lives (one place, so stages and dvc.yaml agree)."""

from __future__ import annotations

from dataclasses import dataclass

PREPARED = "data/prepared"
BASE = "models/base"
SFT = "models/sft"
KD = "models/kd"
CACHE = "cache/teacher"
PREDICTIONS = "predictions"
SCORES = "scores"
METRICS = "metrics"
LOGS = "logs"


def split_file(split: str) -> str:
    return f"{PREPARED}/{split}.jsonl"


def model_dir(role: str, stage: str) -> str:
    """Checkpoint of `role` (llama | mistral | student) at `stage` (base | sft)."""
    return f"{BASE}/{role}" if stage == "base" else f"{SFT}/{role}"


@dataclass(frozen=True)
class Cell:
    """One cell of the study; its name is the DVC matrix suffix, e.g. llama-sft-base-dskd."""

    teacher: str
    teacher_sft: str
    student_sft: str
    alg: str

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.teacher_sft}-{self.student_sft}-{self.alg}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        parts = name.split("-")
        if len(parts) != 4:
            raise ValueError(f"cell {name!r} is not teacher-teacher_sft-student_sft-alg, e.g. llama-sft-base-dskd")
        return cls(*parts)

    @property
    def teacher_dir(self) -> str:
        return model_dir(self.teacher, self.teacher_sft)

    @property
    def student_init_dir(self) -> str:
        return model_dir("student", self.student_sft)

    @property
    def student_dir(self) -> str:
        return f"{KD}/{self.name}"
