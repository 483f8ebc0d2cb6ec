"""Peak memory of the KD divergence (forward + backward) at vocabulary 32,000 over 4 x 512 tokens: chunked vs plain.

Each measurement runs in a fresh process (peak RSS above the inputs' baseline), A B A B.
    .venv/bin/python bench/loss_memory.py [--reps 2] [--chunk 256]
Writes bench/results/loss_memory.json.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path


def measure(chunk: int | None, kind: str) -> dict:
    import torch

    from telekd.losses import divergence

    torch.manual_seed(0)
    s = torch.randn(4, 512, 32000, requires_grad=True)
    t = torch.randn(4, 512, 32000)
    mask = torch.ones(4, 512, dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = divergence(kind, s, t, mask, temperature=2.0, chunk_size=chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"value": loss.item(), "peak_above_inputs_mib": round((peak - base) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--kind", default="forward_kl")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(measure(None if a.child == "plain" else int(a.child), a.kind)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for _ in range(a.reps):
        for mode, arg in (("plain", "plain"), ("chunked", str(a.chunk))):
            out = subprocess.run([sys.executable, __file__, "--child", arg, "--kind", a.kind], capture_output=True,
                                 text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = {m: min(r["peak_above_inputs_mib"] for r in v) for m, v in runs.items()}
    tensor_mib = 4 * 512 * 32000 * 4 / 2**20
    result = {"benchmark": "loss_memory", "kind": a.kind, "tokens": 4 * 512, "vocab": 32000, "chunk_size": a.chunk,
              "one_fp32_logits_tensor_mib": round(tensor_mib, 1), "runs": runs, "peak_above_inputs_mib": peak,
              "ratio_chunked_over_plain": round(peak["chunked"] / peak["plain"], 3),
              "same_value": abs(runs["plain"][0]["value"] - runs["chunked"][0]["value"]) < 1e-4,
              "machine": platform.machine(), "python": platform.python_version(),
              "command": f"python bench/loss_memory.py --reps {a.reps} --chunk {a.chunk} --kind {a.kind}"}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/loss_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"one fp32 [2048 x 32000] tensor: {tensor_mib:.0f} MiB")
    for m, v in peak.items():
        print(f"{m:<8} peak above inputs {v} MiB")
    print(f"chunked / plain = {result['ratio_chunked_over_plain']}; same value: {result['same_value']}")


if __name__ == "__main__":
    main()
