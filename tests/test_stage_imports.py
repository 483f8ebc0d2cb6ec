"""Start-up cost of the stage scripts: what a stage's module level loads before its main() runs.

About a hundred stage processes run in one study, so every heavy library a script loads at module level is paid
by each of them, also where it is not needed (`python stages/x.py --help`, a stage that fails its checks, a test
that runs the script in-process). Each script is run in a fresh interpreter as `runpy.run_path(script,
run_name="stage")` (its module level, not main()) and the third-party packages it loaded are compared with the
one it may load: pydantic (and its own dependencies), which telekd.params needs to validate params.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = sorted(p.name for p in (ROOT / "stages").glob("*.py"))
# The packages params.yaml's validation needs (telekd.params): pydantic and what pydantic itself imports.
ALLOWED = {"pydantic", "pydantic_core", "annotated_types", "typing_extensions", "typing_inspection"}
# What the heavy work loads (measured with `python -X importtime`: torch ~1.2 s, sentence-transformers ~4 s,
# ragas ~2.4 s, xgrammar ~1.8 s, rouge-score through nltk ~0.7 s beyond scipy.stats, ...)
HEAVY = {"torch", "transformers", "sentence_transformers", "bert_score", "ragas", "xgrammar", "peft", "trl",
         "accelerate", "datasets", "dvclive", "scipy", "numpy", "statsmodels", "matplotlib", "sklearn", "rouge_score",
         "nltk", "sacrebleu", "tokenizers", "safetensors", "gguf"}

PROBE = """
import json, runpy, sys
before = set(sys.modules)
runpy.run_path(sys.argv[1], run_name="stage")
loaded = {m.split(".")[0] for m in set(sys.modules) - before}
print(json.dumps(sorted(m for m in loaded - set(sys.stdlib_module_names) if not m.startswith(("telekd", "_")))))
"""


def module_level_packages(script) -> set[str]:
    """Top-level third-party packages the script at path `script` loads at module level, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", PROBE, str(script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return set(json.loads(p.stdout.splitlines()[-1]))


def test_every_stage_script_is_probed():
    assert len(STAGES) >= 14 and {"eval_llm.py", "eval_embed.py", "eval_ngram.py", "vanilla.py", "dskd.py"} <= set(STAGES)


@pytest.mark.parametrize("script", STAGES)
def test_stage_module_level_loads_no_heavy_library(script):
    loaded = module_level_packages(ROOT / "stages" / script)
    assert not loaded & HEAVY, f"stages/{script} loads {sorted(loaded & HEAVY)} at module level: import it in main()"
    assert loaded <= ALLOWED, f"stages/{script} loads {sorted(loaded - ALLOWED)} at module level"


def test_probe_sees_module_level_imports_and_not_main(tmp_path):
    """The probe is not blind: a script importing numpy at module level reports it; one importing it in main() not."""
    top, lazy = tmp_path / "top.py", tmp_path / "lazy.py"
    top.write_text("import numpy\n\n\ndef main():\n    pass\n")
    lazy.write_text("def main():\n    import numpy\n\n\nif __name__ == '__main__':\n    main()\n")
    assert "numpy" in module_level_packages(top)
    assert module_level_packages(lazy) == set()
