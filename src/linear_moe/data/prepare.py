"""Turn raw text (plain text, JSON Lines, Parquet) into a Megatron indexed dataset, in parallel.

    prepare_data(["books/", "web.jsonl"], "tokenizer_dir/", "data/mix", workers=8)

writes ``data/mix.bin``, ``data/mix.idx`` and ``data/mix.json`` (tokenizer hash, vocab, counts).
Inputs are cut into work units (a text file; a line-aligned byte range of a JSONL file; a Parquet
row group), each unit is tokenized by a worker process into its own shard, and the shards are
merged in input order, so the output does not depend on the number of workers. Each document gets
one EOS appended. Nothing appears under the output names until everything succeeded.

Formats: ``.txt`` (one file = one document), ``.jsonl``/``.json`` (one JSON object per line, the
``text_field`` holds the document; a ``.json`` file may also hold one array of objects), each
optionally ``.gz``; ``.parquet`` (read with ``pyarrow``, imported only when needed: it is the
library HF ``datasets`` stores Parquet with, and reads local files without any hub access).
"""
from __future__ import annotations

import glob
import gzip
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .indexed import IndexedDatasetWriter, bin_path, idx_path, index_dtype, merge_indexed_datasets
from .tokenizer import Tokenizer, load_tokenizer

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
_ENCODE_BATCH = 256  # documents per encode_batch call


@dataclass(frozen=True)
class PreparedData:
    """What ``prepare_data`` wrote."""
    prefix: Path
    documents: int
    tokens: int
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str


@dataclass(frozen=True)
class _Unit:
    """One worker's share: ``kind`` is text | jsonl | json | parquet; ``part`` a byte range or row group."""
    path: str
    kind: str
    start: int = 0
    end: int = -1
    row_group: int = -1
    size: int = 0  # bytes, for the progress bar


def _kind(path: Path) -> str:
    name = path.name.lower()
    plain = name.removesuffix(".gz")
    for suffix, kind in ((".txt", "text"), (".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if plain.endswith(suffix) and not (kind == "parquet" and name.endswith(".gz")):
            return kind
    raise DataError(f"input {str(path)!r} has an unsupported type; allowed suffixes: {', '.join(SUFFIXES)}")


def expand_inputs(inputs) -> list[Path]:
    """Files, directories (searched recursively for supported suffixes) and glob patterns -> files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(c in s for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"input pattern {s!r} matches no file")
            files += [m for m in matches if m.is_file()]
        elif Path(s).is_dir():
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
            if not found:
                raise DataError(f"input directory {s!r} holds no {', '.join(SUFFIXES)} file")
            files += found
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise DataError(f"input {s!r} does not exist")
    for f in files:
        _kind(f)
    if not files:
        raise DataError("prepare_data needs at least one input file")
    return files


def _units(files: list[Path], chunk_bytes: int) -> list[_Unit]:
    units = []
    for f in files:
        kind, size = _kind(f), f.stat().st_size
        if kind == "jsonl" and not f.name.lower().endswith(".gz"):
            units += [_Unit(str(f), kind, s, min(s + chunk_bytes, size), size=min(chunk_bytes, size - s))
                      for s in range(0, max(size, 1), chunk_bytes)]
        elif kind == "parquet":
            pq = _pyarrow_parquet()
            meta = pq.ParquetFile(f).metadata
            units += [_Unit(str(f), kind, row_group=i, size=meta.row_group(i).total_byte_size)
                      for i in range(meta.num_row_groups)]
        else:
            units.append(_Unit(str(f), kind, size=size))
    return units


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow (HF datasets installs it too)") from None
    return pq


def _field(obj, text_field: str, where: str) -> str:
    if not isinstance(obj, dict) or text_field not in obj:
        raise DataError(f"{where}: no {text_field!r} field (set text_field to the key holding the text)")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.lower().endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl_range(unit: _Unit, text_field: str):
    """Lines that *start* in [start, end): a line cut by a boundary belongs to the unit it starts in."""
    with open(unit.path, "rb") as f:
        f.seek(max(unit.start - 1, 0))
        if unit.start > 0:
            f.readline()  # finish the line that began before our range
        while f.tell() < unit.end:
            pos = f.tell()
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{unit.path} at byte {pos}: not valid JSON ({e})") from None
                yield _field(obj, text_field, f"{unit.path} at byte {pos}")


def _read_unit(unit: _Unit, text_field: str):
    """Yield the unit's document texts in order."""
    if unit.kind == "text":
        with _open_text(unit.path) as f:
            yield f.read()
    elif unit.kind == "jsonl" and not unit.path.lower().endswith(".gz"):
        yield from _read_jsonl_range(unit, text_field)
    elif unit.kind in ("jsonl", "json"):
        with _open_text(unit.path) as f:
            content = f.read()
        if content.lstrip().startswith("["):
            try:
                rows = json.loads(content)
            except json.JSONDecodeError as e:
                raise DataError(f"{unit.path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            for i, obj in enumerate(rows):
                yield _field(obj, text_field, f"{unit.path} item {i}")
        else:
            for n, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{unit.path} line {n}: not valid JSON ({e.msg})") from None
                    yield _field(obj, text_field, f"{unit.path} line {n}")
    else:  # parquet
        pq = _pyarrow_parquet()
        pf = pq.ParquetFile(unit.path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{unit.path}: no {text_field!r} column; columns are {', '.join(pf.schema_arrow.names)}")
        for i, text in enumerate(pf.read_row_group(unit.row_group, columns=[text_field]).column(0).to_pylist()):
            if not isinstance(text, str):
                raise DataError(f"{unit.path} row group {unit.row_group} row {i}: {text_field!r} is {type(text).__name__}, not a string")
            yield text


_tokenizers: dict[str, Tokenizer] = {}


def _process_unit(unit: _Unit, tokenizer_path: str, text_field: str, dtype: str, shard: str,
                  append_eos: bool) -> tuple[int, int]:
    """Tokenize one unit into the shard ``<shard>.bin/.idx``; returns (documents, tokens)."""
    tok = _tokenizers.get(tokenizer_path) or _tokenizers.setdefault(tokenizer_path, load_tokenizer(tokenizer_path))
    docs = tokens = 0
    with IndexedDatasetWriter(shard, dtype) as w:
        batch: list[str] = []

        def flush():
            nonlocal docs, tokens
            for ids in tok.encode_batch(batch):
                if append_eos:
                    ids.append(tok.eos_id)
                w.add_document(ids)
                docs, tokens = docs + 1, tokens + len(ids)
            batch.clear()

        for text in _read_unit(unit, text_field):
            if text.strip():  # empty documents carry nothing to learn (Megatron skips them too)
                batch.append(text)
                if len(batch) == _ENCODE_BATCH:
                    flush()
        flush()
    return docs, tokens


def _worker_init() -> None:
    # N worker processes each running a Rust thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def prepare_data(inputs, tokenizer_dir: str | Path, output_prefix: str | Path, text_field: str = "text",
                 workers: int = 1, *, dtype: str | None = None, append_eos: bool = True,
                 chunk_bytes: int = 16 << 20, progress: bool = True) -> PreparedData:
    """Tokenize ``inputs`` with the tokenizer in ``tokenizer_dir`` into ``<output_prefix>.bin/.idx``.

    ``workers`` processes share the work (1: in this process). ``dtype`` defaults to uint16 for
    vocabularies below 65500, else int32 (as Megatron). Returns counts and paths.
    """
    if workers < 1:
        raise DataError(f"workers={workers} must be >= 1")
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes={chunk_bytes} must be >= 1")
    tok_path = Path(tokenizer_dir)
    tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    tok = load_tokenizer(tok_path)
    dt = dtype or str(index_dtype(tok.vocab_size))
    files = expand_inputs(inputs)
    units = _units(files, chunk_bytes)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(f"{prefix}.shards.tmp-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    shards = [str(work / f"{i:06d}") for i in range(len(units))]
    args = [(u, str(tok_path), text_field, dt, s, append_eos) for u, s in zip(units, shards)]
    docs = tokens = 0
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TextColumn("{task.fields[docs]:,} docs {task.fields[tokens]:,} tokens"),
                   TimeRemainingColumn(), disable=not progress)
    try:
        with bar:
            task = bar.add_task("tokenize", total=max(sum(u.size for u in units), 1), docs=0, tokens=0)
            if workers == 1:
                for a in args:
                    d, t = _process_unit(*a)
                    docs, tokens = docs + d, tokens + t
                    bar.update(task, advance=a[0].size, docs=docs, tokens=tokens)
            else:
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                    futures = {pool.submit(_process_unit, *a): a[0] for a in args}
                    for fut in as_completed(futures):
                        d, t = fut.result()
                        docs, tokens = docs + d, tokens + t
                        bar.update(task, advance=futures[fut].size, docs=docs, tokens=tokens)
        merge_indexed_datasets(shards, prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"format": "megatron-mmap-indexed-v1", "dtype": dt, "documents": docs, "tokens": tokens,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer_sha256": tok.sha256,
            "text_field": text_field, "inputs": [str(f) for f in files]}
    tmp = Path(f"{prefix}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, f"{prefix}.json")
    return PreparedData(prefix=prefix, documents=docs, tokens=tokens, dtype=dt, vocab_size=tok.vocab_size,
                        eos_id=tok.eos_id, tokenizer_sha256=tok.sha256)
