"""params.yaml, validated: a wrong key or value fails in one line before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Alg = Literal["vanilla", "dskd", "uld"]
Divergence = Literal[
    "forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "tvd", "adaptive_kl"
]
Role = Literal["llama", "mistral", "student"]
Teacher = Literal["llama", "mistral"]
Stage = Literal["base", "sft"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(Strict):
    teachers: list[Teacher] = Field(min_length=1)
    teacher_sft: list[Stage] = Field(min_length=1)
    student_sft: list[Stage] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"needs distinct non-negative seeds, got {v}")
        return v


class Data(Strict):
    source: str
    on_invalid: Literal["error", "skip"] = "error"
    impossible: Literal["drop", "keep"] = "drop"
    no_answer_text: str = Field(default="unanswerable", min_length=1)  # target and reference of kept impossible questions
    max_train: Optional[int] = Field(default=None, ge=1)
    max_test: Optional[int] = Field(default=None, ge=1)


class Split(Strict):
    group_by: Literal["source", "doc_id"] = "source"
    seed: int = 0
    fractions: dict[Literal["train", "validation", "test"], float]

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v):
        if set(v) != {"train", "validation", "test"} or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError("needs train, validation and test fractions that sum to 1")
        return v


class Prompt(Strict):
    system: str


class BaseModels(Strict):
    vocab_size: int = Field(ge=300)
    pretrain_steps: dict[Role, int]
    pretrain_lr: float = Field(gt=0)
    pretrain_batch: int = Field(ge=1)
    pretrain_seq_len: int = Field(ge=16)
    threads: int = Field(default=1, ge=1)   # torch CPU threads while building: fixed, so weights do not depend on the machine


class SFT(Strict):
    models: list[Role]
    lora_dropout: float = Field(ge=0, lt=1)
    lora_targets: list[str] = Field(min_length=1)
    weight_decay: float = Field(ge=0)
    lr_scheduler: str
    max_grad_norm: float = Field(gt=0)
    eval_steps: int = Field(ge=1)


class TeacherCache(Strict):
    top_k: int = Field(ge=1)
    hidden: bool = True


class KD(Strict):
    alg: Alg
    versus: Alg
    kd_rate: float = Field(ge=0, le=1)
    temperature: float = Field(gt=0)
    divergence: Divergence
    skew_lambda: float = Field(ge=0, le=1)
    akl_alpha: float = Field(ge=0, le=1)
    student_lora: bool = False
    vocab_mismatch: Literal["align", "error"] = "align"
    use_cache: bool = True
    save_steps: int = Field(default=10, ge=0)   # optimizer steps between resumable checkpoints (0: only on SIGTERM)


class DSKD(Strict):
    projector_lr: float = Field(gt=0)


class ULD(Strict):
    weight: float = Field(gt=0)


class Generate(Strict):
    do_sample: bool = False
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)


class EvalEmbed(Strict):
    model: str


class EvalLLM(Strict):
    backend: Literal["local", "openai"]
    max_retries: int = Field(default=2, ge=0, le=10)
    timeout_s: float = Field(default=120.0, gt=0)
    base_url: Optional[str] = None          # openai backend: e.g. http://127.0.0.1:8011/v1
    model: Optional[str] = None             # openai backend: the served model id
    api_key_env: str = Field(default="TELEKD_JUDGE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_new_tokens: int = Field(default=1024, ge=16)

    @model_validator(mode="after")
    def _openai_endpoint(self):
        if self.backend == "openai":
            missing = [f"eval_llm.{k}" for k in ("base_url", "model") if not getattr(self, k)]
            if missing:
                raise ValueError(f"backend openai needs {' and '.join(missing)}")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url {self.base_url!r} is not an http(s) URL")
        return self


class Stats(Strict):
    alpha: float = Field(gt=0, lt=1)
    alternative: Literal["greater", "two-sided", "less"]
    correction: Literal["holm", "bonferroni", "fdr_bh", "none"]
    bootstrap_resamples: int = Field(ge=100)


class ModelSource(Strict):
    """Where a model comes from: built here (`build`), a local `path`, or a `hub` id at a pinned `revision`."""

    build: Optional[Role] = None
    path: Optional[str] = None
    hub: Optional[str] = None
    revision: Optional[str] = None
    chat_template: Literal["llama2", "mistral", "own"] = "own"

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.build, self.path, self.hub)) != 1:
            raise ValueError("give exactly one of build, path or hub")
        if self.hub and not self.revision:
            raise ValueError(f"hub model {self.hub} needs a pinned revision (a commit hash)")
        return self


class Architecture(Strict):
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    mlp: int = Field(ge=8)


class Train(Strict):
    max_length: int = Field(ge=16)
    max_prompt_length: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    epochs: float = Field(gt=0)
    lr: float = Field(gt=0)
    lora_r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length (room for the answer)")
        return self


class GenerateProfile(Strict):
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)


class EvalProfile(Strict):
    bertscore_model: str
    judge_model: str
    # scale-dependent judge settings (moved from eval_llm: a profile carries what differs at its scale)
    max_samples: Optional[int] = Field(default=None, ge=1)  # judge the first N question ids (null = all)
    max_chars: int = Field(default=100, ge=8, le=4000)      # bound on every string of a judge answer
    max_items: int = Field(default=3, ge=1, le=64)          # bound on every list of a judge answer


class ProfileData(Strict):
    source: Optional[str] = None   # the data this profile's study is defined on (null: any data.source)


class Profile(Strict):
    dtype: Literal["float32", "bfloat16", "float16"]
    models: dict[Role, ModelSource]
    architectures: dict[Role, Architecture]
    train: Train
    generate: GenerateProfile
    eval: EvalProfile
    data: ProfileData = ProfileData()


class Models(Strict):
    trust_remote_code: bool = False


class Params(Strict):
    profile: str
    seed: int
    launcher: str = Field(default="python", min_length=1)
    models: Models
    grid: Grid
    data: Data
    split: Split
    prompt: Prompt
    base_models: BaseModels
    sft: SFT
    teacher_cache: TeacherCache
    kd: KD
    vanilla: dict = {}
    dskd: DSKD
    uld: ULD
    generate: Generate
    eval_ngram: dict = {}
    eval_embed: EvalEmbed
    eval_llm: EvalLLM
    stats: Stats
    profiles: dict[str, Profile]

    @model_validator(mode="after")
    def _profile_exists(self):
        if self.profile not in self.profiles:
            raise ValueError(f"profile: {self.profile!r} is not one of the profiles: {', '.join(sorted(self.profiles))}")
        missing = {"llama", "mistral", "student"} - set(self.profiles[self.profile].models)
        if missing:
            raise ValueError(f"profiles.{self.profile}.models: lacks {', '.join(sorted(missing))}")
        want = self.profiles[self.profile].data.source
        if want is not None and self.data.source != want:
            raise ValueError(f"data.source {self.data.source} is not profile {self.profile}'s data {want}: run "
                             f"dvc exp run -S profile={self.profile} -S data.source={want} (DVC tracks data.source as a "
                             "dependency, so the profile names it and this check keeps them together)")
        return self

    @property
    def active(self) -> Profile:
        return self.profiles[self.profile]


class ParamsError(SystemExit, ValueError):
    """A bad params.yaml. Also a SystemExit: a stage that does not catch it ends with these lines, no traceback."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError with one line per bad key."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("int_parsing", "float_parsing", "bool_parsing", "string_type", "int_type", "float_type"):
                msg += f", got {err['input']!r:.60}"
            lines.append(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")
        raise ParamsError("\n".join(lines)) from None
