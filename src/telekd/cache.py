"""Content-addressed teacher-output cache: the teacher runs once per checkpoint and split, not per cell and epoch.

One teacher pass writes three entries, one per algorithm, each holding only what that algorithm reads (so a
change of one algorithm's temperature leaves the other entries byte-identical, and DVC reruns none of their cells):
- `vanilla`, at the vanilla temperature T (vanilla.divergence.temperature), at every aligned answer position:
  the top-k of the teacher's tempered distribution over the student's vocabulary (teacher ids with an
  identical-string student twin) and the log of the tempered mass on everything else (`rest`: unmapped
  teacher tokens included), computed from the logits in log space (topk_targets), so
  `losses.divergence_topk` gets the k + 1 bins it needs and a tiny tail never rounds away;
- `dskd`, at DSKD's temperature (dskd.divergence.temperature), at every teacher answer position: the tempered
  top-k over the teacher's own vocabulary and its `t_rest` (DSKD's reference tempers the teacher in its
  teacher-space KL too), and the last layer's hidden states;
- `uld`, at every teacher answer position: the top-k log-probabilities at T = 1 (ULD has no temperature, as its
  reference).
An entry's address is the sha256 of everything that determines it (telekd.teacher_inputs.cache_keys): teacher
weights, the student's tokenizer, chat templates, data, lengths, dtype, top-k, and its own temperature.
The file's own sha256 is checked on every read; a corrupted entry is never used: `load_targets`
refuses it, `kd_targets` (the kd stage, through `load_or_recompute`) recomputes it with the teacher on the stage's
device and leaves the cache, a DVC output of the teacher_cache stage, as it is (`dvc repro` or `dvc checkout`
restores it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

TARGETS = "targets.safetensors"
MANIFEST = "manifest.json"
ENTRIES = ("vanilla", "dskd", "uld")
# the tensors of each entry (DSKD's also "hidden" when kept)
TENSORS = {"vanilla": ("offsets", "student_pos", "logprobs", "ids", "rest", "mapped_mass"),
           "dskd": ("t_offsets", "t_logprobs", "t_ids", "t_rest"),
           "uld": ("t_offsets", "t_logprobs1")}


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path) -> str:
    """sha256 over every file (relative name + content) of a checkpoint folder."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def key_digest(key: dict) -> str:
    """sha256 of `key` as canonical JSON (sorted keys; values JSON cannot hold are written as str)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TeacherTargets:
    """The teacher's targets on one split (shapes below; N aligned rows, Nt teacher answer rows).

    A loaded entry fills only its algorithm's fields (TENSORS); the others are None."""

    offsets: "torch.Tensor | None" = None      # [n_examples + 1] rows of example i are offsets[i]:offsets[i+1]
    student_pos: "torch.Tensor | None" = None  # [N] student logit position of each row
    logprobs: "torch.Tensor | None" = None     # [N, k] teacher log-probs at `temperature` at the student ids below
    ids: "torch.Tensor | None" = None          # [N, k] student vocabulary ids
    rest: "torch.Tensor | None" = None         # [N] log of the tempered teacher mass on every other teacher token
    mapped_mass: "torch.Tensor | None" = None  # [N] teacher mass (T = 1) on ids with a student twin (1: one vocabulary)
    answer_tokens: int | None = None           # student answer tokens in all examples (aligned or not)
    t_offsets: "torch.Tensor | None" = None    # [n_examples + 1] teacher-space rows of example i (its answer positions)
    t_logprobs: "torch.Tensor | None" = None   # [Nt, k] teacher log-probs at `t_temperature`, teacher vocabulary
    t_ids: "torch.Tensor | None" = None        # [Nt, k] their teacher ids
    t_rest: "torch.Tensor | None" = None       # [Nt] log of the tempered teacher mass outside t_ids
    t_logprobs1: "torch.Tensor | None" = None  # [Nt, k] the top-k log-probs at T = 1 (ULD has no temperature)
    temperature: float | None = None           # T of logprobs, rest (vanilla.divergence.temperature)
    t_temperature: float | None = None         # T of t_logprobs, t_rest (dskd.divergence.temperature)
    hidden: "torch.Tensor | None" = None       # [Nt, d_t] last-layer hidden states (float32), when kept

    HOST = ("offsets", "student_pos", "t_offsets")  # index structures the KD terms read with int(): stay on the CPU

    def to(self, device) -> "TeacherTargets":
        """The same targets with every value tensor on `device` (the student's, for the KD terms); the index
        structures in HOST stay on the CPU (the terms build a batch's indices there, then move them once)."""
        from dataclasses import fields, replace

        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if f.name not in self.HOST and hasattr(getattr(self, f.name), "to")})

    def rows(self, i: int) -> slice:
        """The student-space rows of example i."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def summary(self, entry: str = "vanilla") -> dict:
        """Counts of one entry's targets (aligned fraction and mapped mass: fractions in [0, 1])."""
        if entry == "vanilla":
            return {"positions": int(self.student_pos.numel()), "answer_tokens": self.answer_tokens,
                    "aligned_fraction": round(self.student_pos.numel() / max(1, self.answer_tokens), 4),
                    "mapped_mass": round(float(self.mapped_mass.mean()), 4) if self.mapped_mass.numel() else None,
                    "top_k": int(self.ids.shape[-1]), "temperature": self.temperature}
        if entry == "dskd":
            return {"teacher_positions": int(self.t_ids.shape[0]), "top_k": int(self.t_ids.shape[-1]),
                    "temperature": self.t_temperature, "hidden": self.hidden is not None}
        return {"teacher_positions": int(self.t_logprobs1.shape[0]), "top_k": int(self.t_logprobs1.shape[-1])}


def topk_targets(logits: "torch.Tensor", k: int, temperature: float = 1.0, candidates: "torch.Tensor | None" = None
                 ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """A teacher's sparse targets at temperature T, in the form `losses.divergence_topk` reads (a pure function).

    Args:
        logits: [..., V] teacher logits (any float dtype; computed in float32, float64 kept).
        k: entries kept, 1 <= k <= the number of candidates.
        temperature: T > 0; the logits are divided by T before the softmax.
        candidates: optional [M] distinct columns of `logits` among which the top-k is taken (cross-vocabulary KD:
            the teacher ids with an identical-string student twin); None: all V columns.

    Returns:
        (logprobs, index, rest): logprobs [..., k] = log_softmax(logits / T) at the k largest candidates, in
        decreasing order (the top-k of the tempered distribution: the top-k of the logits at any T); index [..., k]
        their positions in `candidates` (columns of `logits` when it is None); rest [...] the log of the tempered
        mass on every other column of `logits`, candidate or not. `rest` is a logsumexp over those tempered
        log-probs, never log(1 - sum), so a tail far below float32's epsilon keeps its value (a top logit of 25
        among 2,047 zeros at T = 1: log(2047) - 25 = -17.38, where 1 - sum is 0); -inf when nothing is left.
    """
    import torch

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(x / temperature, dim=-1)
    cand = lp if candidates is None else lp.index_select(-1, candidates)
    if not 1 <= k <= cand.shape[-1]:
        raise ValueError(f"top-k size k={k} must be in [1, {cand.shape[-1]}] (the number of candidate ids)")
    values, index = cand.topk(k, dim=-1)
    cols = index if candidates is None else candidates[index]
    rest = torch.logsumexp(lp.scatter(-1, cols, float("-inf")), dim=-1)
    return values, index, rest


def compute_targets(teacher, pairs, s_map, t_map, top_k: int, batch_size: int, pad_id: int, hidden: bool = True,
                    desc="teacher", *, temperature: float, t_temperature: float | None = None) -> TeacherTargets:
    """Run the frozen teacher over `pairs` [(student_ex, teacher_ex, aligned positions)] and keep its targets (see
    the module docstring): student-space top-k and rest at `temperature` at aligned positions (vanilla KD) and,
    at every teacher answer position, teacher-space top-k and rest at `t_temperature` (DSKD; None: `temperature`),
    the top-k at T = 1 (ULD) and (when `hidden`) the last layer's hidden state (DSKD). Top-k and rest come from
    topk_targets. The teacher runs on its own device; the targets come back on the CPU."""
    import torch
    from tqdm import tqdm

    from .prompts import collate

    t_temperature = temperature if t_temperature is None else t_temperature
    teacher.eval()
    dev = teacher.get_output_embeddings().weight.device
    s_map, t_map = s_map.to(dev), t_map.to(dev)
    k_s = min(top_k, len(s_map))
    k_t = min(top_k, teacher.get_output_embeddings().weight.shape[0])
    offsets, pos, lps, ids, rest, mass = [0], [], [], [], [], []
    t_offsets, t_lps, t_ids, t_rest, t_lps1, hid = [0], [], [], [], [], []
    for b in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch", mininterval=2):
        chunk = pairs[b: b + batch_size]
        batch = {k: v.to(dev) for k, v in collate([t for _, t, _ in chunk], pad_id).items()}
        with torch.inference_mode():
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=hidden)
        for row, (_, t_ex, aligned) in enumerate(chunk):
            answer = torch.arange(t_ex.prompt_len - 1, len(t_ex.input_ids) - 1, device=dev)
            logits = out.logits[row, answer]                                         # [n_t, V_t]
            lp, idx, r = topk_targets(logits, k_t, t_temperature)
            t_lps.append(lp), t_ids.append(idx), t_rest.append(r)
            full1 = torch.log_softmax(logits.float(), dim=-1)                        # T = 1
            t_lps1.append(full1.topk(k_t, dim=-1).values)                            # ULD: sorted, no ids needed
            if hidden:
                hid.append(out.hidden_states[-1][row, answer].float())
            t_offsets.append(t_offsets[-1] + len(answer))
            rel = torch.tensor([t - (t_ex.prompt_len - 1) for _, t in aligned], dtype=torch.long, device=dev)
            lp, idx, r = topk_targets(logits[rel], k_s, temperature, candidates=t_map)  # in student-id order
            lps.append(lp), ids.append(s_map[idx]), rest.append(r)
            mass.append(full1[rel][:, t_map].exp().sum(-1))
            pos.append(torch.tensor([s for s, _ in aligned], dtype=torch.long))
            offsets.append(offsets[-1] + len(aligned))
    answer_tokens = sum(len(s.input_ids) - s.prompt_len for s, _, _ in pairs)
    d = teacher.config.hidden_size
    cat = lambda xs, *w: torch.cat(xs).cpu() if xs else torch.zeros((0, *w))  # noqa: E731
    return TeacherTargets(
        offsets=torch.tensor(offsets), student_pos=cat(pos).long(), logprobs=cat(lps, k_s), ids=cat(ids, k_s).long(),
        rest=cat(rest), mapped_mass=cat(mass), answer_tokens=answer_tokens, t_offsets=torch.tensor(t_offsets),
        t_logprobs=cat(t_lps, k_t), t_ids=cat(t_ids, k_t).long(), t_rest=cat(t_rest), t_logprobs1=cat(t_lps1, k_t),
        temperature=float(temperature), t_temperature=float(t_temperature), hidden=cat(hid, d) if hidden else None)


def save_targets(targets: TeacherTargets, entry: str, key: dict, root: str | Path) -> Path:
    """Write entry `entry` (one of ENTRIES: only its tensors) under root/<key digest>/ with a manifest holding the
    key, the file's sha256 and the entry's summary; the same targets and key always give the same bytes."""
    from safetensors.torch import save_file

    out = Path(root) / key_digest(key)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(targets, name) for name in TENSORS[entry]}
    if entry == "dskd" and targets.hidden is not None:
        tensors["hidden"] = targets.hidden
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / TARGETS))
    manifest = {"key": key, "entry": entry, "sha256": file_sha256(out / TARGETS), **targets.summary(entry)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


class CacheError(RuntimeError):
    """No entry for a key (the teacher_cache stage has not run for these settings)."""


class CorruptEntry(CacheError):
    """An entry exists for the key but its content does not match its manifest."""


def load_targets(root: str | Path, key: dict) -> TeacherTargets:
    """The entry for `key`, verified; CacheError when it is missing, CorruptEntry when its content is damaged."""
    from safetensors.torch import load_file

    entry = Path(root) / key_digest(key)
    if not (entry / MANIFEST).exists():
        raise CacheError(f"no teacher cache entry for this key under {root}: rerun its teacher_cache stage (dvc repro)")
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        ok = file_sha256(entry / TARGETS) == manifest["sha256"]
        kind = manifest["entry"]
        extra = ({"answer_tokens": int(manifest["answer_tokens"]), "temperature": float(manifest["temperature"])}
                 if kind == "vanilla" else {"t_temperature": float(manifest["temperature"])} if kind == "dskd" else {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"{entry}: unreadable entry ({type(e).__name__}: {e})") from None
    if not ok:
        raise CorruptEntry(f"{entry / TARGETS}: content hash mismatch (corrupted): dvc checkout or dvc repro restores it")
    t = load_file(str(entry / TARGETS))
    return TeacherTargets(**{name: t[name] for name in TENSORS[kind]}, hidden=t.get("hidden"), **extra)


def load_or_recompute(root: str | Path, key: dict, recompute: Callable[[], TeacherTargets],
                      stage: str = "kd") -> tuple[TeacherTargets, int]:
    """(targets, 1 if recomputed else 0): a corrupted entry is recomputed in memory by `recompute()`, never used
    and never rewritten (the cache belongs to the teacher_cache stage); a missing entry is still a CacheError."""
    try:
        return load_targets(root, key), 0
    except CorruptEntry as e:
        print(f"{stage}: {e}; recomputing the teacher targets in memory (the cache is left as is)", flush=True)
        return recompute(), 1


def teacher_pass(p, inp, teacher, *, temperature: float, t_temperature: float, hidden: bool,
                 desc: str = "teacher") -> TeacherTargets:
    """`compute_targets` over the training pairs of `inp` (telekd.teacher_inputs.KDInputs) with the study's params
    `p`: the one call the teacher_cache stage and a recompute both make, so that a recomputed entry equals the
    cached one. `temperature`/`t_temperature`: the vanilla and DSKD entries' temperatures; `hidden`: keep the
    teacher's last hidden states."""
    return compute_targets(teacher, inp.pairs, inp.s_map, inp.t_map, p.teacher_cache.top_k, p.active.train.batch_size,
                           inp.teacher_tok.pad_token_id, hidden=hidden, desc=desc, temperature=temperature,
                           t_temperature=t_temperature)


def kd_targets(root: str | Path, p, inp, entry: str, teacher_dir: str, device, teacher=None, *,
               temperature: float, stage: str = "kd") -> tuple[TeacherTargets, int]:
    """A kd cell's cached teacher targets (entry `entry` under root/<entry>) on `device`, and 1 if a corrupted
    entry was recomputed (else 0).

    The recompute runs the teacher on `device`, the stage's (its GPU; a 7B teacher on the CPU takes hours):
    `teacher` when the stage holds it already, else loaded from `teacher_dir` onto `device`; at `temperature`
    (the algorithm's; any for ULD), with hidden states for DSKD."""
    def recompute() -> TeacherTargets:
        model = teacher
        if model is None:
            from .models import load_model

            model, _ = load_model(teacher_dir, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code,
                                  device=str(device))
            model.requires_grad_(False)
        return teacher_pass(p, inp, model, temperature=temperature, t_temperature=temperature,
                            hidden=entry == "dskd" and p.teacher_cache.hidden, desc=f"{stage}: teacher (recompute)")

    targets, recomputed = load_or_recompute(Path(root) / entry, inp.keys[entry], recompute, stage)
    return targets.to(device), recomputed
