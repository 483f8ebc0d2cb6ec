"""Peak memory of the KD divergence (forward + backward) at vocabulary 32,000 over 4 x 512 tokens: chunked vs plain.

The same loss (telekd.losses.divergence) on the same inputs, with and without chunk_size; each
measurement runs in a fresh process (peak RSS above the inputs' baseline), A B A B.
    python bench/loss_memory.py [--reps 2] [--chunk 128]
    python bench/loss_memory.py --smoke      # 2 x 64 tokens, vocabulary 1,024, 1 rep: seconds
Writes bench/results/loss_memory.json.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys

from common import add_output_args, write_result


def measure(chunk: int | None, kind: str, batch: int, seq: int, vocab: int) -> dict:
    import torch

    from telekd.losses import Divergence, divergence

    torch.manual_seed(0)
    s = torch.randn(batch, seq, vocab, requires_grad=True)
    t = torch.randn(batch, seq, vocab)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = divergence(Divergence(kind, 2.0), s, t, mask, chunk_size=chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"value": loss.item(), "peak_above_inputs_mib": round((peak - base) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--kind", default="forward_kl")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_output_args(ap, "2 x 64 tokens, vocabulary 1,024, chunk 16, 1 rep: checks the script in seconds")
    a = ap.parse_args()
    if a.smoke:
        a.reps, a.batch, a.seq, a.vocab, a.chunk = 1, 2, 64, 1024, 16
    if a.child is not None:
        print(json.dumps(measure(None if a.child == "plain" else int(a.child), a.kind, a.batch, a.seq, a.vocab)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for _ in range(a.reps):
        for mode, arg in (("plain", "plain"), ("chunked", str(a.chunk))):
            out = subprocess.run([sys.executable, __file__, "--child", arg, "--kind", a.kind, "--batch", str(a.batch),
                                  "--seq", str(a.seq), "--vocab", str(a.vocab)], capture_output=True, text=True,
                                 check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = {m: min(r["peak_above_inputs_mib"] for r in v) for m, v in runs.items()}
    tensor_mib = a.batch * a.seq * a.vocab * 4 / 2**20
    result = {"benchmark": "loss_memory", "kind": a.kind, "tokens": a.batch * a.seq, "vocab": a.vocab, "chunk_size": a.chunk,
              "one_fp32_logits_tensor_mib": round(tensor_mib, 1), "runs": runs, "peak_above_inputs_mib": peak,
              "ratio_chunked_over_plain": round(peak["chunked"] / peak["plain"], 3),
              "same_value": abs(runs["plain"][0]["value"] - runs["chunked"][0]["value"]) < 1e-4,
              "machine": platform.machine(), "python": platform.python_version()}
    print(f"one fp32 [{a.batch * a.seq} x {a.vocab}] tensor: {tensor_mib:.0f} MiB")
    for m, v in peak.items():
        print(f"{m:<8} peak above inputs {v} MiB")
    print(f"chunked / plain = {result['ratio_chunked_over_plain']}; same value: {result['same_value']}")
    write_result(a, "loss_memory", result)


if __name__ == "__main__":
    main()
