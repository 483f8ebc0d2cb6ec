"""Resumable training: checkpoints outside DVC's outputs (DVC deletes a stage's outs before it runs),
valid only for the run whose fingerprint they carry, and a SIGTERM flag that lets a loop save and stop.

    checkpoints/kd/<cell>/state.pt      train_kd's own loop (telekd.kd.loop)
    checkpoints/sft/<model>/            the Trainer's checkpoint-N folders (telekd.sft)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = "checkpoints"
FINGERPRINT = "fingerprint.txt"


def fingerprint(settings: dict) -> str:
    """sha256 of everything that determines a run (settings and input hashes), as canonical JSON."""
    from .cache import key_digest

    return key_digest(settings)


class Interrupted(SystemExit):
    """Raised (exit status 1, message on stderr) after a SIGTERM once the run's state is saved."""


class SigtermFlag:
    """While active, SIGTERM sets `.requested` instead of killing the process (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        print(f"SIGTERM: finishing the current step, saving a checkpoint and exiting (pid {os.getpid()})",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "SigtermFlag":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class NonFinite(SystemExit):
    """Raised (exit status 1, one line on stderr) when a training loss or gradient norm is NaN or infinite:
    the stage stops before the optimizer applies it and before any checkpoint is written, so the last
    good checkpoint stays as it was."""


def check_finite(value: float, what: str, where: str, step: str, kept: str | None = None) -> None:
    """Raise NonFinite naming the run (`where`), the quantity, the step and the likely cause if `value` is not finite."""
    import math

    if not math.isfinite(value):
        raise NonFinite(
            f"{where}: {what} is {value} at {step}: training diverged (likely cause: a learning rate too high for "
            f"this model and dtype, or an overflow); lower profiles.<profile>.train.lr or use float32"
            + (f"; last good checkpoint kept: {kept}" if kept else "; nothing was saved"))


@dataclass(frozen=True)
class Checkpoint:
    """One run's checkpoint folder: `save_steps` optimizer steps between saves (0: only on SIGTERM)."""

    dir: Path
    fingerprint: str
    save_steps: int = 0

    @property
    def file(self) -> Path:
        """The run's state file, <dir>/state.pt."""
        return Path(self.dir) / "state.pt"

    def load(self) -> dict | None:
        """The saved state if it belongs to this run; None (with a one-line message) otherwise."""
        import torch

        if not self.file.exists():
            return None
        state = torch.load(self.file, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(f"{self.file}: checkpoint of a different run (fingerprint differs): ignored, starting over",
                  file=sys.stderr)
            return None
        return state

    def save(self, state: dict) -> None:
        """Write atomically (temporary file + rename): a kill mid-write leaves the previous checkpoint intact."""
        import torch

        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.tmp{os.getpid()}")
        torch.save({"fingerprint": self.fingerprint, **state}, tmp)
        os.replace(tmp, self.file)

    def clear(self) -> None:
        """Remove the run's checkpoint folder (the run finished; nothing to resume)."""
        if Path(self.dir).exists():
            shutil.rmtree(self.dir)


def trainer_resume_point(ckpt: Checkpoint) -> str | None:
    """The newest complete checkpoint-N folder of a transformers Trainer run in ckpt.dir, if it is this run's.

    A folder of a different run (fingerprint differs) is removed with a one-line message; so are
    incomplete checkpoint-N folders (killed mid-save: trainer_state.json is written last).
    The main process writes ckpt.dir/fingerprint.txt for the run that starts now.
    """
    from .shard import state

    proc = state()
    d = Path(ckpt.dir)
    stamp = d / FINGERPRINT
    if proc.is_main_process:
        if d.exists() and (not stamp.exists() or stamp.read_text().strip() != ckpt.fingerprint):
            print(f"{d}: checkpoints of a different run (fingerprint differs): ignored and removed, starting over",
                  file=sys.stderr)
            shutil.rmtree(d)
        for c in d.glob("checkpoint-*"):
            if not (c / "trainer_state.json").exists():
                shutil.rmtree(c)
        d.mkdir(parents=True, exist_ok=True)
        stamp.write_text(ckpt.fingerprint + "\n")
    proc.wait_for_everyone()
    done = [c for c in d.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    return str(max(done, key=lambda c: int(c.name.split("-")[1]))) if done else None
