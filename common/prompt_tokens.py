"""How a prompt of blocks becomes token ids: each block tokenized alone, then joined.

Tokenizing blocks separately keeps a block's tokens identical wherever it appears (the property
block KV reuse needs). Two renderings:

* **chat** (the default for a model with a chat template): the leading instruction blocks are
  the system message, the other blocks the user message, framed by the model's own chat template
  and followed by its generation prompt. The template's frame texts are tokenized as pieces of
  their own and folded into the neighbouring block's span (the text before the system message
  and the one between the messages into the instruction block, the text after the user message
  into the last block), so every item and user-history block keeps exactly its raw tokens and its
  KV is found wherever it appears. With SmolLM2's ChatML template a prompt looks like

      <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{history}{item}...{question}<|im_end|>\\n<|im_start|>assistant\\n

* **raw**: the block texts as they are; the first block gets the tokenizer's own special prefix
  (e.g. BOS) if it adds one.

Block texts never produce special tokens: a literal "<|im_end|>" inside an item title is
tokenized as text, so a catalog or a user's history cannot close the user message early. Every
component that turns blocks into ids (decoder, benchmarks, KV reuse) uses this.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock

_SYSTEM_SENTINEL = "\x00adaccel-system\x00"
_USER_SENTINEL = "\x00adaccel-user\x00"


@dataclass(slots=True, frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    # [start, end) token span of each block, in order; together they cover token_ids.
    spans: list[tuple[int, int]]


class PromptTooLong(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class ChatFrame:
    """The texts a chat template puts around a system and a user message.

    >>> frame = ChatFrame.from_template(lambda messages: "".join(
    ...     f"<s>{m['role']}: {m['content']}</s>" for m in messages) + "<s>assistant: ")
    >>> frame.before_system, frame.between, frame.after_user
    ('<s>system: ', '</s><s>user: ', '</s><s>assistant: ')
    >>> frame.before_user_only
    '<s>user: '
    """

    before_system: str
    between: str
    after_user: str
    # Before a user message with no system message (a template may add a default system text).
    before_user_only: str

    @classmethod
    def from_template(cls, render) -> ChatFrame:
        """render(messages) -> the templated text with the generation prompt."""
        both = render([{"role": "system", "content": _SYSTEM_SENTINEL}, {"role": "user", "content": _USER_SENTINEL}])
        user_only = render([{"role": "user", "content": _USER_SENTINEL}])
        if both.count(_SYSTEM_SENTINEL) != 1 or both.count(_USER_SENTINEL) != 1 or user_only.count(_USER_SENTINEL) != 1:
            raise ValueError("the chat template does not place each message's content exactly once")
        before_system, rest = both.split(_SYSTEM_SENTINEL)
        between, after_user = rest.split(_USER_SENTINEL)
        before_user_only, after_user_only = user_only.split(_USER_SENTINEL)
        if after_user_only != after_user:
            raise ValueError("the chat template ends a user message differently with and without a system message")
        return cls(before_system, between, after_user, before_user_only)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFrame | None:
        """The tokenizer's chat template as a frame; None when it has no template."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        return cls.from_template(
            lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def pieces(self, block_texts: Sequence[str], system_blocks: int) -> list[list[tuple[str, bool]]]:
        """Per block, the (text, is_frame) pieces its span is made of. The first `system_blocks`
        blocks form the system message; with none of them, or all, there is only a user message.

        >>> frame = ChatFrame("[S]", "[/S][U]", "[/U][A]", "[U]")
        >>> frame.pieces(["inst", "item", "q"], 1)
        [[('[S]', True), ('inst', False), ('[/S][U]', True)], [('item', False)], [('q', False), ('[/U][A]', True)]]
        >>> frame.pieces(["q"], 0)
        [[('[U]', True), ('q', False), ('[/U][A]', True)]]
        """
        if system_blocks >= len(block_texts):
            system_blocks = 0
        pieces = [[(text, False)] for text in block_texts]
        if not pieces:
            return pieces
        if system_blocks:
            pieces[0].insert(0, (self.before_system, True))
            pieces[system_blocks - 1].append((self.between, True))
        else:
            pieces[0].insert(0, (self.before_user_only, True))
        pieces[-1].append((self.after_user, True))
        return pieces


def leading_instructions(is_instruction: Sequence[bool]) -> int:
    """How many blocks at the start are instructions (they become the system message)."""
    count = 0
    for flag in is_instruction:
        if not flag:
            break
        count += 1
    return count


def tokenize_blocks(tokenizer, block_texts: Sequence[str], max_tokens: int | None = None, *,
                    frame: ChatFrame | None = None, system_blocks: int = 0) -> TokenizedPrompt:
    """Token ids and block spans; `frame` renders through a chat template (see the module doc),
    None sends the texts raw."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    if frame is None:
        per_block = [[(text, False)] for text in block_texts]
    else:
        per_block = frame.pieces(block_texts, system_blocks)
    for i, pieces in enumerate(per_block):
        start = len(ids)
        for text, is_frame in pieces:
            if is_frame:
                ids.extend(_encode(tokenizer, text, add_special=False, split_special=False))
            else:
                # Raw mode keeps the tokenizer's own prefix (BOS) on the first block.
                ids.extend(_encode(tokenizer, text, add_special=frame is None and i == 0, split_special=True))
        spans.append((start, len(ids)))
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(f"prompt exceeds {max_tokens} tokens (at block {i})")
    return TokenizedPrompt(ids, spans)


@functools.lru_cache(maxsize=16)
def chat_frame(tokenizer) -> ChatFrame | None:
    """The tokenizer's chat frame (rendered once per tokenizer), None without a template."""
    return ChatFrame.from_tokenizer(tokenizer.tokenizer if isinstance(tokenizer, BlockTokenizer) else tokenizer)


def tokenize_chat(tokenizer, block_texts: Sequence[str], system_blocks: int, max_tokens: int | None = None, *,
                  raw: bool = False) -> TokenizedPrompt:
    """A prompt as the model sees it: through its chat template when it has one (and not `raw`)."""
    frame = None if raw else chat_frame(tokenizer)
    return tokenize_blocks(tokenizer, block_texts, max_tokens, frame=frame, system_blocks=system_blocks)


def _encode(tokenizer, text: str, *, add_special: bool, split_special: bool) -> list[int]:
    if isinstance(tokenizer, BlockTokenizer):
        return tokenizer.encode(text, add_special=add_special, split_special=split_special)
    return _tokenize(tokenizer, text, add_special, split_special)


def _tokenize(tokenizer, text: str, add_special: bool, split_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special, split_special_tokens=split_special)["input_ids"])


class BlockTokenizer:
    """A tokenizer with an LRU memo per block text: item and user blocks recur across prompts, so
    most blocks of a prompt are tokenized once per replica (a 3k-token prompt of 50 blocks takes
    about 20 ms to tokenize from scratch on one CPU core). Pass it to `tokenize_blocks`."""

    def __init__(self, tokenizer, max_entries: int = 65_536):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._memo: OrderedDict[tuple[str, bool, bool], tuple[int, ...]] = OrderedDict()
        self._lock = Lock()

    def encode(self, text: str, *, add_special: bool, split_special: bool = True) -> list[int]:
        key = (text, add_special, split_special)
        with self._lock:
            ids = self._memo.get(key)
            if ids is not None:
                self._memo.move_to_end(key)
                return list(ids)
        ids = tuple(_tokenize(self.tokenizer, text, add_special, split_special))
        with self._lock:
            self._memo[key] = ids
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return list(ids)
