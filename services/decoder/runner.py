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
        """Each block tokenized alone (so a block's tokens are the same wherever it appears), then joined.

        The first block gets the tokenizer's special prefix (e.g. BOS) if it adds one.
        """
        tokenizer = self.loaded.tokenizer
        ids: list[int] = []
        for i, block in enumerate(blocks):
            ids.extend(tokenizer(block.text, add_special_tokens=(i == 0))["input_ids"])
            if len(ids) > self.max_prompt_tokens:
                break
        if len(ids) > self.max_prompt_tokens:
            raise InvalidArgument(f"blocks: prompt exceeds {self.max_prompt_tokens} tokens")
        return ids

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
