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
