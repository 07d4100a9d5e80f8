"""adaccel's own metadata written next to a checkpoint (`adaccel_model.json`): its id, whether its
weights are random, where it came from. Read without importing torch or transformers, so the stack
and the benches' result files can name a model cheaply."""

from __future__ import annotations

import json
from pathlib import Path

CARD_FILE = "adaccel_model.json"


def read_model_card(path: Path) -> dict:
    """The card beside a checkpoint, {} for a checkpoint without one (a user's own)."""
    card = Path(path) / CARD_FILE
    if not card.is_file():
        return {}
    return json.loads(card.read_text())
