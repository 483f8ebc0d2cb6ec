"""Stage sft: LoRA SFT of one model of the profile (tiny: llama | mistral | student) on the training split.

Resumes from checkpoints/sft/<model> after an interruption; runs unchanged under `accelerate launch`.
"""

import argparse
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from telekd import layout
from telekd.forkserver import run_stage
from telekd.io import atomic_path, write_json
from telekd.params import load_params


def main() -> None:
    """Fine-tune --model's base checkpoint with LoRA; write models/sft/<model> and metrics/sft/<model>.json."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="a model of the active profile, as in sft.models (tiny: llama | mistral | student)")
    role = ap.parse_args().model
    p = load_params()
    from telekd.cache import dir_digest, file_sha256
    from telekd.checkpoint import ROOT, Checkpoint, fingerprint
    from telekd.shard import state
    from telekd.examples import load_split, tokenized
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft
    from telekd.tracking import TrainLive, split_timing

    t = p.active.train
    settings = SFTSettings.from_params(p)
    base = layout.model_dir(role, "base")
    model, tok = load_model(base, dtype=p.active.dtype, trust_remote_code=p.models.trust_remote_code)
    train = tokenized(load_split("train"), tok, p.prompt.system, t.max_length, t.max_prompt_length)
    val = tokenized(load_split("validation"), tok, p.prompt.system, t.max_length, t.max_prompt_length)
    run = {"model": role, "settings": asdict(settings), "base": dir_digest(base), "system": p.prompt.system,
           "data": {x: file_sha256(layout.split_file(x)) for x in ("train", "validation")}}
    ckpt = Checkpoint(Path(ROOT) / "sft" / role, fingerprint(run))
    main = state().is_main_process
    live = TrainLive(f"{layout.LOGS}/sft/{role}", {"model": role, **asdict(settings)}) if main else None
    with atomic_path(layout.model_dir(role, "sft")) if main else nullcontext(None) as out:
        result = run_sft(model, tok, train, val, settings, out, checkpoint=ckpt, live=live, desc=f"sft {role}")
    if not main:
        return
    # the loss curves are DVCLive's (logs/sft/<model>/); wall-clock figures go to an untracked-by-metrics file
    m, timing = split_timing(result["metrics"])
    write_json(f"{layout.LOGS}/timing/sft/{role}.json", timing)
    write_json(f"{layout.METRICS}/sft/{role}.json", m)
    ckpt.clear()
    print(f"sft {role}: eval loss {m['eval_loss_initial']:.3f} -> {m['eval_loss_best']:.3f}, {timing['tokens_per_s']} tokens/s")


if __name__ == "__main__":
    run_stage(main)
