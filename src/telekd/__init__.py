"""telekd: knowledge distillation of domain-adapted LLMs for telecom QA, as a DVC pipeline."""

import os

# Nothing the project runs may reach the network: no hub downloads, no telemetry.
# (The paper profile downloads pinned checkpoints only when a user sets TELEKD_ALLOW_DOWNLOADS=1.)
if os.environ.get("TELEKD_ALLOW_DOWNLOADS") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
