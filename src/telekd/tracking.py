"""Training metrics through DVCLive: one DVCLive directory per training run (logs/kd/<run>, logs/sft/<model>).

Layout (DVCLive 3.49 conventions, https://dvc.org/doc/dvclive): `<dir>/plots/metrics/train/<name>.tsv` and
`<dir>/plots/metrics/eval/<name>.tsv` (columns step, <name>; `dvc plots show/diff` render them), `<dir>/metrics.json`
(the summary: the last value of every metric, the step and the run's headline numbers, rewritten every step so
`dvc exp show` follows a running `dvc exp run`), `<dir>/params.yaml` (the run's settings).

Inside a DVC stage DVCLive must not touch git or DVC itself: Live is opened with save_dvc_exp=False (no experiment
commit), dvcyaml=None (no dvc.yaml of its own: the pipeline's dvc.yaml declares these files), report=None, and
Live.end() is never called (inside `dvc exp run` it git-adds untracked files of its directory). Wall-clock values
(the Trainer's *_runtime, *_per_second, *_time, total_flos) are never logged here: they go to a separate timing file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

# Keys of HF Trainer logs that measure time or throughput (eval_runtime, train_samples_per_second,
# eval_model_preparation_time, total_flos): kept out of the tracked metrics.
TIMING_SUFFIXES = ("_runtime", "_per_second", "_time", "total_flos")


TIMING_KEYS = ("wall_s", "tokens_per_s")  # of telekd's own run metrics (train_kd, run_sft)


def split_timing(metrics: dict) -> tuple[dict, dict]:
    """(metrics without wall-clock figures, the wall-clock figures): the first is tracked by DVC, the second not."""
    return ({k: v for k, v in metrics.items() if k not in TIMING_KEYS},
            {k: metrics[k] for k in TIMING_KEYS if k in metrics})


def _param(v):
    if isinstance(v, tuple):
        return [_param(x) for x in v]
    if isinstance(v, dict):
        return {k: _param(x) for k, x in v.items()}
    return v


class TrainLive:
    """A DVCLive logger for one training run (main process only).

    directory: the DVCLive directory (emptied of earlier DVCLive files on open). params: the run's settings,
    written to <directory>/params.yaml (tuples become lists). Steps are the caller's own step numbers (KD: batch
    index from 1; SFT: the Trainer's global step), so a resumed run's curve lines up with an uninterrupted one.
    """

    def __init__(self, directory: str | Path, params: dict | None = None):
        from dvclive import Live

        self.dir = Path(directory)
        self.live = Live(str(self.dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                         monitor_system=False)
        if params:
            self.live.log_params(_param(params))

    def log(self, step: int, values: dict, split: str = "train") -> None:
        """Append one row per metric at `step` (a history file <split>/<name>.tsv each) and rewrite the summary."""
        self.live.step = int(step)
        for name, v in values.items():
            self.live.log_metric(f"{split}/{name}", float(v))
        self.live.make_summary()

    def replay(self, rows: list[dict], split: str = "train") -> None:
        """Log rows {"step": s, name: value, ...} already trained (a resumed run's checkpointed log)."""
        for r in rows:
            self.log(r["step"], {k: v for k, v in r.items() if k != "step"}, split)

    def log_hf(self, step: int, logs: dict) -> None:
        """One HF Trainer `on_log` dict: an evaluation's (eval_* keys) to eval/*, others to train/*; timing keys and the end-of-training
        summary (the one holding train_runtime: its train_loss is a mean over the run, not a step value) dropped."""
        if "train_runtime" in logs:
            return
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"  # an evaluation's log: all of it
        values = {k.removeprefix("eval_"): v for k, v in logs.items()
                  if not k.endswith(TIMING_SUFFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.log(step, values, split)

    def finish(self, headline: dict) -> None:
        """Add the run's headline numbers (e.g. validation CE before/after) to the summary and write it."""
        self.live.summary.update({k: v for k, v in headline.items() if v is not None})
        self.live.make_summary()


def trainer_callback(live: TrainLive):
    """transformers' DVCLiveCallback, logging through `live` at the Trainer's global step (a train and an eval row of
    one step share its number), without timing keys, with the run's own params instead of TrainingArguments (which
    hold temporary paths), and without Live.end(). On a resumed run the checkpoint's log history up to the resume
    step is logged first."""
    from transformers.integrations import DVCLiveCallback

    class Callback(DVCLiveCallback):
        def setup(self, args, state, model):
            self._initialized = True

        def on_train_begin(self, args, state, control, **kwargs):
            self._initialized = True
            if state.is_world_process_zero:
                for h in state.log_history:
                    if 0 < h.get("step", 0) <= state.global_step:
                        live.log_hf(h["step"], {k: v for k, v in h.items() if k != "step"})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                live.log_hf(state.global_step, logs)

        def on_train_end(self, args, state, control, **kwargs):
            pass

    return Callback(live=live.live)


def parse_history(text: str) -> list[tuple[int, float]]:
    """(step, value) rows of one DVCLive metric history file (.tsv text: columns step, <name>[, timestamp])."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows:
        return []
    name = [k for k in rows[0] if k not in ("step", "timestamp")]
    if len(name) != 1:
        raise ValueError(f"not a DVCLive metric history: columns {list(rows[0])}; expected step and one metric")
    return [(int(r["step"]), float(r[name[0]])) for r in rows]


def read_rows(directory: str | Path, split: str = "train", read=None) -> list[dict]:
    """The metric histories of one DVCLive directory merged by step: [{"step": s, name: value, ...}] (sorted by step).

    `read(folder) -> {name: tsv text}` lists the .tsv files of a folder (default: the filesystem; the review passes
    one that reads a git revision). Missing folder: [].
    """
    base = Path(directory) / "plots" / "metrics" / split
    if read is None:
        files = {p.stem: p.read_text() for p in sorted(base.glob("*.tsv"))} if base.is_dir() else {}
    else:
        files = read(base)
    rows: dict[int, dict] = {}
    for name, text in sorted(files.items()):
        for step, v in parse_history(text):
            rows.setdefault(step, {"step": step})[name] = v
    return [rows[s] for s in sorted(rows)]
