"""llmlab.transformer against the library it rebuilds: transformers' Llama (model, layers, RoPE, generation) and
PyTorch's scaled_dot_product_attention."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as hf_llama

from llmlab import models
from llmlab import transformer as T

COURSE_PARAMS = 3_410_176  # 4 layers, hidden 256, 8 query / 2 key-value heads, vocab 768, untied


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def course():
    """The course model three ways, on the CPU: transformers as loaded (SDPA attention, its default), transformers
    with the eager (written-out) attention, and ours."""
    hf, tok = models.load(models.COURSE_MODEL_DIR, device_map="cpu")
    eager, _ = models.load(models.COURSE_MODEL_DIR, device_map="cpu", attn_implementation="eager")
    return hf, eager, T.Llama.from_hf(hf), tok


def _ids(tok, texts):
    """Token ids for texts cut to the shortest one's length: a (batch, seq) tensor without padding."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows])


def _left_pad(tok, prompts, pad_id):
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --------------------------------------------------------- the course model --

TEXTS = ["Mia has a red ball. She plays with it in the park every day and she is glad.",
         "Question: What is 7 minus 3? Answer: 7 minus 3 is 4. The dog runs to the school."]


def test_course_model_logits_equal_transformers(course):
    hf, eager, ours, tok = course
    assert isinstance(hf, LlamaForCausalLM) and hf.config._attn_implementation == "sdpa"
    ids = _ids(tok, TEXTS)
    random_ids = torch.randint(0, 768, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for x in (ids, random_ids):
            logits = ours(x)
            assert logits.shape == (*x.shape, 768) and logits.dtype == torch.float32
            # the same arithmetic as transformers' eager attention: equal to float32 rounding (we measure 0.0)
            assert _max_diff(logits, eager(x).logits) <= 1e-5
            # PyTorch's fused SDPA kernel rounds differently: about 1e-5 on text, up to ~5e-5 on 300 random ids
            reference = hf(x).logits
            assert _max_diff(logits, reference) <= 1e-4
            assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_course_model_with_padding_equals_transformers(course):
    hf, eager, ours, tok = course
    ids, mask = _left_pad(tok, ["Mia has a", "Tom and his dog go to the park"], pad_id=tok.pad_token_id)
    assert not mask.all()
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        for reference in (eager, hf):
            expected = reference(input_ids=ids, attention_mask=mask).logits
            assert _max_diff(logits[mask.bool()], expected[mask.bool()]) <= 1e-4  # padded queries are junk in both
        # the mask matters: without it the short prompt reads the padding
        assert _max_diff(ours(ids)[0, -1], logits[0, -1]) > 1e-2


def test_from_pretrained_reads_the_course_folder(course):
    hf, _, ours, _ = course
    for source in (models.COURSE_MODEL_DIR, str(models.COURSE_MODEL_DIR), "llmlab/course-model", hf):
        loaded = T.Llama.from_pretrained(source)
        assert not loaded.training and loaded.config == ours.config
        assert loaded.state_dict().keys() == hf.state_dict().keys()
        for name, p in loaded.state_dict().items():
            assert torch.equal(p, hf.state_dict()[name]), name


def test_course_model_parameter_count(course):
    hf, _, ours, _ = course
    assert T.parameter_count(hf.config) == COURSE_PARAMS
    assert sum(p.numel() for p in hf.parameters()) == COURSE_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == COURSE_PARAMS
    assert models.course_model_card()["n_params"] == COURSE_PARAMS


def test_kv_cache_decoding_equals_a_full_forward(course):
    _, _, ours, tok = course
    ids = _ids(tok, TEXTS)
    with torch.no_grad():
        full = ours(ids)
        cache, pieces, start = T.KVCache(), [], 0
        for size in (9, 1, 1, 4, 1):  # a prompt, then tokens one or a few at a time
            pieces.append(ours(ids[:, start:start + size], kv_cache=cache))
            start += size
            assert cache.offset == start and len(cache.layers) == 4
            assert cache.layers[3][0].shape == (2, 2, start, 32)  # (batch, kv heads, positions, head_dim)
        pieces.append(ours(ids[:, start:], kv_cache=cache))
    # the same sums in a different grouping (matrix shapes differ): equal up to float32 rounding (~1e-5 here)
    assert _max_diff(torch.cat(pieces, dim=1), full) <= 1e-4
    assert torch.equal(torch.cat(pieces, dim=1).argmax(-1), full.argmax(-1))
    # reusing a cache without the positions it was built for is a different computation
    with torch.no_grad():
        wrong = ours(ids[:, start:])
    assert _max_diff(wrong, full[:, start:]) > 1e-2


def test_greedy_generation_equals_transformers_generate(course):
    hf, _, ours, tok = course
    eos, pad = hf.generation_config.eos_token_id, hf.generation_config.pad_token_id
    for prompt in ("Mia has a", "Tom and his dog"):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        expected = hf.generate(ids, max_new_tokens=20, do_sample=False)
        got = ours.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
        assert expected.shape[1] == ids.shape[1] + 20, "the reference should not stop early here"
        assert got.tolist() == expected.tolist()
    # a batch with left padding, where one row ends (eos, then padding) before the other
    ids, mask = _left_pad(tok, ["The cat", "Mia has a pink boat. One day,"], pad_id=pad)
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    got = ours.generate(ids, max_new_tokens=24, attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
    assert (expected[0] == eos).any() and (expected[0, -1] == pad)
    assert got.tolist() == expected.tolist()


# ------------------------------------------------- tiny random transformers --

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
TINY = {
    "gqa-untied": dict(num_key_value_heads=2),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-tied-llama3": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                            rope_scaling=LLAMA3),
    "mha-untied-linear": dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "bias-wide-heads": dict(num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True),
}


def _tiny_config(name, **extra):
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                       **TINY[name], **extra)


def _tiny_hf(name, **extra):
    """A tiny transformers Llama with weights big enough that every part matters (std 0.02 makes logits ~0)."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(_tiny_config(name, **extra)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in n else
                    0.15 * torch.randn(p.shape, generator=g))
    return hf


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_llamas_equal_transformers(name):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))  # 40 > 16 original positions
    for implementation in ("eager", "sdpa"):
        hf = _tiny_hf(name, attn_implementation=implementation)
        ours = T.Llama.from_hf(hf)
        assert ours.state_dict().keys() == hf.state_dict().keys()  # the same names, so weights load by name
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hf.config.tie_word_embeddings
        with torch.no_grad():
            expected = hf(ids).logits
            assert expected.abs().max() > 1  # not a vacuous comparison
            assert _max_diff(ours(ids), expected) <= 1e-5


def test_rope_scaling_changes_the_model():
    """The tiny llama3-scaled model's logits depend on the scaling: the test above would catch dropping it."""
    hf = _tiny_hf("mqa-tied-llama3")
    config = T.Config.from_hf(hf.config)
    unscaled = T.Llama.from_hf(hf.state_dict(), dataclasses.replace(config, rope_scaling=None))
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _max_diff(unscaled(ids), hf(ids).logits) > 1e-2


def test_from_pretrained_reads_a_saved_sharded_tied_checkpoint(tmp_path):
    hf = _tiny_hf("mha-tied")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = T.Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _max_diff(ours(ids), hf(ids).logits) <= 1e-5


# --------------------------------------------------------------- components --

def test_rmsnorm_equals_llama_rmsnorm():
    ours, theirs = T.RMSNorm(64, eps=1e-5), hf_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(_randn(64, seed=1))
    ours.load_state_dict(theirs.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(3, 5, 64, seed=2, dtype=dtype) * 4
        y = ours(x)
        assert y.dtype == theirs(x).dtype
        assert _max_diff(y, theirs(x)) <= 1e-6
    x = _randn(2, 64, seed=3)
    torch.testing.assert_close(ours(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * ours.weight)


@pytest.mark.parametrize("name", ["gqa-untied", "mqa-tied-llama3", "mha-untied-linear"])
def test_rope_equals_llama_rotary_embedding(name):
    config = _tiny_config(name)
    rotary = hf_llama.LlamaRotaryEmbedding(config)
    c = T.Config.from_hf(config)
    cos, sin = T.rope_frequencies(c.head_dim, 50, c.rope_theta, c.rope_scaling)
    assert cos.shape == (50, 16)
    hf_cos, hf_sin = rotary(torch.zeros(1), torch.arange(50)[None])
    assert _max_diff(cos, hf_cos[0]) <= 1e-6 and _max_diff(sin, hf_sin[0]) <= 1e-6
    if c.rope_scaling:  # scaling slows some rotations down, never speeds one up
        plain = T.rope_inv_freq(c.head_dim, c.rope_theta)
        scaled = T.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        assert (scaled <= plain).all() and (scaled < plain).any()
    q, k = _randn(2, 4, 50, 16, seed=1), _randn(2, 2, 50, 16, seed=2)
    hf_q, hf_k = hf_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    for our_cos, our_sin in ((cos, sin), (hf_cos, hf_sin)):  # (seq, head_dim) and (batch, seq, head_dim)
        our_q, our_k = T.apply_rope(q, k, our_cos, our_sin)
        assert _max_diff(our_q, hf_q) <= 1e-6 and _max_diff(our_k, hf_k) <= 1e-6


def test_rope_depends_only_on_relative_position():
    cos, sin = T.rope_frequencies(64, 300, scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    q, k = _randn(1, 1, 1, 64, seed=1), _randn(1, 1, 1, 64, seed=2)

    def score(m, n):  # q at position m, k at position n
        qm, _ = T.apply_rope(q, q, cos[m:m + 1], sin[m:m + 1])
        _, kn = T.apply_rope(k, k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    for m, n in ((5, 2), (0, 0), (17, 40), (100, 3)):
        for t in (1, 37, 150):
            assert score(m, n) == pytest.approx(score(m + t, n + t), abs=1e-3)
    assert abs(score(5, 2) - score(5, 3)) > 0.05  # ... and it does depend on the relative position
    # a rotation keeps lengths
    rotated, _ = T.apply_rope(q, q, cos[123:124], sin[123:124])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_swiglu_equals_llama_mlp():
    config = _tiny_config("bias-wide-heads")
    theirs = hf_llama.LlamaMLP(config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(_randn(*p.shape, seed=p.numel()) * 0.2)
    ours = T.SwiGLU(64, 96, bias=True)
    ours.load_state_dict(theirs.state_dict())
    x = _randn(2, 7, 64, seed=5)
    assert _max_diff(ours(x), theirs(x)) <= 1e-6


def test_repeat_kv_equals_transformers():
    x = _randn(2, 3, 5, 8)
    for n_rep in (1, 4):
        assert torch.equal(T.repeat_kv(x, n_rep), hf_llama.repeat_kv(x, n_rep))
        assert torch.equal(T.repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=1))


def test_attention_and_block_equal_the_loaded_course_layer(course):
    hf, eager, _, _ = course
    config = T.Config.from_hf(hf.config)
    x = _randn(2, 12, 256, seed=6)
    position_ids = torch.arange(12)[None]
    cos, sin = hf.model.rotary_emb(x, position_ids)
    # an explicit causal mask: with attention_mask=None transformers' SDPA path infers causal, its eager path does not
    causal = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1)[None, None]
    attn = T.Attention(256, 8, 2, 32)
    block = T.Block(config)
    for reference in (hf, eager):
        layer = reference.model.layers[1]
        attn.load_state_dict(layer.self_attn.state_dict())
        block.load_state_dict(layer.state_dict())
        with torch.no_grad():
            out, (k, v) = attn(x, cos[0], sin[0])
            expected = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=causal)[0]
            assert k.shape == v.shape == (2, 2, 12, 32)
            assert _max_diff(out, expected) <= 1e-5
            out, _ = block(x, cos[0], sin[0])
            expected = layer(x, position_embeddings=(cos, sin), attention_mask=causal, position_ids=position_ids)
            assert _max_diff(out, expected) <= 1e-5


# ----------------------------------------------------------------- attention --

HEADS = [(4, 4), (8, 2), (6, 1)]  # multi-head, grouped-query, multi-query


def _qkv(hq, hkv, lq, lk, d=16, seed=0):
    return _randn(2, hq, lq, d, seed=seed), _randn(2, hkv, lk, d, seed=seed + 1), _randn(2, hkv, lk, d, seed=seed + 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", HEADS)
def test_attention_equals_sdpa(heads, causal):
    q, k, v = _qkv(*heads, 33, 33)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert _max_diff(T.attention(q, k, v, causal=causal), expected) <= 1e-5
    for block_size in (1, 5, 16, 33, 100):
        assert _max_diff(T.online_softmax_attention(q, k, v, block_size, causal=causal), expected) <= 1e-5
    if causal:  # the mask matters
        assert _max_diff(T.attention(q, k, v, causal=False), expected) > 1e-2


@pytest.mark.parametrize("heads", HEADS)
def test_attention_with_fewer_queries_than_keys_is_aligned_bottom_right(heads):
    """Decoding with a cache: 5 new queries at positions 18..22 over 23 keys."""
    q, k, v = _qkv(*heads, 5, 23, seed=3)
    allowed = torch.ones(5, 23, dtype=torch.bool).tril(diagonal=18)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    assert _max_diff(T.attention(q, k, v), expected) <= 1e-5
    for block_size in (1, 4, 7, 64):
        assert _max_diff(T.online_softmax_attention(q, k, v, block_size), expected) <= 1e-5


def test_attention_with_a_padding_mask_equals_sdpa():
    q, k, v = _qkv(8, 2, 10, 10, seed=4)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., :4] = False  # the second row is left-padded by 4
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal, enable_gqa=True)
    got = T.attention(q, k, v, mask=keep)
    assert _max_diff(got[0], expected[0]) <= 1e-5 and _max_diff(got[1, :, 4:], expected[1, :, 4:]) <= 1e-5
    # queries that see no key at all (padding, under the causal mask) get the mean value, not NaN
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1, :, 0], T.repeat_kv(v, 4)[1].mean(dim=1))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert _max_diff(T.attention(q, k, v, causal=False, mask=keep), expected) <= 1e-5


def test_online_softmax_survives_large_scores_and_low_precision():
    q, k, v = _qkv(4, 4, 20, 20, seed=5)
    q = q * 40  # scores in the hundreds: exp() would overflow without subtracting the running max
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert _max_diff(T.online_softmax_attention(q, k, v, 3), expected) <= 1e-4
    assert torch.isfinite(T.attention(q, k, v)).all()
    q = q / 40
    for dtype in (torch.bfloat16, torch.float16):  # float32 inside: only the inputs and the output are rounded
        low = [t.to(dtype) for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*[t.double() for t in low], is_causal=True)
        out = T.online_softmax_attention(*low, 8)
        assert out.dtype == dtype and _max_diff(out, expected) <= 2 * torch.finfo(dtype).eps * expected.abs().max()


# ---------------------------------------------------------- parameter count --

HUB_CONFIGS = {  # config.json as published, old-style rope keys included
    "HuggingFaceTB/SmolLM2-135M": (134_515_008, dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000,
        max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu")),
    "meta-llama/Llama-3.2-1B": (1_235_814_400, dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})),
    "meta-llama/Llama-2-7b-hf": (6_738_415_616, dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, rope_scaling=None,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu")),
}


def _hf_numel(config):
    with torch.device("meta"):  # shapes only: no memory, no time
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


@pytest.mark.parametrize("name", TINY)
def test_parameter_count_equals_transformers_tiny(name):
    config = _tiny_config(name)
    assert T.parameter_count(config) == _hf_numel(config)
    assert T.parameter_count(config) == sum(p.numel() for p in T.Llama(config).parameters())


@pytest.mark.parametrize("hub_id", HUB_CONFIGS)
def test_parameter_count_equals_transformers_hub_configs(hub_id):
    published, config = HUB_CONFIGS[hub_id]
    hf_config = LlamaConfig(**config)
    assert T.parameter_count(config) == T.parameter_count(hf_config) == _hf_numel(hf_config) == published
    # tying the embeddings saves exactly one vocab x hidden matrix
    flipped = {**config, "tie_word_embeddings": not config["tie_word_embeddings"]}
    saved = config["vocab_size"] * config["hidden_size"]
    assert T.parameter_count(flipped) - published == (saved if config["tie_word_embeddings"] else -saved)


def test_config_reads_both_rope_spellings():
    llama3 = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    old = dict(HUB_CONFIGS["meta-llama/Llama-3.2-1B"][1], rope_scaling={**llama3, "type": "llama3"})  # older key
    new = LlamaConfig(**HUB_CONFIGS["meta-llama/Llama-3.2-1B"][1])
    assert "rope_parameters" in new.to_dict() and not hasattr(new, "rope_theta")  # transformers 5 moved it
    a, b = T.Config.from_hf(old), T.Config.from_hf(new)
    assert a.rope_theta == b.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == b.rope_scaling["rope_type"]
    assert T.Config.from_hf(HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M"][1]).rope_theta == 100000
    assert T.Config.from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4)).head_dim == 16


@pytest.mark.parametrize("name", ["mha-tied", "gqa-untied"])
def test_a_fresh_model_starts_and_learns_like_transformers(name):
    config = _tiny_config(name, pad_token_id=3)
    torch.manual_seed(0)
    ours, hf = T.Llama(config), LlamaForCausalLM(config)
    for name, p in ours.named_parameters():
        reference = hf.get_parameter(name)
        assert p.shape == reference.shape
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert p.std().item() == pytest.approx(reference.std().item(), rel=0.15)
    pad_row = ours.model.embed_tokens.weight[3]
    assert not pad_row.any() and not hf.model.embed_tokens.weight[3].any()  # the padding token starts at zero
    ids = torch.tensor([[1, 2, 3, 3]])
    for model in (ours, hf):
        logits = model(ids) if model is ours else model(ids).logits
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert loss.item() == pytest.approx(math.log(97), rel=0.05)  # near-uniform guesses at first
        loss.backward()
    assert all(p.grad is not None for p in ours.parameters())
    # the embedding lookup sends the padding row no gradient; only a tied lm_head (reading it out) does
    for model in (ours, hf):
        assert (model.model.embed_tokens.weight.grad[3].abs().sum() > 0) == config.tie_word_embeddings


# -------------------------------------------------------------------- errors --

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return T.Llama(T.Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2))


_q, _k = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)
_cos, _sin = T.rope_frequencies(8, 3)

ERRORS = [
    (lambda: T.RMSNorm(0), ValueError, "dim"),
    (lambda: T.RMSNorm(8.0), TypeError, "dim"),
    (lambda: T.RMSNorm(8, eps=-1.0), ValueError, "eps"),
    (lambda: T.RMSNorm(8)(torch.zeros(2, 7)), ValueError, "last dimension"),
    (lambda: T.RMSNorm(8)([0.0] * 8), TypeError, "torch.Tensor"),
    (lambda: T.rope_frequencies(15, 4), ValueError, "even"),
    (lambda: T.rope_frequencies(16, 0), ValueError, "seq_len"),
    (lambda: T.rope_frequencies(16, 4, theta=0.0), ValueError, "theta"),
    (lambda: T.rope_frequencies(16, 4, scaling="linear"), TypeError, "rope_scaling"),
    (lambda: T.rope_frequencies(16, 4, scaling={"rope_type": "yarn", "factor": 2.0}), ValueError, "rope_type"),
    (lambda: T.rope_frequencies(16, 4, scaling={"rope_type": "linear"}), ValueError, "factor"),
    (lambda: T.rope_frequencies(16, 4, scaling={**LLAMA3, "original_max_position_embeddings": None}), TypeError,
     "original_max"),
    (lambda: T.rope_frequencies(16, 4, scaling={k: v for k, v in LLAMA3.items()
                                                 if k != "original_max_position_embeddings"}), ValueError, "original"),
    (lambda: T.apply_rope(_q[0], _k, _cos, _sin), ValueError, "4-D"),
    (lambda: T.apply_rope(_q, _k, _cos[:2], _sin[:2]), ValueError, "does not fit"),
    (lambda: T.apply_rope(_q, _k, _cos, _sin[:, :4]), ValueError, "cos and sin"),
    (lambda: T.apply_rope(_q, _k, _cos.tolist(), _sin), TypeError, "torch.Tensor"),
    (lambda: T.repeat_kv(_k, 0), ValueError, "n_rep"),
    (lambda: T.attention(torch.zeros(1, 6, 3, 8), torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8)), ValueError,
     "multiple"),
    (lambda: T.attention(_q, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), ValueError, "head_dim"),
    (lambda: T.attention(_q, _k, torch.zeros(1, 2, 4, 8)), ValueError, "same shape"),
    (lambda: T.attention(_q, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8)), ValueError, "at least as many"),
    (lambda: T.attention(_q.long(), _k, _k), ValueError, "floating-point"),
    (lambda: T.attention(_q.tolist(), _k, _k), TypeError, "torch.Tensor"),
    (lambda: T.attention(_q, _k, _k, mask=torch.ones(3, 3)), TypeError, "boolean"),
    (lambda: T.attention(_q, _k, _k, mask=torch.ones(2, 1, 3, 3, dtype=torch.bool)), ValueError, "broadcast"),
    (lambda: T.attention(_q, _k, _k, causal=1), TypeError, "causal"),
    (lambda: T.online_softmax_attention(_q, _k, _k, 0), ValueError, "block_size"),
    (lambda: T.online_softmax_attention(_q, _k, _k, 2.5), TypeError, "block_size"),
    (lambda: T.online_softmax_attention(_q, _k, _k, True), TypeError, "block_size"),
    (lambda: T.online_softmax_attention(torch.zeros(1, 6, 3, 8), _q, _q), ValueError, "multiple"),
    (lambda: T.Attention(64, 6, 4), ValueError, "multiple"),
    (lambda: T.Attention(65, 4), ValueError, "hidden_size"),
    (lambda: T.Attention(64, 4)(torch.zeros(1, 3, 32), _cos, _sin), ValueError, "batch, seq, 64"),
    (lambda: T.SwiGLU(64, 0), ValueError, "intermediate_size"),
    (lambda: T.Config(32, 16, 32, 1, num_attention_heads=4, num_key_value_heads=3), ValueError, "multiple"),
    (lambda: T.Config(32, 18, 32, 1, num_attention_heads=4), ValueError, "hidden_size"),
    (lambda: T.Config(32, 16, 32, 1, num_attention_heads=4, head_dim=5), ValueError, "even"),
    (lambda: T.Config(32, 16, 32, 0, num_attention_heads=4), ValueError, "num_hidden_layers"),
    (lambda: T.Config(32, 16, 32, 1, num_attention_heads=4, tie_word_embeddings=1), TypeError, "tie_word"),
    (lambda: T.Config(32, 16, 32, 1, num_attention_heads=4, pad_token_id=32), ValueError, "pad_token_id"),
    (lambda: T.Config.from_hf(42), TypeError, "config"),
    (lambda: T.Config.from_hf(dict(HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M"][1], model_type="mistral")), ValueError,
     "model_type"),
    (lambda: T.Config.from_hf(dict(HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M"][1], hidden_act="gelu")), ValueError,
     "silu"),
    (lambda: T.Config.from_hf({"hidden_size": 64}), ValueError, "lacks"),
    (lambda: T.parameter_count("llama"), TypeError, "config"),
    (lambda: T.Llama.from_hf(torch.zeros(3)), TypeError, "state dict"),
    (lambda: T.Llama.from_hf({"lm_head.weight": torch.zeros(3)}), ValueError, "config"),
    (lambda: T.Llama.from_pretrained(123), TypeError, "model name"),
    (lambda: T.Llama.from_pretrained("meta-llama/Llama-3.2-1B"), ValueError, "local folders only"),
]


@pytest.mark.parametrize("call, error, match", ERRORS)
def test_bad_input_raises_one_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_model_input_raises_one_clear_error(tiny, tmp_path):
    ids = torch.tensor([[1, 2, 3]])
    for call, error, match in [
        (lambda: tiny(ids.float()), ValueError, "integer"),
        (lambda: tiny(ids[0]), ValueError, "2-D"),
        (lambda: tiny(ids + 40), ValueError, r"\[0, 32\)"),
        (lambda: tiny([[1, 2, 3]]), TypeError, "torch.Tensor"),
        (lambda: tiny(ids, attention_mask=torch.ones(1, 4)), ValueError, "attention_mask"),
        (lambda: tiny(ids, kv_cache=[]), TypeError, "KVCache"),
        (lambda: tiny(ids, position_ids=torch.arange(4)[None]), ValueError, "position_ids"),
        (lambda: tiny.generate(ids, max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda: tiny.generate(ids, attention_mask=torch.ones(1, 2)), ValueError, "attention_mask"),
        (lambda: T.Llama.from_hf(tiny.state_dict(), _tiny_config("gqa-untied")), ValueError, "do not fit"),
        (lambda: T.Llama.from_pretrained(tmp_path), ValueError, "config.json"),
    ]:
        with pytest.raises(error, match=match):
            call()
    cache = T.KVCache()
    tiny(ids, kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds"):
        tiny(torch.tensor([[1], [2]]), kv_cache=cache)  # a cache built for batch 1, reused for batch 2


def _filled_cache(model_cls, config, seq_len):
    """transformers' DynamicCache after one forward pass of a tiny random model over seq_len tokens."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model, cache = model_cls(config).eval(), DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, seq_len)), past_key_values=cache, use_cache=True)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_mla_cache_bytes_equal_transformers_deepseek_v3_cache():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1)
    assert _filled_cache(DeepseekV3ForCausalLM, config, 10) == T.mla_cache_bytes(2, 16, 4, 10, batch_size=2, bits=32)
    # DeepSeek-V3's published shape (transformers' DeepseekV3Config defaults): 61 layers, latent 512 + rope 64
    v3 = DeepseekV3Config()
    per_token = T.mla_cache_bytes(v3.num_hidden_layers, v3.kv_lora_rank, v3.qk_rope_head_dim, 1)
    assert per_token == 61 * 576 * 2 == 70_272
    for bad, error in (((0, 512, 64, 1), ValueError), ((61, 512.0, 64, 1), TypeError), ((61, 512, 64, -1), ValueError)):
        with pytest.raises(error):
            T.mla_cache_bytes(*bad)
    with pytest.raises(ValueError):
        T.mla_cache_bytes(61, 512, 64, 1, bits=12)


def test_hybrid_cache_bytes_equal_transformers_sliding_cache():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llmlab import memory

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)
    assert config.layer_types.count("sliding_attention") == 5  # Gemma 3: five local layers per global one
    for seq_len in (5, 20):  # shorter and longer than the window
        theirs = _filled_cache(Gemma3ForCausalLM, config, seq_len)
        assert theirs == T.hybrid_cache_bytes(config.layer_types, 1, 16, seq_len, 8, batch_size=2, bits=32)
    # all global: the plain formula
    assert T.hybrid_cache_bytes(["full_attention"] * 32, 8, 128, 4096) == memory.kv_cache_bytes(32, 8, 128, 4096)
    assert T.hybrid_cache_bytes(["sliding_attention"] * 2, 1, 1, 10, sliding_window=4, bits=8) == 2 * 2 * 3
    for args, kw, error in ((("full_attention", 1, 1, 1), {}, TypeError), (([], 1, 1, 1), {}, ValueError),
                            ((["local"], 1, 1, 1), {}, ValueError), ((["sliding_attention"], 1, 1, 1), {}, ValueError),
                            ((["sliding_attention"], 1, 1, 1), {"sliding_window": 1}, ValueError),
                            ((["full_attention"], 1, 1, 1), {"sliding_window": 2.0}, TypeError),
                            ((["full_attention"], 0, 1, 1), {}, ValueError)):
        with pytest.raises(error):
            T.hybrid_cache_bytes(*args, **kw)
