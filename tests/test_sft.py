"""LoRA SFT through trl: completion-only loss, merged checkpoint + adapter, loss logs."""

import json

import pytest

from telekd.prompts import IGNORE, build_example

SYSTEM = "Answer from the context."


def test_sft_dataset_keeps_the_prompt_masked(tokenizers, sample_records):
    from telekd.sft import examples_dataset

    tok = tokenizers["llama"]
    exs = [build_example(tok, r, SYSTEM, 600, 500) for r in sample_records[:3]]
    ds = examples_dataset(exs)
    for row, e in zip(ds, exs):
        assert row["labels"][: e.prompt_len] == [IGNORE] * e.prompt_len
        assert row["labels"][e.prompt_len:] == e.input_ids[e.prompt_len:]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_trains_lora_and_writes_merged_model_and_adapter(saved_models, sample_records, tmp_path):
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    model, tok = load_model(str(saved_models["student"]))
    train = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[:16]]
    val = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[16:20]]
    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=2, lr=5e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="cosine", max_grad_norm=1.0, save_steps=2, dtype="float32", seed=0)
    out = run_sft(model, tok, train, val, s, tmp_path / "sft")
    m = out["metrics"]
    assert m["steps"] == 8 and m["eval_loss_best"] <= m["eval_loss_initial"]
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert len(out["train_log"]) == 8 and out["eval_log"]
    cfg = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"])  # stable across processes (hash seeds)
    merged, _ = load_model(str(tmp_path / "sft"))  # an ordinary model: no peft wrapper needed
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_non_finite_loss_stops_sft_before_its_checkpoint_is_saved(tmp_path):
    """The callback raises from on_log, which the Trainer calls before it saves that step's checkpoint."""
    import math

    from telekd.checkpoint import NonFinite
    from telekd.sft import _finite_callback

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    cb = _finite_callback("sft student", tmp_path)

    class State:
        global_step, max_steps = 12, 40

    cb.on_log(None, State, None, logs={"loss": 2.5, "grad_norm": 1.0})  # finite: nothing happens
    for key in ("loss", "grad_norm", "eval_loss"):
        with pytest.raises(NonFinite) as e:
            cb.on_log(None, State, None, logs={key: math.nan})
        assert str(e.value).startswith(f"sft student: {key} is nan at step 12/40: training diverged")
        assert str(e.value).endswith(f"last good checkpoint kept: {tmp_path / 'checkpoint-10'}")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_diverging_sft_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(saved_models, sample_records, tmp_path):
    """Frozen weights that turn NaN after step 5 (checkpoint-4 saved) give a NaN loss at step 6: the run ends with
    NonFinite naming the run and step, checkpoint-4 stays the newest, and no model is written."""
    import torch
    from transformers import TrainerCallback

    from telekd.checkpoint import Checkpoint, NonFinite
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    model, tok = load_model(str(saved_models["student"]))
    train = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[:8]]

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))

    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=4, lr=1e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="constant", max_grad_norm=1.0, save_steps=4, dtype="float32", seed=0)
    ckpt = Checkpoint(tmp_path / "ck", "fp")
    with pytest.raises(NonFinite) as e:
        run_sft(model, tok, train, train[:2], s, tmp_path / "sft", checkpoint=ckpt, callbacks=[Poison()],
                desc="sft student")
    assert str(e.value).startswith("sft student: loss is nan at step 6/8: training diverged"), str(e.value)
    assert str(e.value).endswith(f"last good checkpoint kept: {ckpt.dir / 'checkpoint-4'}")
    assert sorted(c.name for c in ckpt.dir.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (tmp_path / "sft").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_checkpoints_are_adapters_and_only_the_best_and_latest_are_kept(saved_models, sample_records, tmp_path):
    from transformers import TrainerCallback

    from telekd.checkpoint import Checkpoint
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    model, tok = load_model(str(saved_models["student"]))
    base_bytes = (saved_models["student"] / "model.safetensors").stat().st_size
    train = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[:16]]
    seen = []

    class Watch(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append(sorted(c.name for c in ckpt.dir.glob("checkpoint-*")))

    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=2, lr=5e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="cosine", max_grad_norm=1.0, save_steps=2, dtype="float32", seed=0)
    ckpt = Checkpoint(tmp_path / "ck", "fp")
    run_sft(model, tok, train, train[:4], s, None, checkpoint=ckpt, callbacks=[Watch()])
    assert len(seen) == 4 and max(len(x) for x in seen) <= 2  # saves at steps 2, 4, 6, 8; best + latest kept
    for c in ckpt.dir.glob("checkpoint-*"):
        files = {f.name for f in c.iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        assert (c / "adapter_model.safetensors").stat().st_size < base_bytes / 10


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_never_checkpoints_weights_that_overflowed(saved_models, sample_records, tmp_path):
    """Weights made NaN right after an optimizer step (loss and gradient norm of that step finite): the step's
    checkpoint is refused, the previous one (checkpoint-2) stays the newest."""
    import torch
    from transformers import TrainerCallback

    from telekd.checkpoint import Checkpoint, NonFinite
    from telekd.models import load_model
    from telekd.sft import SFTSettings, run_sft

    model, tok = load_model(str(saved_models["student"]))
    train = [build_example(tok, r, SYSTEM, 400, 300) for r in sample_records[:8]]

    class Overflow(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:  # the 4th update
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.fill_(float("inf"))

    s = SFTSettings(max_length=400, max_prompt_length=300, batch_size=4, grad_accum=1, epochs=3, lr=1e-3, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"), weight_decay=0.0,
                    lr_scheduler="constant", max_grad_norm=1.0, save_steps=2, dtype="float32", seed=0)
    ckpt = Checkpoint(tmp_path / "ck", "fp")
    with pytest.raises(NonFinite) as e:
        run_sft(model, tok, train, train[:2], s, None, checkpoint=ckpt, callbacks=[Overflow()], desc="sft student")
    assert str(e.value).startswith("sft student: the trained weights ("), str(e.value)
    assert "not finite) is nan at step 4/6" in str(e.value)
    assert sorted(c.name for c in ckpt.dir.glob("checkpoint-*")) == ["checkpoint-2"]
