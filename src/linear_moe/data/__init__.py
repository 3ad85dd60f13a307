"""Data: corpus, tokenizer, token caches, Megatron indexed datasets, blending, packing, batches.

Default path (``linear-moe train`` with no arguments): ``prepare_default_dataset()`` tokenizes the
bundled corpus once into a cache, ``TokenBatcher`` serves reproducible batches from it.
Prepared data (``linear-moe prepare-data``): ``prepare_data()`` writes Megatron ``.bin/.idx``
datasets; ``BlendedLoader`` mixes them by weight, resumably, optionally packed (``cu_seqlens``).
"""
from .batcher import TokenBatcher
from .corpus import CORPORA, DEFAULT_CORPUS, iter_documents
from .errors import DataError
from .indexed import IndexedDataset, IndexedDatasetWriter, merge_indexed_datasets, write_indexed_dataset
from .loader import BlendedLoader, parse_blend
from .packing import IGNORE_INDEX, PackedBatch, pack_windows
from .prepare import PreparedData, prepare_data
from .readers import iter_texts
from .sources import default_val_source, open_source
from .stats import unigram_entropy
from .token_cache import DatasetInfo, default_cache_root, open_tokens, prepare_default_dataset
from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BlendedLoader", "CORPORA", "DEFAULT_CORPUS", "DataError", "DatasetInfo", "IGNORE_INDEX",
    "IndexedDataset", "IndexedDatasetWriter", "PackedBatch", "PreparedData", "TokenBatcher",
    "Tokenizer", "default_cache_root", "default_val_source", "iter_documents", "iter_texts", "load_tokenizer",
    "merge_indexed_datasets", "open_source", "open_tokens", "pack_windows", "parse_blend",
    "prepare_data", "prepare_default_dataset", "train_bpe_tokenizer", "unigram_entropy",
    "write_indexed_dataset",
]
