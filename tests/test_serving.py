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
