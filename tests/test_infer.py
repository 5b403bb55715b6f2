import copy
import math

import pytest
import torch

from llmlab import data, infer, memory, quant

torch.set_num_threads(1)  # the timings and the statistical test run on a shared CPU


def test_prompt_styles(course_model):
    model, tok = course_model
    assert infer.prompt_style(model, tok) == "qa"
    assert infer.format_prompt(tok, "story.\nWhat color is Mia's hat?") == "story.\nQuestion: What color is Mia's hat? Answer:"
    assert infer.format_prompt(tok, "What is 1 plus 2?", "chat").endswith("<|assistant|>\n")


def test_batched_generation_equals_one_by_one(course_model):
    """Left padding must not change greedy outputs: batch of 3 == each prompt alone."""
    model, tok = course_model
    prompts = ["Mia has a", "Question: What is 3 plus 4? Answer:", "One day, Leo goes to the"]
    together = infer.generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
    alone = [infer.generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    assert tok.padding_side == "right"  # restored


def test_score_checks_answers_with_the_data_module(course_model):
    model, tok = course_model
    tasks = data.instruction_tasks(14, seed=3)
    rows = infer.score(model, tok, tasks, max_new_tokens=16)
    assert [r["kind"] for r in rows] == [t.kind for t in tasks]
    for t, r in zip(tasks, rows):
        assert r["correct"] == data.check_answer(t, r["completion"])
        assert r["reward"] == data.gold_reward(t.prompt, r["completion"])
    # what the course model actually does: it answers in its pretraining format, not as a chat turn
    qa = sum(r["correct"] for r in rows) / len(rows)
    chat = infer.score(model, tok, tasks, style="chat", max_new_tokens=16)
    assert qa >= 0.9 > sum(r["correct"] for r in chat) / len(chat)


def test_bad_inputs(course_model):
    model, tok = course_model
    with pytest.raises(TypeError):
        infer.generate(model, tok, "Mia has a")
    with pytest.raises(ValueError):
        infer.generate(model, tok, ["Mia"], max_new_tokens=0)
    with pytest.raises(ValueError):
        infer.format_prompt(tok, "What is 1 plus 2?", "poem")
    with pytest.raises(TypeError):
        infer.score(model, tok, ["What is 1 plus 2?"])
    with pytest.raises(TypeError):
        infer.format_prompt(None, "What is 1 plus 2?")


# ---------------------------------------------------------------- chapter: Inference --

PROMPTS = ["Mia has a", "Question: What is 3 plus 4? Answer:", "One day, Leo goes to the", "Leo is sad."]


def _ids(tok, prompt):
    return tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_filters_match_transformers_warpers():
    """Same -inf mask and the same values as TopKLogitsWarper / TopPLogitsWarper / TemperatureLogitsWarper."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 6.0):  # flat to peaked distributions
        logits = torch.randn(64, 50, generator=gen) * scale
        for k in (1, 3, 10, 50, 80):
            assert torch.equal(infer.top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits))
        for p in (0.01, 0.1, 0.5, 0.8, 0.95, 0.999, 1.0):
            ours, theirs = infer.top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits)
            assert torch.equal(ours.isinf(), theirs.isinf()) and torch.equal(ours, theirs), p
        for t in (0.3, 1.0, 1.7):
            assert torch.equal(infer.warp_logits(logits, t), TemperatureLogitsWarper(t)(None, logits))
        chain = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
        assert torch.equal(infer.warp_logits(logits, 0.7, top_k=20, top_p=0.9), chain(None, logits))
    ties = torch.tensor([[3.0, 1.0, 3.0, 2.0]])  # a tie at the k-th value keeps both, as transformers does
    assert infer.top_k_filter(ties, 1).isfinite().tolist() == [[True, False, True, False]]


def test_sample_next():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=gen)
    assert torch.equal(infer.sample_next(logits, 0.0), logits.argmax(-1))
    assert torch.equal(infer.sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(infer.sample_next(logits, 5.0, top_p=1e-6), logits.argmax(-1))
    draws = [infer.sample_next(logits, 1.0, top_k=5, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (5,)
    allowed = logits.topk(5, dim=-1).indices
    assert all((allowed == d[:, None]).any(-1).all() for d in draws)


def test_decode_greedy_equals_generate(course_model):
    """Token for token what model.generate(do_sample=False) gives, with and without the KV cache, eos included."""
    model, tok = course_model
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        n = 12 if prompt == "One day, Leo goes to the" else 48
        hf = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(infer.decode(model, ids, n, eos_token_id=tok.eos_token_id), hf), prompt
        if n == 12:
            assert torch.equal(infer.decode(model, ids, n, use_cache=False, eos_token_id=tok.eos_token_id), hf)
    assert (hf[0, -1] == tok.eos_token_id) and hf.shape[1] < _ids(tok, PROMPTS[-1]).shape[1] + 48  # stopped at eos
    # a batch of rows (the same length, no padding); a row that has ended repeats eos (generate: pad, here eos)
    batch = torch.cat([_ids(tok, p)[:, :3] for p in PROMPTS])
    hf = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=20, do_sample=False,
                        pad_token_id=tok.eos_token_id)
    assert torch.equal(infer.decode(model, batch, 20, eos_token_id=tok.eos_token_id), hf)
    assert torch.equal(infer.decode(model, batch, 8, use_cache=False), hf[:, :3 + 8])


def test_decode_sampling_is_reproducible_and_equals_generate(course_model):
    model, tok = course_model
    ids = _ids(tok, PROMPTS[0])
    runs = [infer.decode(model, ids, 16, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # with the global RNG, the same draws as transformers' sampling (it calls torch.multinomial the same way)
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                            pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        ours = infer.decode(model, ids, 24, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=tok.eos_token_id)
        assert torch.equal(ours, hf)


def _degraded_drafts(model):
    """Cheaper, worse copies of the course model: its first 2 of 4 layers; every matrix fake-quantized to 2 bits."""
    shallow = copy.deepcopy(model)
    shallow.model.layers = shallow.model.layers[:2]
    shallow.config.num_hidden_layers = 2
    two_bit = copy.deepcopy(model)
    with torch.no_grad():
        for w in two_bit.parameters():
            if w.dim() == 2:
                w.copy_(quant.fake_quantize(w, bits=2, axis=0))
    return {"2 layers": shallow, "2-bit": two_bit}


def test_speculative_greedy_equals_target_greedy(course_model):
    model, tok = course_model
    n = 24
    drafts = {"itself": model, **_degraded_drafts(model)}
    rates = {name: [] for name in drafts}
    for prompt in PROMPTS[:3]:
        ids = _ids(tok, prompt)
        target_alone = infer.decode(model, ids, n)
        for name, draft in drafts.items():
            for k in (1, 4):
                out, stats = infer.speculative_decode(model, draft, ids, n, k=k)
                assert torch.equal(out, target_alone), (prompt, name, k)
                # each round keeps some draft tokens and adds one target token, for one target pass
                assert stats["accepted"] + stats["target_passes"] == n
                assert stats["proposed"] == stats["draft_passes"] and 0 <= stats["accepted"] <= stats["proposed"]
                assert stats["acceptance_rate"] == stats["accepted"] / stats["proposed"]
                rates[name].append(stats["acceptance_rate"])
                if name == "itself":
                    assert stats["acceptance_rate"] == 1.0 and stats["target_passes"] == math.ceil(n / (k + 1))
    assert all(0 < r < 1 for name in ("2 layers", "2-bit") for r in rates[name])
    print({name: round(sum(r) / len(r), 2) for name, r in rates.items()})  # seen: k=1 0.61 / 0.41, k=4 0.30 / 0.17


def _tiny_llama(seed, init=0.2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         initializer_range=init, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_speculative_sampling_keeps_the_target_distribution():
    """Sampled speculative decoding draws each token from the target's distribution, whatever the draft.

    Two random 8-token models whose next-token distributions are far apart (total variation 0.58). Over N seeded
    runs of 2 new tokens (k=1: accept or resample the first, then a bonus or a fresh second token), the empirical
    distributions of the first token and of the second are compared with the target's exact ones. The total
    variation distance of an empirical distribution over m outcomes is at most sqrt(m/N)/2 on average and
    exceeds that by t with probability at most exp(-2 N t^2) (McDiarmid): with t for 1e-6 this test fails wrongly
    less than once in 10^5 runs. Tried: always accepting the draft gives 0.57 on the first token, resampling from p
    instead of max(0, p - q) 0.16, accepting with probability p instead of p/q 0.19; the bound is 0.10.
    """
    target, draft = _tiny_llama(0), _tiny_llama(1)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p1 = target(prompt).logits[0, -1].double().softmax(-1)
        q1 = draft(prompt).logits[0, -1].double().softmax(-1)
        p2_given_1 = torch.stack([target(torch.cat([prompt, torch.tensor([[x]])], 1)).logits[0, -1]
                                  for x in range(8)]).double().softmax(-1)
    p2 = p1 @ p2_given_1
    assert 0.5 * (p1 - q1).abs().sum() > 0.5  # the draft alone would be far off

    n_runs, gen = 1500, torch.Generator().manual_seed(0)
    first, second = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    accepted = 0
    for _ in range(n_runs):
        out, stats = infer.speculative_decode(target, draft, prompt, 2, k=1, temperature=1.0, generator=gen)
        first[out[0, 3]] += 1
        second[out[0, 4]] += 1
        accepted += stats["accepted"]
    bound = 0.5 * math.sqrt(8 / n_runs) + math.sqrt(math.log(1e6) / (2 * n_runs))
    for counts, exact in ((first, p1), (second, p2)):
        assert 0.5 * (counts / n_runs - exact).abs().sum() < bound
    expected_rate = torch.minimum(p1, q1).sum().item()  # P(accept) = sum_x min(p(x), q(x)) = 1 - TV(p, q)
    assert abs(accepted / n_runs - expected_rate) < 6 * math.sqrt(0.25 / n_runs)  # Hoeffding: 3e-8
    again = [infer.speculative_decode(target, draft, prompt, 6, k=3, temperature=1.0,
                                      generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(*again)


def test_prompt_lookup_candidates():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    lookup = infer.prompt_lookup_candidates
    assert lookup([1, 2, 3, 4, 5, 1, 2, 3]).tolist() == [4, 5, 1, 2]  # "1 2 3" seen before: propose what followed
    assert lookup([1, 2, 3, 4, 5, 1, 2, 3], k=2).tolist() == [4, 5]
    assert lookup([7, 2, 3, 9, 8, 2, 3], ngram=3, k=2).tolist() == [9, 8]  # no earlier "8 2 3": fall back to "2 3"
    assert lookup([5, 6, 1, 5, 6, 2, 5, 6], ngram=2, k=1).tolist() == [1]  # the first occurrence wins
    assert lookup([1, 2, 9, 1, 2], ngram=2, k=4).tolist() == [9, 1, 2]  # only what the sequence holds
    assert lookup([1, 2, 3, 4]).tolist() == [] and lookup([3]).tolist() == []
    assert lookup(torch.tensor([[4, 4]]), ngram=1).tolist() == [4]
    # the same candidates as transformers' prompt-lookup decoding, on random sequences
    hf = PromptLookupCandidateGenerator(num_output_tokens=4, max_matching_ngram_size=3, max_length=100)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, 4, (1, int(torch.randint(2, 30, (1,), generator=gen))), generator=gen)
        assert torch.equal(lookup(ids, ngram=3, k=4), hf.get_candidates(ids)[0][0, ids.shape[1]:])


def test_benchmark(course_model):
    model, tok = course_model
    ids = _ids(tok, PROMPTS[0])
    for result, batch in ((infer.benchmark(lambda n: infer.decode(model, ids, n), new_tokens=16, repeats=3), 1),
                          (infer.benchmark(model, torch.cat([ids, ids]), new_tokens=16, repeats=3, warmup=0), 2)):
        assert {"new_tokens", "batch_size", "repeats", "threads", "total_s", "ttft_s", "per_token_s",
                "tokens_per_s"} <= set(result)
        assert result["batch_size"] == batch and result["new_tokens"] == 16 and result["threads"] == 1
        assert all(result[key] > 0 for key in ("total_s", "ttft_s", "per_token_s", "tokens_per_s"))
        assert result["tokens_per_s"] == pytest.approx(batch * 16 / result["total_s"])
        assert result["per_token_s"] == pytest.approx((result["total_s"] - result["ttft_s"]) / 15)
    with pytest.raises(ValueError):
        infer.benchmark(model)  # a model needs input_ids
    with pytest.raises(ValueError):
        infer.benchmark(model, ids, batch_size=4)
    with pytest.raises(TypeError):
        infer.benchmark("decode")
    with pytest.raises(ValueError):
        infer.benchmark(lambda n: None, new_tokens=0)


def test_roofline():
    # a 7B model in 16 bits on 1000 GB/s: 14 GB a step, at best 14 ms a step, 71.4 tokens/s
    r = infer.roofline(7e9, 2, 1000)
    assert r["bytes_per_step"] == 14e9 and r["step_s"] == pytest.approx(0.014)
    assert r["tokens_per_s"] == r["tokens_per_s_per_sequence"] == pytest.approx(1000 / 14)
    # batch 8 shares the weight reads; each sequence reads its own 1000-token cache of 1e5 bytes a token
    r = infer.roofline(7e9, 2, 1000, batch_size=8, kv_bytes_per_token=1e5, context=1000)
    assert r["kv_bytes"] == 8e8 and r["bytes_per_step"] == pytest.approx(14.8e9)
    assert r["tokens_per_s_per_sequence"] == pytest.approx(1 / 0.0148)
    assert r["tokens_per_s"] == pytest.approx(8 / 0.0148)
    # Llama 3 8B (32 layers, 8 KV heads of 128) in 4 bits on a T4: 4 GB of weights and 128 KiB of cache a token
    kv = memory.kv_cache_bytes(32, 8, 128, seq_len=1)
    r = infer.roofline(8e9, 0.5, "T4", kv_bytes_per_token=kv, context=4096)
    assert kv == 131072 and r["step_s"] == pytest.approx((4e9 + 4096 * 131072) / 320e9)
    assert infer.GPU_BANDWIDTH_GB_S["H100 SXM"] == 3350 and set(memory.GPUS) - {"H100"} <= set(infer.GPU_BANDWIDTH_GB_S)
    for bad in ((0, 2, 1000), (7e9, -1, 1000), (7e9, 2, math.inf), (7e9, 2, "B200")):
        with pytest.raises(ValueError):
            infer.roofline(*bad)
    with pytest.raises(TypeError):
        infer.roofline(7e9, "2", 1000)
    with pytest.raises(TypeError):
        infer.roofline(7e9, 2, 1000, batch_size=True)


def test_roofline_compute_roof():
    """tokens_per_s = min(memory bound, compute bound); the ridge point splits them."""
    old = infer.roofline(7e9, 2, 1000, batch_size=8, kv_bytes_per_token=1e5, context=1000)
    assert old["bound"] == "memory" and old["compute_step_s"] == 0.0 and old["ridge_point"] == math.inf
    assert old["tokens_per_s"] == old["memory_bound_tokens_per_s"] and old["compute_bound_tokens_per_s"] == math.inf
    # 7B in 16 bits on 1000 GB/s and 100 TFLOP/s: intensity = 2 P B / (2 P) = B FLOP/byte, ridge 100 FLOP/byte
    for batch in (1, 10, 99, 100, 101, 400):
        r = infer.roofline(7e9, 2, 1000, batch_size=batch, peak_tflops=100)
        memory_bound, compute_bound = batch / 0.014, 100e12 / 14e9
        assert r["arithmetic_intensity"] == pytest.approx(batch) and r["ridge_point"] == pytest.approx(100)
        assert r["memory_bound_tokens_per_s"] == pytest.approx(memory_bound)
        assert r["compute_bound_tokens_per_s"] == pytest.approx(compute_bound)
        assert r["tokens_per_s"] == pytest.approx(min(memory_bound, compute_bound))
        assert r["step_s"] == max(r["memory_step_s"], r["compute_step_s"])
        assert r["bound"] == ("memory" if batch <= 100 else "compute")
        assert r["attainable_tflops"] == pytest.approx(min(100, batch * 1000 / 1000))
    # a GPU name for the peak; flops_per_token adds attention's FLOPs
    r = infer.roofline(7e9, 2, "H100 SXM", peak_tflops="H100 SXM", batch_size=512, flops_per_token=2 * 7e9 + 1e9)
    assert r["flops_per_step"] == 512 * 15e9 and r["ridge_point"] == pytest.approx(989e12 / 3350e9)
    assert r["bound"] == "compute" and r["tokens_per_s"] == pytest.approx(989e12 / 15e9)
    assert set(infer.GPU_PEAK_TFLOPS) <= set(infer.GPU_BANDWIDTH_GB_S)
    for kw, error in (({"peak_tflops": 0}, ValueError), ({"peak_tflops": -1.0}, ValueError),
                      ({"peak_tflops": math.nan}, ValueError), ({"peak_tflops": "B200"}, ValueError),
                      ({"peak_tflops": True}, TypeError), ({"flops_per_token": 0}, ValueError),
                      ({"flops_per_token": "2"}, TypeError)):
        with pytest.raises(error):
            infer.roofline(7e9, 2, 1000, **kw)


def test_inference_bad_inputs(course_model):
    model, tok = course_model
    ids = _ids(tok, PROMPTS[0])
    logits = torch.zeros(2, 5)
    for call, error in (
        (lambda: infer.decode(None, ids), TypeError),
        (lambda: infer.decode(model, ids[0]), ValueError),
        (lambda: infer.decode(model, ids.float()), ValueError),
        (lambda: infer.decode(model, ids, max_new_tokens=0), ValueError),
        (lambda: infer.decode(model, ids, temperature=-1.0), ValueError),
        (lambda: infer.decode(model, ids, temperature=1.0, top_p=0.0), ValueError),
        (lambda: infer.decode(model, ids, temperature=1.0, top_k=0), ValueError),
        (lambda: infer.decode(model, ids, use_cache="yes"), TypeError),
        (lambda: infer.decode(model, ids, generator=0), TypeError),
        (lambda: infer.speculative_decode(model, "draft", ids, 4), TypeError),
        (lambda: infer.speculative_decode(model, model, torch.cat([ids, ids]), 4), ValueError),
        (lambda: infer.speculative_decode(model, model, ids, 4, k=0), ValueError),
        (lambda: infer.speculative_decode(model, _tiny_llama(0), ids, 4, temperature=1.0), ValueError),  # vocabs
        (lambda: infer.sample_next(logits[0], 1.0), ValueError),
        (lambda: infer.sample_next(logits, 1.0, top_p=1.5), ValueError),
        (lambda: infer.top_k_filter(logits, 2.5), TypeError),
        (lambda: infer.top_k_filter(logits.long(), 2), ValueError),
        (lambda: infer.top_p_filter([1.0, 2.0], 0.5), TypeError),
        (lambda: infer.warp_logits(logits, 0.0), ValueError),
        (lambda: infer.prompt_lookup_candidates("1 2 3"), TypeError),
        (lambda: infer.prompt_lookup_candidates([1, 2], ngram=0), ValueError),
        (lambda: infer.prompt_lookup_candidates(torch.zeros(2, 3, dtype=torch.long)), ValueError),
    ):
        with pytest.raises(error):
            call()
