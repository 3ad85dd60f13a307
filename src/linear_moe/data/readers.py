"""Reading raw text inputs: finding the files, cutting them into work units, yielding documents.

Formats: ``.txt`` (one file = one document), ``.jsonl``/``.json`` (one JSON object per line, the
``text_field`` holds the document; a ``.json`` file may also hold one array of objects), each
optionally ``.gz``; ``.parquet`` (read with ``pyarrow``, imported only when needed: it is the
library HF ``datasets`` stores Parquet with, and reads local files without any hub access).
A work unit is a whole file, a line-aligned byte range of a plain JSONL file, or a Parquet row group.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")


@dataclass(frozen=True)
class WorkUnit:
    """One worker's share of the input: ``kind`` is text | jsonl | json | parquet; a JSONL unit
    covers bytes ``[start, end)``, a Parquet unit one ``row_group``."""
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


def make_units(files: list[Path], chunk_bytes: int) -> list[WorkUnit]:
    """Cut plain JSONL files into ``chunk_bytes`` ranges and Parquet files into row groups; other
    files (text, JSON arrays, anything gzipped: not seekable) are one unit each."""
    units = []
    for f in files:
        kind, size = _kind(f), f.stat().st_size
        if kind == "jsonl" and not f.name.lower().endswith(".gz"):
            units += [WorkUnit(str(f), kind, s, min(s + chunk_bytes, size), size=min(chunk_bytes, size - s))
                      for s in range(0, max(size, 1), chunk_bytes)]
        elif kind == "parquet":
            pq = _pyarrow_parquet()
            meta = pq.ParquetFile(f).metadata
            units += [WorkUnit(str(f), kind, row_group=i, size=meta.row_group(i).total_byte_size)
                      for i in range(meta.num_row_groups)]
        else:
            units.append(WorkUnit(str(f), kind, size=size))
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


def _read_jsonl_range(unit: WorkUnit, text_field: str):
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


def read_unit(unit: WorkUnit, text_field: str):
    """Yield the unit's document texts in order."""
    try:
        yield from _read_unit(unit, text_field)
    except UnicodeDecodeError as e:
        raise DataError(f"{unit.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_unit(unit: WorkUnit, text_field: str):
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
            # split on "\n" only: str.splitlines() would also cut at U+2028 inside JSON strings
            for n, line in enumerate(content.split("\n"), 1):
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
            if text is None:  # a null cell is an empty document
                continue
            if not isinstance(text, str):
                raise DataError(f"{unit.path} row group {unit.row_group} row {i}: {text_field!r} is {type(text).__name__}, not a string")
            yield text


def iter_texts(inputs, text_field: str = "text"):
    """Every non-empty document of ``inputs`` (files, directories, globs), in order, in this process.

    For training a tokenizer on the same inputs ``prepare_data`` will tokenize:
    ``train_bpe_tokenizer(iter_texts(inputs), 32000, "tok/tokenizer.json")``.
    """
    for unit in make_units(expand_inputs(inputs), chunk_bytes=1 << 62):
        for text in read_unit(unit, text_field):
            if text.strip():
                yield text
