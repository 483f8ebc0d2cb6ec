"""The tiny profile's model zoo, built here from the training split (nothing is downloaded).

Two byte-level BPE tokenizers of the same size are trained on different corpora, so their merges
differ while most token strings are shared, as with Llama-2's and Mistral's 32k vocabularies. The
Llama-architecture teacher and the smaller Llama-architecture student share the first; the
Mistral-architecture teacher (grouped-query attention) uses the second. Each model is briefly
pre-trained as a causal LM on the training contexts so that "base" models are not random.
Deterministic: the same params give bitwise the same tokenizers and weights on a CPU of the same kind,
whatever its core count or load (the torch thread count is fixed by base_models.threads).
"""

from __future__ import annotations

import math
import random

SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama-2 and Mistral


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over `texts`, wrapped as a transformers fast tokenizer with exactly vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus gave only {tok.get_vocab_size()} tokens, not base_models.vocab_size={vocab_size}: "
            "lower vocab_size or use more training data"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def vocab_overlap(tok_a, tok_b) -> float:
    """Fraction of token strings of `tok_a` that `tok_b` also has."""
    a, b = set(tok_a.get_vocab()), set(tok_b.get_vocab())
    return len(a & b) / len(a)


def make_config(family: str, arch, vocab_size: int, max_positions: int):
    """A transformers LlamaConfig (or MistralConfig, sliding window = max_positions, for family "mistral") of the
    size `arch` gives (telekd.params.Architecture: hidden, layers, heads, kv_heads, mlp); bos 1, eos 2, untied head."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=arch.hidden, intermediate_size=arch.mlp,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if family == "mistral":
        return MistralConfig(sliding_window=max_positions, **common)
    return LlamaConfig(**common)


def pretrain(model, tokenizer, texts: list[str], steps: int, lr: float, batch: int, seq_len: int, seed: int,
             desc: str = "pretrain", teacher=None) -> list[float]:
    """Train `model` on random windows (seq_len tokens, `batch` per step) of the concatenated texts; returns the
    loss per step (nats per token).

    Without `teacher` the loss is the causal-LM cross-entropy of the text. With `teacher` (a frozen causal LM on
    the same vocabulary, e.g. the unpruned model a pruned one came from) it is the forward KL from the teacher's
    next-token distribution to the model's, T = 1, summed over the vocabulary and averaged over every position
    (torch's kl_div): the logit distillation Minitron retrains pruned models with (Muralidharan et al. 2024,
    "Compact Language Models via Pruning and Knowledge Distillation", section 3). AdamW, warm-up then cosine, the
    gradient clipped to norm 1. Errors: ValueError when the texts are shorter than one window or the teacher's
    vocabulary differs from the model's.
    """
    import torch
    from tqdm import tqdm

    from .checkpoint import check_finite

    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"heal teacher's vocabulary ({teacher.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}): distil from the model the pruned one came from")

    stream: list[int] = []
    for t in texts:
        stream += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(stream) <= seq_len + 1:
        raise ValueError(f"{len(stream)} training tokens is fewer than pretrain_seq_len={seq_len}: lower it")
    data = torch.tensor(stream)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc, mininterval=2)):
        starts = [rng.randrange(len(data) - seq_len - 1) for _ in range(batch)]
        x = torch.stack([data[s: s + seq_len] for s in starts])
        if teacher is None:
            loss = model(input_ids=x, labels=x).loss
        else:
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
            log_q = torch.log_softmax(model(input_ids=x).logits.float(), -1)
            loss = torch.nn.functional.kl_div(log_q, target, reduction="none", log_target=True).sum(-1).mean()
        check_finite(loss.item(), "the loss", desc, f"step {len(losses) + 1}/{steps}")  # before it reaches the weights
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


PARALLEL_MIN_FLOPS = 5e11  # below this, a spawned worker's start-up (~4 CPU s of imports) costs more than it saves


def pretrain_flops(job: dict) -> float:
    """Rough training FLOPs of one model's pre-training: 6 x weights x tokens (weights from the architecture)."""
    a = job["arch"]
    head_dim = a["hidden"] // a["heads"]
    per_layer = a["hidden"] * head_dim * (2 * a["heads"] + 2 * a["kv_heads"]) + 3 * a["hidden"] * a["mlp"]
    weights = a["layers"] * per_layer + 2 * job["vocab_size"] * a["hidden"]
    return 6.0 * weights * job["steps"] * job["batch"] * job["seq_len"]


def build_tiny(params, contexts: list[str], questions: list[str], out_dir, processes: int = 1,
               min_parallel_flops: float = PARALLEL_MIN_FLOPS) -> dict:
    """Train both tokenizers and pre-train the three tiny models into out_dir/<role>; return their summary.

    The three models are independent: `processes` > 1 pre-trains them in up to that many worker processes
    (spawned, each with base_models.threads torch threads), largest first, when their summed `pretrain_flops` reach
    `min_parallel_flops` (the tiny profile's ~1.4e13 do; the tests' reduced study's ~3e8 do not). The weights are
    bitwise those of processes=1 (each model's training reads only its seed, its tokenizer and the contexts;
    tests/reliability/test_determinism.py).
    """
    from pathlib import Path

    from .prompts import set_chat_template

    if processes < 1:
        raise ValueError(f"processes={processes}: give 1 (sequential) or more worker processes")
    bm, prof = params.base_models, params.active
    # Different corpora -> different merges, mostly shared strings (as Llama-2 vs Mistral).
    toks = {
        "llama": train_tokenizer(contexts, bm.vocab_size),
        "mistral": train_tokenizer(contexts + questions, bm.vocab_size),
    }
    summary = {"vocab_overlap_llama_mistral": round(vocab_overlap(toks["llama"], toks["mistral"]), 4), "models": {}}
    jobs = {}
    for role in ("llama", "mistral", "student"):
        family = "mistral" if role == "mistral" else "llama"
        set_chat_template(toks[family], prof.models[role].chat_template)
        toks[family].save_pretrained(Path(out_dir) / role)
        jobs[role] = dict(role=role, family=family, arch=prof.architectures[role].model_dump(),
                          vocab_size=bm.vocab_size, max_positions=2 * prof.train.max_length,
                          steps=bm.pretrain_steps[role], lr=bm.pretrain_lr, batch=bm.pretrain_batch,
                          seq_len=bm.pretrain_seq_len, seed=params.seed, threads=bm.threads,
                          contexts=contexts, out_dir=str(out_dir), trust_remote_code=params.models.trust_remote_code)
    if processes == 1 or sum(pretrain_flops(j) for j in jobs.values()) < min_parallel_flops:
        built = {role: _pretrain_role(**job) for role, job in jobs.items()}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child would inherit torch's and the tokenizers' thread pools
        with ProcessPoolExecutor(max_workers=min(processes, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            order = sorted(jobs, key=lambda r: -pretrain_flops(jobs[r]))
            futures = {role: pool.submit(_pretrain_role, **jobs[role]) for role in order}
            built = {role: futures[role].result() for role in jobs}
    summary["models"] = {role: built[role] for role in jobs}
    return summary


def _pretrain_role(role: str, family: str, arch: dict, vocab_size: int, max_positions: int, steps: int, lr: float,
                   batch: int, seq_len: int, seed: int, threads: int, contexts: list[str], out_dir: str,
                   trust_remote_code: bool = False) -> dict:
    """Build, pre-train and save one tiny model next to its saved tokenizer (out_dir/<role>); return its summary."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from .models import count_parameters
    from .params import Architecture

    # A float reduction split over n threads sums in an n-dependent order: the weights would depend on the
    # machine's core count or OMP_NUM_THREADS. A fixed count makes them a function of the params alone.
    torch.set_num_threads(threads)
    d = Path(out_dir) / role
    tok = PreTrainedTokenizerFast.from_pretrained(d, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    cfg = make_config(family, Architecture(**arch), vocab_size, max_positions=max_positions)
    model = AutoModelForCausalLM.from_config(cfg)
    losses = pretrain(model, tok, contexts, steps, lr, batch, seq_len, seed, desc=f"pretrain {role}")
    model.save_pretrained(d, safe_serialization=True)
    return {
        "architecture": cfg.architectures[0] if cfg.architectures else type(model).__name__,
        "parameters": count_parameters(model), "vocab_size": len(tok), "tokenizer": family,
        "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
        "pretrain_loss_first": round(losses[0], 4) if losses else None,
        "pretrain_loss_last": round(losses[-1], 4) if losses else None,
    }


def point_to_hub(params, out_dir) -> dict:
    """Paper profile: write hub.json pointers (pinned revisions) and read sizes from the configs."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    summary = {"models": {}}
    for role, src in params.active.models.items():
        if not src.hub:
            raise ValueError(f"profiles.{params.profile}.models.{role}: the paper profile expects hub + revision")
        cfg = AutoConfig.from_pretrained(src.hub, revision=src.revision, trust_remote_code=params.models.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src.hub, revision=src.revision,
                                            trust_remote_code=params.models.trust_remote_code)
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        d = Path(out_dir) / role
        d.mkdir(parents=True)
        (d / "hub.json").write_text(json.dumps(
            {"hub": src.hub, "revision": src.revision, "chat_template": src.chat_template}, indent=2) + "\n")
        summary["models"][role] = {"architecture": cfg.architectures[0], "parameters": n, "vocab_size": len(tok),
                                   "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                   "hub": src.hub, "revision": src.revision}
    return summary


# --- The small profile: real pretrained models (converted by the pretrained stage) and a layer-pruned student ---

def kept_layers(total: int, keep: int) -> list[int]:
    """The `keep` of `total` decoder layers a pruned student keeps: evenly spaced, the first and the last included.

    Index i of the student is round(i * (total - 1) / (keep - 1)) (halves up, exact integer arithmetic). Evenly
    spaced layers initialise the student as DistilBERT's one layer in two (Sanh et al. 2019, section 3) and
    keep the first layer (next to the embeddings) and the last (next to the tied output head).
    Errors: ValueError unless 2 <= keep <= total.
    """
    if not 2 <= keep <= total:
        raise ValueError(f"keep_layers {keep}: must be in [2, {total}] (the source model has {total} layers)")
    return [(2 * i * (total - 1) + (keep - 1)) // (2 * (keep - 1)) for i in range(keep)]


def prune_layers(model, keep: list[int]):
    """A new causal LM holding copies of `model`'s decoder layers `keep` (in that order) and all its other weights.

    `model` (a transformers decoder with `model.layers`, e.g. Llama) is not changed. Layer keep[j] becomes
    layer j; the config's num_hidden_layers (and layer_types, where the architecture has them) follow.
    Errors: ValueError on an index outside the model's layers or a repeated one.
    """
    import copy
    import re

    total = model.config.num_hidden_layers
    if len(set(keep)) != len(keep) or not all(0 <= i < total for i in keep):
        raise ValueError(f"layers {keep}: need distinct indices in [0, {total})")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [model.config.layer_types[i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            state[name] = tensor.clone()
        elif int(m[1]) in new_index:
            state[f"model.layers.{new_index[int(m[1])]}.{m[2]}"] = tensor.clone()
    pruned = type(model)(cfg)
    pruned.load_state_dict(state, strict=True)
    return pruned.to(model.dtype).eval()


def build_pretrained(params, pretrained_dir, out_dir, contexts: list[str]) -> dict:
    """Small profile: every model of the profile into out_dir/<name> from the converted checkpoints; a summary.

    A model with `keep_layers` is a layer-pruned copy (`kept_layers`, `prune_layers`) of its pretrained model,
    retrained on `contexts` (the training split's) when it has `heal` (`pretrain`: distilled from the unpruned model
    with heal.objective kd, as a causal LM with lm; base_models.threads torch threads, params.seed); the others are
    copied as they are. Each gets its chat template (params: chat_template). Reads pretrained_dir/<pretrained name>
    (the pretrained stage's output); ModelLoadError when one is missing.
    """
    import shutil
    from pathlib import Path

    import torch

    from .models import count_parameters, load_model, load_tokenizer
    from .prompts import set_chat_template

    torch.set_num_threads(params.base_models.threads)   # the healed weights depend on it (see _pretrain_role)
    summary = {"models": {}}
    for name, src in params.active.models.items():
        source, dest = Path(pretrained_dir) / src.pretrained, Path(out_dir) / name
        if src.keep_layers is None:
            tok = load_tokenizer(str(source), trust_remote_code=params.models.trust_remote_code)
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                        "chat_template.jinja"))
            model, keep = None, None
        else:
            model, tok = load_model(str(source), dtype="float32", trust_remote_code=params.models.trust_remote_code)
            keep = kept_layers(model.config.num_hidden_layers, src.keep_layers)
            source_model = model
            model = prune_layers(model, keep)
            heal = src.heal and pretrain(model, tok, contexts, src.heal.steps, src.heal.lr, src.heal.batch,
                                         src.heal.seq_len, params.seed, desc=f"heal {name}",
                                         teacher=source_model if src.heal.objective == "kd" else None)
            del source_model
            model.save_pretrained(dest, safe_serialization=True)
        set_chat_template(tok, src.chat_template)
        tok.save_pretrained(dest)
        summary["models"][name] = _checkpoint_summary(dest, tok, src.pretrained, keep,
                                                      count_parameters(model) if model is not None else None,
                                                      trust_remote_code=params.models.trust_remote_code)
        if keep is not None and heal:
            summary["models"][name].update(heal_loss_first=round(heal[0], 4), heal_loss_last=round(heal[-1], 4))
    return summary


def _checkpoint_summary(path, tok, pretrained: str, keep: list[int] | None, parameters: int | None, *,
                        trust_remote_code: bool = False) -> dict:
    """Architecture, parameters (counted on the meta device unless given), layers and vocabulary of a checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if parameters is None:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    out = {"architecture": cfg.architectures[0], "parameters": parameters, "vocab_size": len(tok),
           "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "pretrained": pretrained}
    if keep is not None:
        out["kept_layers"] = keep
    return out
