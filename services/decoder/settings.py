from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from common.drafting.budget import DEFAULT_DRAFT_MARGIN
from common.drafting.confidence import DEFAULT_WEIGHTS, FEATURES
from common.drafting.geometry import DEFAULT_GEOMETRY, DraftGeometry
from common.drafting.pools import DEFAULT_TASK_POOL_WEIGHT
from common.settings import KafkaSettings, ServiceSettings


class DecoderSettings(ServiceSettings, KafkaSettings):
    model_path: Path = Field(Path("data/models/smollm2-135m-instruct"), description="local Hugging Face checkpoint directory")
    chat_template: bool = Field(True, description="render prompts with the model's chat template (instruction blocks as the system message, the rest as the user message); a request may still ask for raw_prompt; a model without a template always gets raw prompts")
    decoder_id: str = Field("", description="replica id (default: decoder-<port>)")
    device: str = Field("cpu", description="torch device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="serving dtype of the weights, every KV cache and the blocks sent to the kv-store (auto: bfloat16 on CUDA, float32 elsewhere); block KV and the reuse gate are keyed by it")
    kernel_backend: Literal["auto", "torch", "triton"] = Field("auto", description="block-reuse tensor steps (re-rotation, deviation, gather/scatter): auto = the Triton kernels on CUDA when triton is installed, else the torch references; triton asked for where it cannot run fails at start-up")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    max_prompt_tokens: int = Field(4096, ge=16, description="longest prompt accepted, in tokens")
    max_new_tokens: int = Field(512, ge=1, description="largest max_new_tokens accepted")
    max_blocks: int = Field(256, ge=1, description="prompt blocks per request at most")
    max_queue: int = Field(16, ge=1, description="requests admitted (running + waiting); more -> RESOURCE_EXHAUSTED")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together in one batch (the rest of the admitted wait)")
    prefill_chunk_tokens: int = Field(256, ge=0, description="prompt tokens prefilled per scheduler turn, between the running batch's steps (chunked prefill: a long prompt never stalls the others; 0: whole prompts at once)")
    kv_budget_mb: float = Field(1024.0, gt=0, description="KV memory admitted requests may need, MiB ((prompt + max_new_tokens) x per-token KV); over -> RESOURCE_EXHAUSTED")
    # Every admitted request holds an RPC thread while it streams; Report and health need more.
    workers: int = Field(24, ge=2, description="threads serving RPCs (more than max_queue: admitted streams hold one each)")
    # Draft sizes: defaults from the one draft geometry (common/drafting/geometry.py).
    decoding_length: int = Field(DEFAULT_GEOMETRY.decoding_length, ge=1, description="default draft tokens per verification step")
    branch_length: int = Field(DEFAULT_GEOMETRY.branch_length, ge=1, description="default depth of a draft branch")
    adaptive_drafting: bool = Field(True, description="size each step's draft tree by expected tokens per second (measured step cost x draft confidence), drafting nothing where nothing pays, among candidates within adaptive_max_tokens x adaptive_max_depth; false = the fixed decoding_length x branch_length tree every step")
    adaptive_max_tokens: int = Field(DEFAULT_GEOMETRY.adaptive_max_tokens, ge=1, description="adaptive drafting: candidate draft tokens per request and step at most")
    adaptive_max_depth: int = Field(DEFAULT_GEOMETRY.adaptive_max_depth, ge=1, description="adaptive drafting: deepest candidate branch")
    adaptive_confidence_weights: str = Field(
        ",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
        description="adaptive drafting: logistic weights of draft-node acceptance over (bias, frequency log-odds, top sibling, depth, proposed by the request's own text, context support), comma-separated; `python -m bench.draft_replay --fit` fits them for a model and workload; empty = frequency alone")
    adaptive_draft_margin: float = Field(DEFAULT_DRAFT_MARGIN, ge=0, description="adaptive drafting at batch sizes the step-cost profile did not reach (priced from smaller batches): a drafting step is priced this many one-token steps dearer, so a marginal draft within the prediction's error is not taken; 0 = none")
    cost_profile_s: float = Field(5.0, ge=0, description="adaptive drafting: start-up step-cost profiling time limit when no stored profile matches model and device (0 = never profile: stored or built-in estimate)")
    lean_forward: bool = Field(True, description="verification steps run the model's own parts without transformers' per-call plumbing (bit-identical logits, checked at start-up; other architectures fall back by themselves); false = always the model's plain forward")
    pool_addr: str = Field("", description="retrieval-pool service host:port (empty = prompt overlay only)")
    pool_refresh_s: float = Field(2.0, gt=0, description="seconds between pool version checks (snapshots fetched when moved)")
    pool_cache_pools: int = Field(16, ge=1, description="pool snapshots held (LRU; the global pool not counted)")
    task_pool_weight: float = Field(DEFAULT_TASK_POOL_WEIGHT, ge=0, description="weight of the task pool's draft candidates (the task's answers of every pool key, drafted from beside the request's pool key's when the request names its task) against the pool key's; 0 = pool key's only")
    # Beyond-prefix KV reuse of prompt blocks (services/decoder/block_cache.py).
    block_reuse: bool = Field(True, description="reuse prompt blocks' KV (local memory, kv-store); off = full prefill always")
    kvstore_addrs: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="kv-store shards host:port, comma-separated, one per shard (empty = local memory only)")
    reuse_mode: Literal["full", "reuse", "cacheblend", "epic"] = Field(
        "epic", description="assembly of reused blocks: full prefill, reuse as is, CacheBlend or EPIC correction")
    recompute_ratio: float = Field(0.15, ge=0, le=1, description="cacheblend: share of reused tokens recomputed")
    check_layer: int = Field(1, ge=1, description="cacheblend: layer where KV deviation picks the tokens to recompute")
    epic_tokens: int = Field(16, ge=0, description="epic: leading tokens of each reused block recomputed")
    min_block_tokens: int = Field(4, ge=1, description="blocks shorter than this are computed, never cached")
    prefix_caching: bool = Field(True, description="keep each prefilled prompt block's exact KV in local memory under its prefix (the chain of blocks up to it) and start a later prompt that begins with the same blocks from it, with no correction (lossless; the only reuse when the accuracy gate serves full prefill); needs block_reuse")
    block_memory_mb: float = Field(512.0, ge=0, description="local block KV memory for items and their prefixes (LRU), MiB (SmolLM2-135M in float32: 46,080 B per token, ~11,600 tokens in 512 MiB)")
    replicated_memory_mb: float = Field(512.0, ge=0, description="local block KV memory for user histories and instructions, standalone and as prefixes (LRU, item traffic cannot evict it), MiB")
    kvstore_timeout_s: float = Field(0.5, gt=0, description="deadline of one kv-store lookup call")
    kvstore_backoff_s: float = Field(5.0, ge=0, description="after a kv-store shard fails, seconds it is not asked")
    kvstore_chunk_bytes: int = Field(1 << 20, ge=1024, description="chunk size when publishing a block")
    publish_queue: int = Field(256, ge=1, description="missed blocks waiting to be computed and published (more are dropped)")
    report_block_limit: int = Field(4096, ge=0, description="held blocks listed in a Report (newest first)")
    placement_embedder: Literal["auto", "minilm", "category"] = Field(
        "auto", description="item embeddings for shard placement (used with 2+ shards): MiniLM if installed, else category features")
    placement_anchors: int = Field(64, ge=1, description="similarity buckets hashed onto the shard ring")
    placement_anchors_file: Path | None = Field(None, description="learned similarity anchors (.npy [K, dim]), the same file for every decoder; default <model_path>/placement_anchors.<embedder>.npy when present, else seeded random anchors")
    reuse_gate_min_top1: float = Field(0.9, ge=0, le=1, description="accuracy gate: reuse only if top-1 agreement with full prefill (first token + continuation) reaches this")
    reuse_gate_prompts: int = Field(8, ge=0, description="accuracy gate: calibration prompts (0 = no gate)")
    reuse_gate_max_tokens: int = Field(1024, ge=16, description="accuracy gate: longest calibration prompt, in tokens (the gate prefills each prompt twice at start-up unless a stored result matches; `make model` stores it)")
    reuse_gate_continuation_tokens: int = Field(8, ge=0, le=64, description="accuracy gate: greedy tokens after the first compared per prompt")
    reuse_gate_store: Path | None = Field(None, description="gate results by model id (default <data_dir>/calibration/block_reuse.json)")

    @field_validator("adaptive_confidence_weights")
    @classmethod
    def five_weights_or_none(cls, value: str) -> str:
        parts = [p for p in value.split(",") if p.strip()]
        if parts and len(parts) != len(FEATURES):
            raise ValueError(f"adaptive_confidence_weights needs {len(FEATURES)} numbers ({', '.join(FEATURES)}) or none")
        for part in parts:
            float(part)  # a non-number raises ValueError: a clear settings error at start-up
        return value

    @property
    def draft_geometry(self) -> DraftGeometry:
        """This decoder's draft sizes (key and n-gram length are not settings: the geometry's);
        `tree_caps(adaptive_drafting)` is what the engine is built with."""
        return DraftGeometry(
            key_length=DEFAULT_GEOMETRY.key_length, ngram_length=DEFAULT_GEOMETRY.ngram_length,
            decoding_length=self.decoding_length, branch_length=self.branch_length,
            adaptive_max_tokens=self.adaptive_max_tokens, adaptive_max_depth=self.adaptive_max_depth)

    @property
    def confidence_weights(self) -> tuple[float, ...] | None:
        parts = [p for p in self.adaptive_confidence_weights.split(",") if p.strip()]
        return tuple(float(p) for p in parts) if parts else None

    @field_validator("kvstore_addrs", mode="before")
    @classmethod
    def split_commas(cls, value):
        # Env vars and k8s ConfigMaps carry "host:port,host:port", not JSON.
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value

    @model_validator(mode="after")
    def workers_exceed_admitted(self):
        # With every thread streaming an admitted request, heartbeats (Report) would wait and the
        # router would take this replica for dead.
        if self.workers <= self.max_queue:
            raise ValueError(f"workers ({self.workers}) must exceed max_queue ({self.max_queue})")
        return self
