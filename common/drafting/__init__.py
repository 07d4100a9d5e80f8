"""Draft sources and verification for lookahead-style decoding (no gRPC, no transformers).

trie: n-gram token trie (pure Python + numpy); draft_tree: draft trees and their masks;
pools: pool registry and per-request overlay; verification: acceptance rules (torch).
"""

from common.drafting.draft_tree import DraftTree, FlatTree, ancestor_mask, chain_tree, flatten, merge_drafts
from common.drafting.pools import DraftSettings, PoolRegistry, RequestDrafter
from common.drafting.trie import (
    StreamingInserter,
    TokenTrie,
    TrieSettings,
    extract_ngrams,
    ngram_prefix_counts,
)

__all__ = [
    "DraftSettings",
    "DraftTree",
    "FlatTree",
    "PoolRegistry",
    "RequestDrafter",
    "StreamingInserter",
    "TokenTrie",
    "TrieSettings",
    "ancestor_mask",
    "chain_tree",
    "extract_ngrams",
    "flatten",
    "merge_drafts",
    "ngram_prefix_counts",
]
