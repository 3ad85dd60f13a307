"""Data: corpus, tokenizer, token caches and batches.

Default path (``linear-moe train`` with no arguments): ``prepare_default_dataset()`` tokenizes the
bundled corpus once into a cache, ``TokenBatcher`` serves reproducible batches from it.
"""
from .batcher import TokenBatcher
from .corpus import CORPORA, DEFAULT_CORPUS, iter_documents
from .errors import DataError
from .stats import unigram_entropy
from .token_cache import DatasetInfo, default_cache_root, open_tokens, prepare_default_dataset
from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "CORPORA", "DEFAULT_CORPUS", "DataError", "DatasetInfo", "TokenBatcher", "Tokenizer",
    "default_cache_root", "iter_documents", "load_tokenizer", "open_tokens",
    "prepare_default_dataset", "train_bpe_tokenizer", "unigram_entropy",
]
