"""What the benchmarks share: the machine line, versions, medians, tiny models and synthetic KD data."""

import os
import platform
import statistics


def machine(threads: int, device: str = "cpu") -> dict:
    import torch

    info = {"platform": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
            "torch_threads": threads, "device": device,
            "shared": "yes: 2 cores shared with other agents' tests and a pipeline; ratios are measured "
                      "A B A B in one process and reported as medians with the spread"}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def spread(xs: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "runs": [round(x, 3) for x in xs]}


def make_model(family: str, arch: dict, vocab: int, max_positions: int, seed: int, dtype=None, device="cpu"):
    """A randomly initialised Llama/Mistral model with `arch` {hidden, layers, heads, kv_heads, mlp}."""
    import torch
    from transformers import AutoModelForCausalLM

    from telekd.params import Architecture
    from telekd.zoo import make_config

    torch.manual_seed(seed)
    cfg = make_config(family, Architecture(**arch), vocab, max_positions)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    return model


def synthetic_pairs(n: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0):
    """n examples of random ids (prompt masked, answer labelled) paired with themselves: one shared vocabulary,
    every answer position aligned. Returns (examples, pairs)."""
    import random

    from telekd.prompts import IGNORE, Example

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        ids = [1] + [rng.randrange(3, vocab) for _ in range(prompt_len + answer_len - 1)]
        examples.append(Example(id=str(i), input_ids=ids, labels=[IGNORE] * prompt_len + ids[prompt_len:],
                                prompt_len=prompt_len, prompt="", completion="", context="", truncated=False,
                                answer_in_context=True))
    pairs = [(e, e, [(p, p) for p in range(e.prompt_len - 1, len(e.input_ids) - 1)]) for e in examples]
    return examples, pairs


def n_params(model) -> int:
    """Parameters that do matmul work per token: all but the input embedding (a lookup)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)
