"""Train a small Llama causal LM from scratch with plain torch on CPU, and measure it.

A training sequence is exactly what the decoder will see followed by the answer:
    ids = tokenize(block 1) + ... + tokenize(block n) + tokenize(answer) + [</s>]
Loss covers the answer tokens; prompt tokens weigh `prompt_loss_weight` (0 by default: item ids
and titles in prompts are near-random strings, so learning to predict them would spend the
small model's capacity and CPU time on memorising names instead of writing answers).

Evaluation lives here too: answer perplexity, a unigram baseline on the same tokens, greedy
generation and its distinct-bigram ratio (a looping model scores low).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from common.modeling.tokenizer_training import BOS_ID, EOS_ID, PAD_ID, encode_blocks


@dataclass(slots=True, frozen=True)
class ModelSpec:
    # 2.7M parameters with a 4096-token vocabulary (tied embeddings: 0.8M of them). Copying
    # titles, brands and attributes from the prompt emerges after about 500 steps; a 4.5M
    # model (hidden 256) ran at well under half the steps per second, too few in the budget.
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3  # head_dim 64
    num_kv_heads: int = 3
    intermediate_size: int = 576
    # The rec prompts of the prefill benchmark reach 4k tokens even though training stops
    # at max_seq_len: positions are RoPE, so this only bounds what the config accepts.
    max_position_embeddings: int = 4096
    rope_theta: float = 10_000.0
    # Tokenizer size to train; the embedding table is padded up to a multiple of 64.
    vocab_size: int = 4096


@dataclass(slots=True, frozen=True)
class TrainSettings:
    steps: int = 1200
    # Tokens per batch, padding included (batches are built from similar lengths). Small
    # batches, many steps: on 2 cores the step count, not the batch, limits learning.
    batch_tokens: int = 2048
    max_seq_len: int = 1024
    # 800-step trials: 2e-3 gave held-out answer ppl 3.6, 3e-3 3.9, 5e-3 18 (unstable).
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    # Cosine decay ends at learning_rate * min_lr_ratio.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # 0: loss on answers only, and the LM head runs on answer positions only (a third of the
    # step's compute saved).
    prompt_loss_weight: float = 0.0
    # Wall-clock cap on training. The learning-rate schedule follows whichever of steps and
    # time runs out first, so a slow (shared) CPU still ends with an annealed model instead
    # of blowing the build's time budget. On an idle 2-core CPU the steps run out first and
    # training is deterministic; the card records the steps actually taken.
    time_budget_s: float | None = 420.0
    seed: int = 0
    num_threads: int = 2


@dataclass(slots=True, frozen=True)
class Example:
    input_ids: tuple[int, ...]
    # Index of the first answer token; the answer runs to the end (</s> included).
    answer_start: int

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.input_ids[: self.answer_start]

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.answer_start :]


@dataclass(slots=True, frozen=True)
class TrainReport:
    train_s: float
    steps: int  # steps taken (fewer than settings.steps when the time budget ran out)
    stopped_by_time: bool
    tokens_seen: int
    # Mean weighted loss of the first and last 10% of steps.
    first_loss: float
    last_loss: float


# ---- data ----------------------------------------------------------------------------------


def encode_example(
    tokenizer, block_texts: Sequence[str], answer: str, ids_by_text: Mapping[str, list[int]] | None = None
) -> Example:
    prompt_ids = encode_blocks(tokenizer, block_texts, ids_by_text)
    answer_ids = encode_blocks(tokenizer, [answer], ids_by_text)
    return Example(input_ids=tuple(prompt_ids + answer_ids + [EOS_ID]), answer_start=len(prompt_ids))


def plan_batches(lengths: Sequence[int], batch_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """Index lists whose padded size (count x longest) stays within batch_tokens, shuffled.

    Sorting by length first keeps padding small; a sequence longer than batch_tokens gets a
    batch of its own.

    >>> plan_batches([5, 3, 9, 4], batch_tokens=10, rng=np.random.default_rng(0))
    [[2], [1, 3], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        new_longest = max(longest, lengths[index])
        if current and new_longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_longest = [], lengths[index]
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: Sequence[Example], prompt_loss_weight: float) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, targets (next token), weights.

    Training passes no attention mask: with right padding and a causal mask no real token can
    see a pad, and leaving the mask out keeps sdpa on its fast is_causal path. Pads get weight 0.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width - 1))  # [B, T-1]: weight of predicting t+1
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        weights[row, : n - 1] = prompt_loss_weight
        # Position t predicts token t+1: answer tokens are predicted from answer_start - 1 on.
        weights[row, example.answer_start - 1 : n - 1] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": input_ids[:, 1:].clone(),
        "weights": weights,
    }


# ---- model ---------------------------------------------------------------------------------


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def llama_config(spec: ModelSpec, tokenizer_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer_size),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        # Tied input/output embeddings: at this size the table is a third of all weights.
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """Random init from `seed` without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    # Tied weights are one tensor: parameters() yields it once.
    return sum(p.numel() for p in model.parameters())


# ---- training ------------------------------------------------------------------------------


def learning_rate_at(step: int, settings: TrainSettings, progress: float | None = None) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio x learning_rate.

    `progress` in [0, 1] is how far training is (default step / steps; the trainer passes the
    larger of that and elapsed / time budget).
    """
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    if progress is None:
        progress = step / settings.steps
    warmup_share = settings.warmup_steps / settings.steps
    fraction = min(max((progress - warmup_share) / max(1.0 - warmup_share, 1e-9), 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
    return settings.learning_rate * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def weighted_loss(model: LlamaForCausalLM, input_ids: torch.Tensor, targets: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy; the LM head runs only where a weight is non-zero
    (with prompt_loss_weight 0 that skips most of the vocabulary projection)."""
    # input_ids: [B, T]; targets, weights: [B, T-1] (position t predicts token t+1)
    assert targets.shape == weights.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]  # [B, T-1, H]
    keep = weights > 0
    logits = model.lm_head(hidden[keep])  # [N, V]
    per_token = F.cross_entropy(logits, targets[keep], reduction="none")
    return (per_token * weights[keep]).sum() / weights[keep].sum().clamp_min(1e-9)


def train_model(
    model: LlamaForCausalLM,
    examples: Sequence[Example],
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """AdamW steps over `examples` (cut to max_seq_len), reshuffled each epoch, until
    `settings.steps` or `settings.time_budget_s` runs out."""
    torch.set_num_threads(settings.num_threads)
    examples = [_truncate(e, settings.max_seq_len) for e in examples]
    rng = np.random.default_rng([settings.seed, 1])
    lengths = [len(e.input_ids) for e in examples]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    tokens_seen = 0
    plan: list[list[int]] = []
    start = time.perf_counter()
    steps_taken, stopped_by_time = 0, False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(settings.steps):
            progress = step / settings.steps
            if settings.time_budget_s:
                time_share = (time.perf_counter() - start) / settings.time_budget_s
                if time_share >= 1.0:
                    stopped_by_time = True
                    break
                progress = max(progress, time_share)
            if not plan:
                plan = plan_batches(lengths, settings.batch_tokens, rng)
            batch = collate([examples[i] for i in plan.pop()], settings.prompt_loss_weight)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, settings, progress)
            loss = weighted_loss(model, batch["input_ids"], batch["targets"], batch["weights"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            tokens_seen += int(batch["attention_mask"].sum())
            steps_taken += 1
            if on_step is not None:
                on_step(step, losses[-1])
    model.eval()
    tail = max(len(losses) // 10, 1)
    return TrainReport(
        train_s=time.perf_counter() - start,
        steps=steps_taken,
        stopped_by_time=stopped_by_time,
        tokens_seen=tokens_seen,
        first_loss=float(np.mean(losses[:tail])) if losses else float("nan"),
        last_loss=float(np.mean(losses[-tail:])) if losses else float("nan"),
    )


def _truncate(example: Example, max_len: int) -> Example:
    """Keeps the answer whole and drops prompt tokens from the front when too long."""
    excess = len(example.input_ids) - max_len
    if excess <= 0:
        return example
    cut = min(excess, example.answer_start - 1)
    return Example(input_ids=example.input_ids[cut:][:max_len], answer_start=example.answer_start - cut)


# ---- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def answer_nll(model: LlamaForCausalLM, examples: Sequence[Example]) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, token count) of the answers given their prompts."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])  # [1, T]
        logits = model(input_ids=ids).logits[0, example.answer_start - 1 : -1]  # [A, V]
        targets = ids[0, example.answer_start :]
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return total, count


def unigram_perplexity(
    train_examples: Sequence[Example], eval_examples: Sequence[Example], vocab_size: int
) -> float:
    """Perplexity of eval answers under answer-token frequencies of the training set (add-one)."""
    counts = Counter(token for e in train_examples for token in e.answer_ids)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for example in eval_examples:
        for token in example.answer_ids:
            nll -= math.log((counts.get(token, 0) + 1) / total)
            n += 1
    return math.exp(nll / max(n, 1))


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of prompt_ids, stopping at </s> (not included) or max_new_tokens.

    A plain KV-cached loop: same tokens as `model.generate(do_sample=False)` (tested), at a
    fraction of its per-token overhead, which dominates for a model this small.
    """
    output = model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=True)  # prefill
    cache = output.past_key_values
    new_tokens: list[int] = []
    next_id = int(output.logits[0, -1].argmax())
    while next_id != EOS_ID and len(new_tokens) < max_new_tokens:
        new_tokens.append(next_id)
        output = model(input_ids=torch.tensor([[next_id]]), past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        next_id = int(output.logits[0, -1].argmax())
    return new_tokens


def distinct_bigram_ratio(token_ids: Sequence[int]) -> float:
    """Distinct bigrams / bigrams in one sequence; 1.0 for fewer than two tokens.

    >>> distinct_bigram_ratio([1, 2, 1, 2, 1, 2])
    0.4
    """
    bigrams = list(zip(token_ids, token_ids[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0
