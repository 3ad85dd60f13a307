"""Loads the task's JSONL from beside this file, so the task never touches the network."""
import json
from pathlib import Path


def load_docs(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "test.jsonl").read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
