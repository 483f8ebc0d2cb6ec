"""Records of a prepared split -> tokenized training examples for one tokenizer."""

from __future__ import annotations

from . import layout
from .data import QARecord
from .io import read_jsonl
from .prompts import build_example


def load_split(name: str) -> list[QARecord]:
    """The records of a prepared split (train | validation | test) from data/prepared/<name>.jsonl."""
    return [QARecord.from_dict(r) for r in read_jsonl(layout.split_file(name))]


def tokenized(records, tokenizer, system: str, max_length: int, max_prompt_length: int):
    """One telekd.prompts.Example per record (chat prompt + answer, lengths in tokens; see build_example)."""
    return [build_example(tokenizer, r, system, max_length, max_prompt_length) for r in records]
