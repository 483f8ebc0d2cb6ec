"""Content-addressed teacher-output cache: the teacher runs once per checkpoint and split, not per cell and epoch.

An entry holds, for every aligned answer position of the training split, the teacher's top-k
log-probabilities (temperature 1) over the student's vocabulary (ids with an identical-string twin)
plus, implicitly, the residual mass 1 - sum(exp(top-k)) (vanilla KD); and, for every teacher answer
position, the top-k over the teacher's own vocabulary and the last layer's hidden state (DSKD, ULD).
Its address is the sha256 of everything that determines it: teacher weights, both tokenizers, chat
templates, data, lengths, dtype, top-k.
The file's own sha256 is checked on every read; a corrupted entry is never used: `load_targets`
refuses it, `load_or_recompute` (the kd stage) recomputes it with the teacher in memory and leaves the
cache, a DVC output of the teacher_cache stage, as it is (`dvc repro` or `dvc checkout` restores it).
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


def file_sha256(path: str | Path) -> str:
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
    offsets: "torch.Tensor"      # [n_examples + 1] rows of example i are offsets[i]:offsets[i+1]
    student_pos: "torch.Tensor"  # [N] student logit position of each row
    logprobs: "torch.Tensor"     # [N, k] teacher log-probs (T = 1) at the student ids below
    ids: "torch.Tensor"          # [N, k] student vocabulary ids
    mapped_mass: "torch.Tensor"  # [N] teacher mass on ids with a student twin (1 with one vocabulary)
    answer_tokens: int           # student answer tokens in all examples (aligned or not)
    t_offsets: "torch.Tensor"    # [n_examples + 1] teacher-space rows of example i (its answer positions, in order)
    t_logprobs: "torch.Tensor"   # [Nt, k] teacher log-probs (T = 1) over the teacher's vocabulary
    t_ids: "torch.Tensor"        # [Nt, k] their teacher ids
    hidden: "torch.Tensor | None" = None  # [Nt, d_t] last-layer hidden states (float32), when kept

    HOST = ("offsets", "student_pos", "t_offsets")  # index structures the KD terms read with int(): stay on the CPU

    def to(self, device) -> "TeacherTargets":
        """The same targets with every value tensor on `device` (the student's, for the KD terms); the index
        structures in HOST stay on the CPU (the terms build a batch's indices there, then move them once)."""
        from dataclasses import fields, replace

        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if f.name not in self.HOST and hasattr(getattr(self, f.name), "to")})

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def summary(self) -> dict:
        return {"positions": int(self.student_pos.numel()), "answer_tokens": self.answer_tokens,
                "aligned_fraction": round(self.student_pos.numel() / max(1, self.answer_tokens), 4),
                "mapped_mass": round(float(self.mapped_mass.mean()), 4) if self.mapped_mass.numel() else None,
                "top_k": int(self.ids.shape[-1]), "teacher_positions": int(self.t_ids.shape[0]),
                "hidden": self.hidden is not None}


def compute_targets(teacher, pairs, s_map, t_map, top_k: int, batch_size: int, pad_id: int, hidden: bool = True,
                    desc="teacher") -> TeacherTargets:
    """Run the frozen teacher over `pairs` [(student_ex, teacher_ex, aligned positions)] and keep its targets:
    student-space top-k at aligned positions (vanilla KD) and, at every teacher answer position,
    teacher-space top-k and (when `hidden`) the last layer's hidden state (DSKD, ULD). The teacher runs on its
    own device; the targets come back on the CPU."""
    import torch
    from tqdm import tqdm

    from .prompts import collate

    teacher.eval()
    dev = teacher.get_output_embeddings().weight.device
    s_map, t_map = s_map.to(dev), t_map.to(dev)
    k_s = min(top_k, len(s_map))
    k_t = min(top_k, teacher.get_output_embeddings().weight.shape[0])
    offsets, pos, lps, ids, mass = [0], [], [], [], []
    t_offsets, t_lps, t_ids, hid = [0], [], [], []
    for b in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch", mininterval=2):
        chunk = pairs[b: b + batch_size]
        batch = {k: v.to(dev) for k, v in collate([t for _, t, _ in chunk], pad_id).items()}
        with torch.inference_mode():
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=hidden)
        for row, (_, t_ex, aligned) in enumerate(chunk):
            answer = torch.arange(t_ex.prompt_len - 1, len(t_ex.input_ids) - 1, device=dev)
            full = torch.log_softmax(out.logits[row, answer].float(), dim=-1)       # [n_t, V_t]
            top_t = full.topk(k_t, dim=-1)
            t_lps.append(top_t.values)
            t_ids.append(top_t.indices)
            if hidden:
                hid.append(out.hidden_states[-1][row, answer].float())
            t_offsets.append(t_offsets[-1] + len(answer))
            rel = torch.tensor([t - (t_ex.prompt_len - 1) for _, t in aligned], dtype=torch.long, device=dev)
            lp = full[rel][:, t_map]                                                 # [n, M] in student-id order
            top = lp.topk(k_s, dim=-1)
            lps.append(top.values)
            ids.append(s_map[top.indices])
            mass.append(lp.exp().sum(-1))
            pos.append(torch.tensor([s for s, _ in aligned], dtype=torch.long))
            offsets.append(offsets[-1] + len(aligned))
    answer_tokens = sum(len(s.input_ids) - s.prompt_len for s, _, _ in pairs)
    d = teacher.config.hidden_size
    cat = lambda xs, *w: torch.cat(xs).cpu() if xs else torch.zeros((0, *w))  # noqa: E731
    return TeacherTargets(torch.tensor(offsets), cat(pos).long(), cat(lps, k_s), cat(ids, k_s).long(), cat(mass),
                          answer_tokens, torch.tensor(t_offsets), cat(t_lps, k_t), cat(t_ids, k_t).long(),
                          cat(hid, d) if hidden else None)


def save_targets(targets: TeacherTargets, key: dict, root: str | Path) -> Path:
    """Write the entry under root/<key digest>/ with a manifest holding the key and the file's sha256."""
    from safetensors.torch import save_file

    entry = Path(root) / key_digest(key)
    entry.mkdir(parents=True, exist_ok=True)
    tensors = {"offsets": targets.offsets, "student_pos": targets.student_pos, "logprobs": targets.logprobs,
               "ids": targets.ids, "mapped_mass": targets.mapped_mass, "t_offsets": targets.t_offsets,
               "t_logprobs": targets.t_logprobs, "t_ids": targets.t_ids}
    if targets.hidden is not None:
        tensors["hidden"] = targets.hidden
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(entry / TARGETS))
    manifest = {"key": key, "sha256": file_sha256(entry / TARGETS), "answer_tokens": targets.answer_tokens,
                **targets.summary()}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry


class CacheError(RuntimeError):
    pass


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
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"{entry}: unreadable entry ({type(e).__name__}: {e})") from None
    if not ok:
        raise CorruptEntry(f"{entry / TARGETS}: content hash mismatch (corrupted): dvc checkout or dvc repro restores it")
    t = load_file(str(entry / TARGETS))
    return TeacherTargets(t["offsets"], t["student_pos"], t["logprobs"], t["ids"], t["mapped_mass"],
                          manifest["answer_tokens"], t["t_offsets"], t["t_logprobs"], t["t_ids"], t.get("hidden"))


def load_or_recompute(root: str | Path, key: dict, recompute: Callable[[], TeacherTargets],
                      stage: str = "kd") -> tuple[TeacherTargets, int]:
    """(targets, 1 if recomputed else 0): a corrupted entry is recomputed in memory by `recompute()`, never used
    and never rewritten (the cache belongs to the teacher_cache stage); a missing entry is still a CacheError."""
    try:
        return load_targets(root, key), 0
    except CorruptEntry as e:
        print(f"{stage}: {e}; recomputing the teacher targets in memory (the cache is left as is)", flush=True)
        return recompute(), 1
