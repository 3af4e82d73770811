"""Engine.generate: greedy tokens identical to transformers(+PEFT) generate, prompt and chat
tokenization, stop conditions, sampling seeds, and typed validation errors raised at submit."""

from __future__ import annotations

import pytest
import torch
from tinyllm import EOS, byte_tokenizer, save_adapter

from coe.config import config_from_dict
from coe.engine import Engine, GenerationOutput
from coe.errors import ConfigError, ContextTooLong, InvalidRequest

PROMPT = "The quick brown fox"


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kw", [None, dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
                                dict(r=16, alpha=32, targets="all-linear", rslora=True)], ids=["base", "r4", "r16-rslora"])
def test_greedy_tokens_match_transformers_and_peft(tmp_path, engine_factory, tiny_hf, kw):
    from peft import PeftModel

    engine = engine_factory()
    ids = engine.tokenizer(PROMPT)["input_ids"]
    adapter = None
    ref = tiny_hf
    if kw is not None:
        path = save_adapter(tiny_hf, tmp_path / "a", seed=7, **kw)
        engine.load_adapter("a", path)
        adapter = "a"
        ref = PeftModel.from_pretrained(tiny_hf, str(path)).eval()
    try:
        want = hf_greedy(ref, ids, 24)
    finally:
        if kw is not None:
            ref.unload()
    out = engine.generate(PROMPT, adapter=adapter, max_tokens=24, temperature=0.0)
    assert out.token_ids == want
    assert out.prompt_tokens == len(ids) and out.completion_tokens == len(want)
    assert out.finish_reason == ("stop" if want[-1] == EOS else "length")
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_prompt_is_tokenized_like_the_tokenizer_and_chat_uses_the_template(engine_factory):
    engine = engine_factory()
    assert engine.count_prompt_tokens("hi") == len(engine.tokenizer("hi")["input_ids"]) == 3  # BOS + 2 bytes
    msgs = [{"role": "user", "content": "hi"}]
    text = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.count_prompt_tokens(messages=msgs) == len(ids)
    out = engine.generate(messages=msgs, max_tokens=5)
    assert out.prompt_tokens == len(ids)
    # The same text as a raw prompt gets the tokenizer's BOS on top (special tokens included).
    assert engine.generate(text, max_tokens=1).prompt_tokens == len(ids) + 1


def test_stop_strings_and_stop_tokens(engine_factory):
    engine = engine_factory()
    full = engine.generate(PROMPT, max_tokens=30)
    text = full.text
    assert len(text) > 6
    cut = text[3:6]
    out = engine.generate(PROMPT, max_tokens=30, stop=[cut, "\x00never"])
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(cut)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    tok = full.token_ids[4]
    out = engine.generate(PROMPT, max_tokens=30, stop_token_ids=[tok])
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]
    out = engine.generate(PROMPT, max_tokens=3)
    assert (out.finish_reason, out.completion_tokens) == ("length", 3)
    assert EOS in engine.eos_ids  # the tokenizer's EOS always ends a generation


def test_seeded_sampling_is_reproducible(engine_factory):
    engine = engine_factory()
    a = engine.generate(PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    b = engine.generate(PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    c = engine.generate(PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=124)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = engine.generate(PROMPT, max_tokens=20)
    assert engine.generate(PROMPT, max_tokens=20, temperature=1.0, top_k=1, seed=5).token_ids == greedy.token_ids
    assert engine.generate(PROMPT, max_tokens=20, temperature=0.7, top_p=1e-6, seed=5).token_ids == greedy.token_ids


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(max_tokens=0), InvalidRequest, "max_tokens"),
        (dict(max_tokens=-3), InvalidRequest, "max_tokens"),
        (dict(max_tokens=10_000), InvalidRequest, "serving.max_tokens_limit"),
        (dict(max_tokens=250), ContextTooLong, "context of 256 tokens"),
        (dict(temperature=-1.0), InvalidRequest, "temperature"),
        (dict(temperature=float("nan")), InvalidRequest, "temperature"),
        (dict(top_p=0.0), InvalidRequest, "top_p"),
        (dict(top_k=-1), InvalidRequest, "top_k"),
        (dict(stop=[""]), InvalidRequest, "stop"),
        (dict(stop=3), InvalidRequest, "stop"),
        (dict(stop_token_ids=[10**6]), InvalidRequest, "stop_token_ids"),
        (dict(timeout=0), InvalidRequest, "timeout"),
        (dict(seed="x"), InvalidRequest, "seed"),
    ],
)
def test_bad_parameters_raise_typed_errors(engine_factory, kw, exc, words):
    engine = engine_factory(max_tokens_limit=300)
    with pytest.raises(exc, match=words):
        engine.generate(PROMPT + "." * 10, **kw)


def test_prompt_over_context_and_bad_inputs(engine_factory):
    engine = engine_factory(max_seq_len=64)
    with pytest.raises(ContextTooLong, match="context of 64 tokens"):
        engine.generate("x" * 80)
    # An unset max_tokens is cut to what the context leaves.
    out = engine.generate("y" * 50)
    assert out.prompt_tokens + out.completion_tokens <= 64
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.generate()
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.generate("a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(InvalidRequest, match="messages"):
        engine.generate(messages=[])
    with pytest.raises(InvalidRequest, match="prompt"):
        engine.generate(123)


def test_dtype_names_and_errors(tiny_dir):
    e = Engine.from_pretrained(str(tiny_dir), dtype="bfloat16", device="cpu", max_seq_len=64)
    assert e.model.dtype == torch.bfloat16
    out = e.generate(PROMPT, max_tokens=4)
    assert isinstance(out, GenerationOutput) and out.completion_tokens == 4
    assert Engine.from_pretrained(str(tiny_dir), dtype=torch.float32, max_seq_len=64).model.dtype == torch.float32
    with pytest.raises(ConfigError, match="dtype"):
        Engine.from_pretrained(str(tiny_dir), dtype="int8")
    with pytest.raises(ConfigError, match="serving.max_batch"):
        Engine.from_pretrained(str(tiny_dir), max_batch=0)
    with pytest.raises(ConfigError, match="unknown engine option"):
        Engine.from_pretrained(str(tiny_dir), max_bach=3)


def test_model_sources(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="not found"):
        Engine.from_pretrained(str(tmp_path / "missing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled weights"):
        Engine.from_pretrained(str(pickled))
    with pytest.raises(ConfigError, match="could not fetch hub model"):
        Engine.from_pretrained("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in the suite


def test_sharded_checkpoint_loads(tmp_path, tiny_hf):
    tiny_hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    byte_tokenizer().save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    e = Engine.from_pretrained(str(tmp_path), max_seq_len=64)
    ids = e.tokenizer(PROMPT)["input_ids"]
    assert e.generate(PROMPT, max_tokens=8).token_ids == hf_greedy(tiny_hf, ids, 8)


def test_from_config_registers_experts_under_their_names(tmp_path, tiny_dir, adapter_factory):
    sql = adapter_factory("sql", r=4, seed=31)
    cfg = config_from_dict({
        "base_model": {"model": str(tiny_dir), "dtype": "float32", "device": "cpu"},
        "router": {"type": "none"},
        "experts": [
            {"name": "sql", "adapter": str(sql)},
            {"name": "lazy", "adapter": str(adapter_factory("lazy", r=4, seed=32))},
            {"name": "general", "adapter": None},
        ],
        "serving": {"preload": ["sql"], "max_seq_len": 128, "max_batch": 2},
    }, source_path=str(tmp_path / "experts.yaml"))
    engine = Engine.from_config(cfg)
    try:
        where = {a.name: a.location for a in engine.list_adapters()}
        assert where == {"sql": "device", "lazy": "disk"}
        assert engine.max_seq_len == 128
        engine.generate("q", adapter="lazy", max_tokens=2)
        assert {a.name: a.location for a in engine.list_adapters()}["lazy"] == "device"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kw", [dict(r=4, alpha=16, targets=("q_proj", "k_proj", "o_proj", "down_proj")),
                                dict(r=16, alpha=8, targets="all-linear", rslora=False)], ids=["r4-qkod", "r16-all"])
def test_greedy_on_tied_embeddings_matches_peft(tmp_path, engine_factory, kw):
    """Tied input/output embeddings (SmolLM's layout) with adapters: greedy ids equal PEFT's."""
    from peft import PeftModel
    from tinyllm import save_tiny_model, tiny_config

    ref = save_tiny_model(tmp_path / "tied", tiny_config(tie=True), seed=9)
    path = save_adapter(ref, tmp_path / "a", seed=8, **kw)
    engine = engine_factory(tmp_path / "tied")
    engine.load_adapter("a", path)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    peft_model = PeftModel.from_pretrained(ref, str(path)).eval()
    want = hf_greedy(peft_model, ids, 24)
    assert engine.generate(PROMPT, adapter="a", max_tokens=24).token_ids == want
    with peft_model.disable_adapter():
        base_want = hf_greedy(peft_model, ids, 24)
    assert engine.generate(PROMPT, max_tokens=24).token_ids == base_want
    assert want != base_want  # the adapter really changes the greedy output
