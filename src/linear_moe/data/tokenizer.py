"""Subword tokenizers: train a byte-level BPE on a corpus, load any HF ``tokenizer.json``.

``Tokenizer`` is a thin wrapper over the ``tokenizers`` library with the five things the rest of
linear-moe needs: ``encode``, ``decode``, ``vocab_size``, ``eos_id``, ``bos_id`` (plus ``pad_id``
and a content hash that token caches record, so a changed tokenizer invalidates them).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]

# End-of-text spellings used by common HF tokenizers, tried in order when no config names one.
_EOS_CANDIDATES = [EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]"]
_BOS_CANDIDATES = ["<s>", "<|begin_of_text|>", "<bos>", "[CLS]"]
_PAD_CANDIDATES = [PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>"]


class Tokenizer:
    """A loaded tokenizer. ``encode`` never adds special tokens; callers add ``eos_id`` themselves."""

    def __init__(self, hf: HFTokenizer, *, eos_token: str | None = None,
                 bos_token: str | None = None, pad_token: str | None = None, sha256: str = ""):
        self.hf = hf
        self.sha256 = sha256
        self.eos_id = self._find(eos_token, _EOS_CANDIDATES)
        if self.eos_id is None:
            raise DataError(f"tokenizer has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")
        # GPT-2 style vocabularies have one <|endoftext|> used both to open and close documents.
        bos = self._find(bos_token, _BOS_CANDIDATES)
        self.bos_id = self.eos_id if bos is None else bos
        pad = self._find(pad_token, _PAD_CANDIDATES)
        self.pad_id = self.eos_id if pad is None else pad

    def _find(self, preferred: str | None, candidates: list[str]) -> int | None:
        for tok in ([preferred] if preferred else []) + candidates:
            idx = self.hf.token_to_id(tok)
            if idx is not None:
                return idx
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids (added special tokens included); every id is < vocab_size."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (the Rust side parallelizes over them)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (specials included); write it atomically to ``path``.

    Byte-level means any string round-trips exactly; no <unk> is ever needed.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size={vocab_size} is too small; a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + specials + 1 merge)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    hf.save(str(tmp))
    os.replace(tmp, path)
    return load_tokenizer(path)


def _special_from_config(config_path: Path, key: str) -> str | None:
    """Read e.g. ``eos_token`` from an HF ``tokenizer_config.json`` (a string or an AddedToken dict)."""
    try:
        value = json.loads(config_path.read_text()).get(key)
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (or a directory holding one, e.g. an HF model folder).

    Special tokens come from a sibling ``tokenizer_config.json`` when it names them, else from
    the usual spellings (``<|endoftext|>``, ``</s>``, ...).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {first}") from None
    config = path.with_name("tokenizer_config.json")
    specials = {k: _special_from_config(config, f"{k}_token") if config.is_file() else None
                for k in ("eos", "bos", "pad")}
    return Tokenizer(hf, eos_token=specials["eos"], bos_token=specials["bos"],
                     pad_token=specials["pad"], sha256=hashlib.sha256(raw).hexdigest())
