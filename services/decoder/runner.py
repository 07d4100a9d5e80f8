"""Turns a validated request into token steps on the loaded model.

Interim: plain greedy decoding with the model's DynamicCache, one token per step; the decoding
engine (drafts + tree verification) replaces `steps` when it lands.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from adaccel.v1 import common_pb2
from common.modeling.loading import LoadedModel
from common.prompt_tokens import PromptTooLong, tokenize_blocks
from common.rpc.errors import InvalidArgument


@dataclass(slots=True)
class Step:
    token_ids: list[int]  # accepted this step, in order
    drafted: int  # draft tokens verified this step


class GenerationRunner:
    def __init__(self, loaded: LoadedModel, *, device: str, max_prompt_tokens: int):
        self.loaded = loaded
        self.device = device
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_token_id = loaded.tokenizer.eos_token_id

    def tokenize_prompt(self, blocks: Sequence[common_pb2.PromptBlock]) -> list[int]:
        try:
            return tokenize_blocks(self.loaded.tokenizer, [b.text for b in blocks], self.max_prompt_tokens).token_ids
        except PromptTooLong as exc:
            raise InvalidArgument(f"blocks: {exc}") from exc

    @torch.inference_mode()
    def steps(self, prompt_ids: list[int], params: common_pb2.GenerationParams) -> Iterator[Step]:
        model = self.loaded.model
        cache = DynamicCache()
        input_ids = torch.tensor([prompt_ids], device=self.device)  # [1, T]
        produced = 0
        while produced < params.max_new_tokens:
            logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits  # [1, q, V]
            token = int(logits[0, -1].argmax())
            produced += 1
            yield Step(token_ids=[token], drafted=0)
            if token == self.eos_token_id:
                return
            input_ids = torch.tensor([[token]], device=self.device)
