"""Turn raw text (plain text, JSON Lines, Parquet) into Megatron indexed datasets, in parallel.

    prepare_data(["books/", "web.jsonl"], "tokenizer_dir/", "data/mix", workers=8, val_fraction=0.01)

writes ``data/mix.bin/.idx`` (training documents), ``data/mix_val.bin/.idx`` (held out, when
``val_fraction > 0``) and ``data/mix.json`` (tokenizer hash, vocab, counts). The inputs are cut
into work units (see ``readers``); each unit is tokenized by a worker process into its own shard
and the shards are merged in input order, so the output does not depend on the number of workers.
Each document gets one EOS appended. Nothing appears under the output names until all succeeded.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .indexed import IndexedDatasetWriter, index_dtype, merge_indexed_datasets
from .readers import WorkUnit, expand_inputs, make_units, read_unit
from .tokenizer import Tokenizer, load_tokenizer

_ENCODE_BATCH = 256  # documents per encode_batch call
_VAL_BUCKETS = 1_000_000


@dataclass(frozen=True)
class PreparedData:
    """What ``prepare_data`` wrote. ``val_prefix`` is None without a validation split."""
    prefix: Path
    documents: int
    tokens: int
    val_prefix: Path | None
    val_documents: int
    val_tokens: int
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str


def is_validation(text: str, val_fraction: float) -> bool:
    """Held out by a hash of the text: independent of file order and worker count, and an exact
    duplicate always lands on the same side (no train/val leakage through duplicates)."""
    return zlib.crc32(text.encode("utf-8")) % _VAL_BUCKETS < val_fraction * _VAL_BUCKETS


_tokenizers: dict[str, Tokenizer] = {}


def _process_unit(unit: WorkUnit, tokenizer_path: str, text_field: str, dtype: str, shard: str,
                  append_eos: bool, val_fraction: float) -> tuple[int, int, int, int]:
    """Tokenize one unit into shards ``<shard>`` (train) and ``<shard>_val``.

    Returns (train documents, train tokens, val documents, val tokens)."""
    tok = _tokenizers.get(tokenizer_path) or _tokenizers.setdefault(tokenizer_path, load_tokenizer(tokenizer_path))
    counts = [0, 0, 0, 0]
    with IndexedDatasetWriter(shard, dtype) as train, IndexedDatasetWriter(f"{shard}_val", dtype) as val:
        batch: list[str] = []

        def flush():
            for text, ids in zip(batch, tok.encode_batch(batch)):
                if append_eos:
                    ids.append(tok.eos_id)
                held_out = val_fraction > 0 and is_validation(text, val_fraction)
                (val if held_out else train).add_document(ids)
                counts[2 * held_out] += 1
                counts[2 * held_out + 1] += len(ids)
            batch.clear()

        for text in read_unit(unit, text_field):
            if text.strip():  # empty documents carry nothing to learn (Megatron skips them too)
                batch.append(text)
                if len(batch) == _ENCODE_BATCH:
                    flush()
        flush()
    return tuple(counts)


def _worker_init() -> None:
    # N worker processes each running a Rust thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run(args: list[tuple], workers: int, progress: bool) -> list[int]:
    """Process every unit (in worker processes when ``workers > 1``) under a rich progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    totals = [0, 0, 0, 0]
    bar = Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TextColumn("{task.fields[docs]:,} docs {task.fields[tokens]:,} tokens"),
                   TimeRemainingColumn(), disable=not progress)

    def done(unit: WorkUnit, counts) -> None:
        for i, c in enumerate(counts):
            totals[i] += c
        bar.update(task, advance=unit.size, docs=totals[0] + totals[2], tokens=totals[1] + totals[3])

    with bar:
        task = bar.add_task("tokenize", total=max(sum(a[0].size for a in args), 1), docs=0, tokens=0)
        if workers == 1:
            for a in args:
                done(a[0], _process_unit(*a))
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_process_unit, *a): a[0] for a in args}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
    return totals


def prepare_data(inputs, tokenizer_dir: str | Path, output_prefix: str | Path, text_field: str = "text",
                 workers: int = 1, *, val_fraction: float = 0.0, dtype: str | None = None,
                 append_eos: bool = True, chunk_bytes: int = 16 << 20, progress: bool = True) -> PreparedData:
    """Tokenize ``inputs`` (files, directories, globs) with the tokenizer in ``tokenizer_dir`` into
    ``<output_prefix>.bin/.idx`` (+ ``<output_prefix>_val.bin/.idx`` when ``val_fraction > 0``).

    ``workers`` processes share the work (1: in this process). ``dtype`` defaults to uint16 for
    vocabularies below 65500, else int32 (as Megatron). Returns counts and paths.
    """
    if workers < 1:
        raise DataError(f"workers={workers} must be >= 1")
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes={chunk_bytes} must be >= 1")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    tok_path = Path(tokenizer_dir)
    tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    tok = load_tokenizer(tok_path)
    dt = dtype or str(index_dtype(tok.vocab_size))
    files = expand_inputs(inputs)
    units = make_units(files, chunk_bytes)
    prefix = Path(output_prefix)
    val_prefix = Path(f"{prefix}_val") if val_fraction > 0 else None
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(f"{prefix}.shards.tmp-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    shards = [str(work / f"{i:06d}") for i in range(len(units))]
    try:
        docs, tokens, val_docs, val_tokens = _run(
            [(u, str(tok_path), text_field, dt, s, append_eos, val_fraction) for u, s in zip(units, shards)],
            workers, progress)
        merge_indexed_datasets(shards, prefix)
        if val_prefix is not None:
            merge_indexed_datasets([f"{s}_val" for s in shards], val_prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"format": "megatron-mmap-indexed-v1", "dtype": dt, "documents": docs, "tokens": tokens,
            "val_prefix": val_prefix.name if val_prefix else None, "val_fraction": val_fraction,
            "val_documents": val_docs, "val_tokens": val_tokens, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256, "text_field": text_field,
            "inputs": [str(f) for f in files]}
    tmp = Path(f"{prefix}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, f"{prefix}.json")
    return PreparedData(prefix=prefix, documents=docs, tokens=tokens, val_prefix=val_prefix,
                        val_documents=val_docs, val_tokens=val_tokens, dtype=dt,
                        vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256)
