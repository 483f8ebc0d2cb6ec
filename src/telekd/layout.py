"""Where every artefact of the study lives (one place, so stages and dvc.yaml agree)."""

from __future__ import annotations

from dataclasses import dataclass

PREPARED = "data/prepared"
PRETRAINED = "models/pretrained"   # <profile>/<name>: converted GGUF models (stage pretrained)
BASE = "models/base"
SFT = "models/sft"
KD = "models/kd"
CACHE = "cache/teacher"
PREDICTIONS = "predictions"
SCORES = "scores"
METRICS = "metrics"
LOGS = "logs"


def split_file(split: str) -> str:
    """The prepared split's JSONL file (train | validation | test), relative to the repository root."""
    return f"{PREPARED}/{split}.jsonl"


def model_dir(role: str, stage: str) -> str:
    """Checkpoint of `role` (llama | mistral | student) at `stage` (base | sft)."""
    return f"{BASE}/{role}" if stage == "base" else f"{SFT}/{role}"


@dataclass(frozen=True)
class Cell:
    """One cell of the study and, when `seed` is set, one training run of it.

    Names are the DVC matrix suffixes: llama-sft-base-dskd for the cell, llama-sft-base-dskd-s1 for its run with
    seed 1 (KD's batch order and projector initialisation). Every run's artefacts carry the seed.
    """

    teacher: str
    teacher_sft: str
    student_sft: str
    alg: str
    seed: int | None = None

    @property
    def study(self) -> str:
        """The cell's name without the seed: what the statistics and the report compare."""
        return f"{self.teacher}-{self.teacher_sft}-{self.student_sft}-{self.alg}"

    @property
    def name(self) -> str:
        """The run's name: the cell's name with -s<seed> when the seed is set (llama-sft-base-dskd-s0)."""
        return self.study if self.seed is None else f"{self.study}-s{self.seed}"

    def run(self, seed: int) -> "Cell":
        """The same cell at run `seed`."""
        return Cell(self.teacher, self.teacher_sft, self.student_sft, self.alg, seed)

    @classmethod
    def parse(cls, name: str) -> "Cell":
        """The cell named teacher-teacher_sft-student_sft-alg[-s<seed>]; ValueError naming the form otherwise."""
        parts = name.split("-")
        seed = None
        if len(parts) == 5 and parts[4][:1] == "s" and parts[4][1:].isdigit():
            seed = int(parts.pop()[1:])
        if len(parts) != 4:
            raise ValueError(f"cell {name!r} is not teacher-teacher_sft-student_sft-alg[-s<seed>], "
                             "e.g. llama-sft-base-dskd-s0")
        return cls(*parts, seed=seed)

    @property
    def teacher_dir(self) -> str:
        """The teacher's checkpoint folder: models/<teacher_sft>/<teacher>."""
        return model_dir(self.teacher, self.teacher_sft)

    @property
    def student_init_dir(self) -> str:
        """The student the distillation starts from: models/<student_sft>/student."""
        return model_dir("student", self.student_sft)

    @property
    def student_dir(self) -> str:
        """The distilled student this run writes: models/kd/<run name>."""
        return f"{KD}/{self.name}"
