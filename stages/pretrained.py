"""Stage pretrained: convert the profile's pinned GGUF models (telekd.gguf) to safetensors checkpoints, once.

Writes models/pretrained/<profile>/<name> for each name in profiles.<profile>.pretrained. The tiny and paper
profiles list none: their folder holds only its manifest (one process start, no model is read).
"""

import tempfile

from telekd import layout
from telekd.forkserver import run_stage
from telekd.io import atomic_path, write_json
from telekd.params import load_params


def main() -> None:
    """Convert profiles.<profile>.pretrained into models/pretrained/<profile>; metrics/pretrained.json per model."""
    p = load_params()
    names = list(p.active.pretrained)
    summary = {}
    with atomic_path(f"{layout.PRETRAINED}/{p.profile}") as out:
        out.mkdir(parents=True)
        if names:
            from telekd import gguf

            with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as work:
                for name in names:
                    try:
                        summary[name] = gguf.convert(name, out / name, work,
                                                     trust_remote_code=p.models.trust_remote_code)
                    except gguf.GGUFError as e:   # a missing package or a changed file: its one line, no traceback
                        raise SystemExit(f"pretrained: {e}") from None
                    print(f"pretrained: {name}: {summary[name]['parameters']:,} parameters, vocabulary "
                          f"{summary[name]['vocab_size']}, {summary[name]['seconds']} s")
        write_json(out / "manifest.json", {"profile": p.profile, "models": sorted(summary)})
    write_json(f"{layout.METRICS}/pretrained.json", {"profile": p.profile, "models": summary})


if __name__ == "__main__":
    run_stage(main)
