"""llmlab.serving against the libraries it joins: llama-cpp-python's OpenAI-compatible server, driven by the
official ``openai`` client, must answer as llama.cpp in process and as transformers do on the same GGUF, and must
never be left running."""
import math
import socket

import pytest
import torch

from llmlab import data, infer, llamacpp, models, serving
from llmlab.models import COURSE_MODEL_DIR

pytestmark = pytest.mark.skipif(serving.missing() is not None, reason=str(serving.missing()))


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    return models.load(dtype="float32")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return llamacpp.convert(COURSE_MODEL_DIR, tmp_path_factory.mktemp("gguf") / "course-f32.gguf", "f32")


@pytest.fixture(scope="module")
def server(gguf):
    with serving.LlamaCppServer(gguf) as s:
        yield s
    assert not s.running()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _prompts(tokenizer, n=6):
    tasks = data.instruction_tasks(n, seed=5)
    return [infer.format_prompt(tokenizer, t.prompt, "qa") for t in tasks] + ["Mia has a", "Once there was"]


def _answers(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_starts_answers_and_stops(gguf):
    s = serving.LlamaCppServer(gguf)
    with s:
        assert s.running() and _answers(s.port)
        assert s.base_url == f"http://127.0.0.1:{s.port}/v1"
        assert [m.id for m in s.client().models.list().data] == [s.model]
        pid, log = s.process.pid, s._log_path
        assert log.is_file()
    assert not s.running() and s.process.returncode is not None and not log.exists()
    with pytest.raises(ProcessLookupError):  # exited and reaped: no process left behind
        import os
        os.kill(pid, 0)
    assert not _answers(s.port)


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    s = serving.LlamaCppServer(bad, startup_timeout=60)
    with pytest.raises(RuntimeError, match="exited with code") as e:
        s.start()
    assert f"Failed to load model from file: {bad}" in str(e.value)  # the server's log tail is in the message
    assert not s.running()


def test_greedy_completion_equals_llama_cpp_and_transformers(client, server, gguf, hf):
    model, tokenizer = hf
    llm = llamacpp.load(gguf, threads=1, kv_cache="f32")
    try:
        for prompt in _prompts(tokenizer):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            got = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0.0,
                                            extra_body=serving.GREEDY_EXTRA_BODY)
            assert got.usage.prompt_tokens == len(ids)  # the server tokenizes as the HF tokenizer (no BOS)
            in_process = llamacpp.greedy(llm, ids, 24, stop=lambda new: new[-1] == tokenizer.eos_token_id)
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            assert in_process == ref
            assert got.choices[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    finally:
        llm.close()


def test_the_servers_default_repeat_penalty_changes_greedy_output(client, server):
    # llama.cpp applies its penalties before the greedy sampler: temperature 0 alone is not plain greedy
    def text(**extra):
        return client.completions.create(model=server.model, prompt="Once there was", max_tokens=48,
                                         temperature=0.0, extra_body=extra).choices[0].text
    assert text() != text(repeat_penalty=1.0)
    assert text(repeat_penalty=1.1) == text()


def test_streaming_gives_the_non_streamed_text(client, server, hf):
    for prompt in _prompts(hf[1], 3):
        plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0.0,
                                          extra_body=serving.GREEDY_EXTRA_BODY)
        r = serving.stream_completion(client, server.model, prompt, max_tokens=24)
        assert r["text"] == plain.choices[0].text
        assert r["tokens"] == plain.usage.completion_tokens  # one streamed chunk per token
        assert 0 < r["ttft_s"] <= r["total_s"]
        assert r["tpot_s"] > 0 and r["ttft_s"] + (r["tokens"] - 1) * r["tpot_s"] <= r["total_s"] + 1e-9
        assert r["finish_reason"] in ("stop", "length")


def test_load_test_answers_every_request_in_full(client, server, hf):
    prompts = _prompts(hf[1], 6)
    alone = [serving.stream_completion(client, server.model, p, max_tokens=16)["text"] for p in prompts]
    r = serving.load_test(client, server.model, prompts, concurrency=4, max_tokens=16)
    # the server queues requests instead of cutting a streaming answer short (interrupt_requests=False)
    assert [x["text"] for x in r["results"]] == alone
    assert r["requests"] == len(prompts) and r["concurrency"] == 4
    assert math.isclose(r["requests_per_s"], len(prompts) / r["wall_s"])
    assert math.isclose(r["tokens_per_s"], sum(x["tokens"] for x in r["results"]) / r["wall_s"])
    for k in ("ttft", "tpot", "latency"):
        assert 0 < r[f"{k}_p50_s"] <= r[f"{k}_p90_s"]
    assert r["latency_p90_s"] <= r["wall_s"]


def test_bad_input(tmp_path, gguf, client, server):
    with pytest.raises(ValueError, match="no GGUF file"):
        serving.LlamaCppServer(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="gguf_path"):
        serving.LlamaCppServer(42)
    with pytest.raises(ValueError, match="kv_cache"):
        serving.LlamaCppServer(gguf, kv_cache="q4")
    with pytest.raises(ValueError, match="n_ctx"):
        serving.LlamaCppServer(gguf, n_ctx=0)
    with pytest.raises(TypeError, match="threads"):
        serving.LlamaCppServer(gguf, threads=1.5)
    with pytest.raises(ValueError, match="port"):
        serving.LlamaCppServer(gguf, port=70000)
    with pytest.raises(ValueError, match="startup_timeout"):
        serving.LlamaCppServer(gguf, startup_timeout=0)
    with pytest.raises(RuntimeError, match="not been started"):
        serving.LlamaCppServer(gguf).base_url
    with pytest.raises(RuntimeError, match="already running"):
        server.start()
    with pytest.raises(TypeError, match="openai.OpenAI"):
        serving.stream_completion("http://127.0.0.1", server.model, "Mia")
    with pytest.raises(ValueError, match="prompt must not be empty"):
        serving.stream_completion(client, server.model, "")
    with pytest.raises(TypeError, match="prompt must be a str"):
        serving.stream_completion(client, server.model, ["Mia"])
    with pytest.raises(ValueError, match="max_tokens"):
        serving.stream_completion(client, server.model, "Mia", max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        serving.stream_completion(client, server.model, "Mia", temperature=-1.0)
    with pytest.raises(TypeError, match="model"):
        serving.stream_completion(client, None, "Mia")
    with pytest.raises(TypeError, match="list of strings"):
        serving.load_test(client, server.model, "Mia", 2)
    with pytest.raises(ValueError, match="must not be empty"):
        serving.load_test(client, server.model, [], 2)
    with pytest.raises(ValueError, match="concurrency"):
        serving.load_test(client, server.model, ["Mia"], 0)
    assert server.running()  # none of that disturbed the running server


# ------------------------------------------------------------- transformers serve, continuous batching --

@pytest.fixture(scope="module")
def hf_server():
    with serving.TransformersServer(COURSE_MODEL_DIR, continuous_batching=True) as s:
        yield s
    assert not s.running()


def test_transformers_serve_with_continuous_batching_answers_as_generate(hf_server, hf):
    model, tokenizer = hf
    client = hf_server.client()
    prompts = _prompts(tokenizer, 4)
    alone = []
    for prompt in prompts:
        r = serving.stream_completion(client, hf_server.model, prompt, max_tokens=24,
                                      extra_body=hf_server.greedy_extra_body)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert r["text"] == tokenizer.decode(ref, skip_special_tokens=True)
        assert r["tokens"] == len(ref)  # the stream's usage counts the end-of-text token too
        alone.append(r["text"])
    # batched with each other step by step, every request still gets exactly its own greedy answer
    batched = serving.load_test(client, hf_server.model, prompts, concurrency=len(prompts), max_tokens=24,
                                extra_body=hf_server.greedy_extra_body)
    assert [x["text"] for x in batched["results"]] == alone


def test_transformers_server_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        serving.TransformersServer(tmp_path)
    with pytest.raises(TypeError, match="continuous_batching"):
        serving.TransformersServer(COURSE_MODEL_DIR, continuous_batching="yes")
    with pytest.raises(ValueError, match="num_blocks"):
        serving.TransformersServer(COURSE_MODEL_DIR, num_blocks=0)
    with pytest.raises(TypeError, match="model_dir"):
        serving.TransformersServer(None)


# ------------------------------------------------------------------ the scheduling simulator --

COSTS = {1: 0.01, 2: 0.011, 4: 0.013, 8: 0.017}


def test_one_request_alone_takes_its_service_time():
    for policy in serving.POLICIES:
        r = serving.simulate(COSTS, 0.05, [10], arrivals=[2.0], policy=policy)
        assert r["ttft_s"] == [pytest.approx(0.05)]
        assert r["latency_s"] == [pytest.approx(0.05 + 9 * 0.01)]
        assert r["tpot_s"] == [pytest.approx(0.01)]


def test_serial_matches_the_m_d_1_queue_and_littles_law():
    # Poisson arrivals, one server, a fixed service time S: Pollaczek-Khinchine gives the mean wait
    # W_q = rho S / (2 (1 - rho)) and, through Little's law, the mean queue L_q = lambda W_q
    service, rho, n = 0.05 + 9 * 0.01, 0.6, 20000
    lam = rho / service
    r = serving.simulate({1: 0.01}, 0.05, [10] * n, arrivals=serving.poisson_arrivals(lam, n, seed=3),
                         policy="serial")
    wait = sum(x - service for x in r["latency_s"]) / n
    assert wait == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.08)
    assert r["mean_queue"] == pytest.approx(rho**2 / (2 * (1 - rho)), rel=0.08)
    assert r["mean_queue"] == pytest.approx(r["requests_per_s"] * wait, rel=0.01)  # Little's law


def test_closed_loop_obeys_the_response_time_law():
    # N users, no think time, one at a time: throughput 1/S and every request waits for the N - 1 others
    service = 0.05 + 9 * 0.01
    r = serving.simulate({1: 0.01}, 0.05, [10] * 200, users=4, policy="serial")
    assert r["requests_per_s"] == pytest.approx(1 / service)
    assert r["latency_s"][-100:] == [pytest.approx(4 * service)] * 100
    # all eight requests of a load test sent at once: latencies 1..8 service times, as the chapter's queue
    r = serving.simulate({1: 0.01}, 0.05, [10] * 8, users=8, policy="serial")
    assert sorted(r["latency_s"]) == [pytest.approx(k * service) for k in range(1, 9)]


def test_static_and_continuous_batching_by_hand():
    # two requests at t=0 (2 and 4 tokens), a third at t=0.001 (2 tokens); prefill 0.1, steps from COSTS
    arrivals, outs = [0.0, 0.0, 0.001], [2, 4, 2]
    static = serving.simulate(COSTS, 0.1, outs, arrivals=arrivals, policy="static", max_batch=2)
    # batch {0, 1}: prefill 0.2, then 3 steps at batch 2 (the finished one keeps its slot); then {2}
    assert static["latency_s"][0] == pytest.approx(0.2 + 0.011)
    assert static["latency_s"][1] == pytest.approx(0.2 + 3 * 0.011)
    assert static["latency_s"][2] == pytest.approx(0.2 + 3 * 0.011 + 0.1 + 0.01 - 0.001)
    cont = serving.simulate(COSTS, 0.1, outs, arrivals=arrivals, policy="continuous", max_batch=2)
    # {0, 1} prefilled, one step at 2; request 0 leaves, 2 joins (prefill 0.1), then steps at batch 2
    t1 = 0.2 + 0.011
    assert cont["latency_s"][0] == pytest.approx(t1)
    assert cont["ttft_s"][2] == pytest.approx(t1 + 0.1 - 0.001)
    assert cont["latency_s"][2] == pytest.approx(t1 + 0.1 + 0.011 - 0.001)
    assert cont["latency_s"][1] == pytest.approx(t1 + 0.1 + 0.011 + 0.01)  # alone for its last step
    assert cont["latency_s"][1] < static["latency_s"][1] + static["latency_s"][2]
    # step costs between measured batch sizes are interpolated linearly: 3 sequences cost (0.011 + 0.013) / 2
    r = serving.simulate(COSTS, 0.0, [2, 2, 2], arrivals=[0.0] * 3, policy="continuous")
    assert r["latency_s"] == [pytest.approx(0.012)] * 3


def test_poisson_arrivals_have_the_asked_rate():
    a = serving.poisson_arrivals(50.0, 5000, seed=1)
    assert a == sorted(a) and a == serving.poisson_arrivals(50.0, 5000, seed=1)
    assert len(a) / a[-1] == pytest.approx(50.0, rel=0.05)


def test_simulator_bad_input():
    with pytest.raises(ValueError, match="policy"):
        serving.simulate(COSTS, 0.1, [2], arrivals=[0.0], policy="fifo")
    with pytest.raises(ValueError, match="either arrivals"):
        serving.simulate(COSTS, 0.1, [2], arrivals=[0.0], users=1)
    with pytest.raises(ValueError, match="batch of 1"):
        serving.simulate({2: 0.1}, 0.1, [2], arrivals=[0.0])
    with pytest.raises(ValueError, match="max_batch"):
        serving.simulate(COSTS, 0.1, [2], arrivals=[0.0], max_batch=16)
    with pytest.raises(TypeError, match="step_s"):
        serving.simulate([0.1], 0.1, [2], arrivals=[0.0])
    with pytest.raises(ValueError, match="sorted"):
        serving.simulate(COSTS, 0.1, [2, 2], arrivals=[1.0, 0.0])
    with pytest.raises(ValueError, match="2 times for 1"):
        serving.simulate(COSTS, 0.1, [2], arrivals=[0.0, 1.0])
    with pytest.raises(ValueError, match=">= 1"):
        serving.simulate(COSTS, 0.1, [0], arrivals=[0.0])
    with pytest.raises(ValueError, match="rate"):
        serving.poisson_arrivals(0.0, 3)
    with pytest.raises(TypeError, match="engine"):
        serving.step_costs("model")
    with pytest.raises(ValueError, match="include 1"):
        serving.step_costs("model", batch_sizes=[2, 4])
    with pytest.raises(ValueError, match="no step-cost record"):
        serving.load_step_costs("/nonexistent.json")


def test_step_costs_measures_both_engines(hf, gguf):
    model, _ = hf
    costs = serving.step_costs(model, [1, 2], context=8, repeats=2)
    assert set(costs["step_s"]) == {1, 2} and all(s > 0 for s in costs["step_s"].values())
    llm = llamacpp.load(gguf, threads=1, kv_cache="f32")
    try:
        costs = serving.step_costs(llm, [1, 2], context=8, repeats=2)
        assert set(costs["step_s"]) == {1, 2} and costs["prefill_s"] > 0
    finally:
        llm.close()


# ------------------------------------------------------------------ multi-LoRA --

def test_multi_lora_linear_equals_peft_mixed_adapter_batches():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    cfg = dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    net = get_peft_model(base, LoraConfig(**cfg), adapter_name="first")
    net.add_adapter("second", LoraConfig(**{**cfg, "r": 2, "lora_alpha": 6}))
    net.eval()
    x = torch.randn(5, 3, 16)
    names = ["first", "second", "__base__", "first", "second"]
    with torch.no_grad():
        want = net(x, adapter_names=names)
        layer = net.base_model.model[0]
        r = 4  # pad adapter b's rank 2 to 4 with zeros: one stacked tensor per matrix
        A = torch.zeros(2, r, 16)
        B = torch.zeros(2, 12, r)
        for k, name in enumerate(("first", "second")):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            A[k, : a.shape[0]], B[k, :, : b.shape[1]] = a, b
        scaling = torch.tensor([layer.scaling["first"], layer.scaling["second"]])
        ids = torch.tensor([0, 1, -1, 0, 1])
        got = serving.multi_lora_linear(x, layer.base_layer.weight, A, B, ids, scaling, layer.base_layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="adapter_ids must lie"):
        serving.multi_lora_linear(x, layer.base_layer.weight, A, B, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="shapes do not fit"):
        serving.multi_lora_linear(x[..., :8], layer.base_layer.weight, A, B, ids)
    with pytest.raises(TypeError, match="x must be"):
        serving.multi_lora_linear(x.numpy(), layer.base_layer.weight, A, B, ids)
