"""Typed inputs and outputs of the Router, and the request they make."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from adaccel_client._stubs import common_pb2, router_pb2


class BlockKind(enum.Enum):
    """What a prompt block holds; decides how its KV cache is reused and placed."""

    INSTRUCTION = "instruction"  # a task instruction shared by many prompts
    USER_HISTORY = "user_history"  # one user's click history or profile
    ITEM = "item"  # one catalog item (ad)
    TEXT = "text"  # free text: the question, glue text; never cached

    @property
    def proto(self) -> int:
        return common_pb2.BlockKind.Value(f"BLOCK_KIND_{self.name}")


@dataclass(frozen=True, slots=True)
class Block:
    """One typed piece of a prompt; a prompt is its blocks' texts in order. `kind` takes a
    BlockKind or its value ("instruction", "user_history", "item", "text")."""

    kind: BlockKind | str
    id: str
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, BlockKind):
            try:
                object.__setattr__(self, "kind", BlockKind(self.kind))
            except ValueError:
                kinds = [k.value for k in BlockKind]
                raise ValueError(f"block kind {self.kind!r}: not one of {kinds}") from None

    def to_proto(self) -> common_pb2.PromptBlock:
        assert isinstance(self.kind, BlockKind)
        return common_pb2.PromptBlock(id=self.id, kind=self.kind.proto, text=self.text)


@dataclass(frozen=True, slots=True)
class Relaxed:
    """Knobs of relaxed verification; None leaves the server's default (top_k 2, min_prob 0.1)."""

    top_k: int | None = None
    min_prob: float | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling; temperature 0 is greedy. seed None: derived from the request id."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Advanced:
    """Internal decoder knobs, for benchmarks and operators only (no stability promise): they
    turn off what the service exists for, or override tuned defaults (0 = the decoder's)."""

    disable_drafting: bool = False
    decoding_length: int = 0
    branch_length: int = 0
    disable_block_reuse: bool = False


Mode = Literal["strict", "relaxed"]
_MODES = {"strict": common_pb2.VERIFICATION_MODE_STRICT, "relaxed": common_pb2.VERIFICATION_MODE_RELAXED}


def _blocks(blocks: Iterable[Block | tuple[Any, str, str]]) -> list[common_pb2.PromptBlock]:
    return [(block if isinstance(block, Block) else Block(*block)).to_proto() for block in blocks]


def build_request(blocks: Iterable[Block | tuple[Any, str, str]], *, pool_key: str = "", task: str = "",
                  max_new_tokens: int = 64, mode: Mode | None = None, relaxed: Relaxed | None = None,
                  sampling: Sampling | None = None, advanced: Advanced | None = None, request_id: str = "",
                  publish: bool = False, raw_prompt: bool = False) -> common_pb2.GenerateRequest:
    """The GenerateRequest of typed inputs. Blocks are Block or (kind, id, text). `mode` defaults
    to relaxed when `relaxed` is given, else strict. Ranges are the server's to check (its limits
    are configured there); it answers INVALID_ARGUMENT naming the field. `task` (e.g.
    "generative_rec") lets the decoder draft from the task's answers of every pool key too."""
    if mode is None:
        mode = "relaxed" if relaxed is not None else "strict"
    if mode not in _MODES:
        raise ValueError(f"mode {mode!r}: not one of {sorted(_MODES)}")
    if relaxed is not None and mode != "relaxed":
        raise ValueError("relaxed= applies to mode='relaxed' only")
    params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens, mode=_MODES[mode])
    if relaxed is not None:
        params.relaxed.SetInParent()
        if relaxed.top_k is not None:
            params.relaxed.top_k = relaxed.top_k
        if relaxed.min_prob is not None:
            params.relaxed.min_prob = relaxed.min_prob
    if sampling is not None:
        params.sampling.CopyFrom(common_pb2.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k))
        if sampling.seed is not None:
            params.sampling.seed = sampling.seed
    if advanced is not None:
        params.advanced.CopyFrom(common_pb2.AdvancedParams(**dataclasses.asdict(advanced)))
    return common_pb2.GenerateRequest(request_id=request_id, blocks=_blocks(blocks), pool_key=pool_key,
                                      task=task, params=params, publish=publish, raw_prompt=raw_prompt)


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of streamed output: new token ids and their text (may be empty while a multi-byte
    character is incomplete)."""

    text: str
    token_ids: tuple[int, ...]


def _plain(value: Any) -> Any:
    return tuple(value) if not isinstance(value, (int, float, str, bool)) else value


@dataclass(frozen=True, slots=True)
class Stats:
    """Per-request figures of the decoder (common.proto GenerationStats)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    recomputed_prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    mean_accepted_per_step: float = 0.0
    accepted_per_step: tuple[int, ...] = ()
    drafted_per_step: tuple[int, ...] = ()
    accepted_drafts_per_step: tuple[int, ...] = ()
    ttft_s: float = 0.0
    total_s: float = 0.0
    prepare_s: float = 0.0
    block_lookup_s: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_step_s: float = 0.0
    pool_key_used: str = ""  # the draft pool it drafted from ("global" when its key fell back)
    task_pool_key_used: str = ""  # the task pool it drafted from beside it ("task/<task>"; "" = none)

    @classmethod
    def from_proto(cls, stats: common_pb2.GenerationStats) -> Stats:
        return cls(**{f.name: _plain(getattr(stats, f.name)) for f in dataclasses.fields(cls)
                      if f.name in stats.DESCRIPTOR.fields_by_name})


@dataclass(frozen=True, slots=True)
class Summary:
    """The final message of a generation: the whole text and why it ended ("length", "eos")."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    decoder_id: str
    model_id: str
    stats: Stats

    @classmethod
    def from_proto(cls, summary: common_pb2.GenerationSummary) -> Summary:
        reason = common_pb2.FinishReason.Name(summary.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(request_id=summary.request_id, text=summary.text, token_ids=tuple(summary.token_ids),
                   finish_reason=reason, decoder_id=summary.decoder_id, model_id=summary.model_id,
                   stats=Stats.from_proto(summary.stats))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return _lists(dataclasses.asdict(self))


@dataclass(frozen=True, slots=True)
class Result:
    """What generate_text returns: the text, its token ids, the summary, and the attempts made."""

    text: str
    token_ids: tuple[int, ...]
    summary: Summary
    attempts: int


@dataclass(frozen=True, slots=True)
class Replica:
    """One decoder replica as the router sees it."""

    address: str
    healthy: bool
    decoder_id: str
    queue_depth: int
    tokens_in_flight: int
    held_blocks: int
    pool_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouterInfo:
    """The router's scheduling policy and the decoder replicas it knows."""

    policy: str
    replicas: tuple[Replica, ...]

    @classmethod
    def from_proto(cls, info: router_pb2.RouterInfo) -> RouterInfo:
        return cls(policy=info.policy, replicas=tuple(
            Replica(address=r.address, healthy=r.healthy, decoder_id=r.decoder_id, queue_depth=r.queue_depth,
                    tokens_in_flight=r.tokens_in_flight, held_blocks=r.held_blocks,
                    pool_keys=tuple(r.pool_keys))
            for r in info.replicas))

    def to_dict(self) -> dict[str, Any]:
        return _lists(dataclasses.asdict(self))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
