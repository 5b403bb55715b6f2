"""llmlab.llamacpp against the libraries it joins: the GGUF that llama.cpp's converter writes must tokenize, score
and generate as the Hugging Face model it came from."""
import math

import numpy as np
import pytest
import torch

from llmlab import data, infer, llamacpp, models, pretrain
from llmlab.models import COURSE_MODEL_DIR

pytestmark = pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    return models.load(dtype="float32")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    f32 = llamacpp.convert(COURSE_MODEL_DIR, out / "course-f32.gguf", "f32")
    return {"f32": f32,
            "Q8_0": llamacpp.quantize(f32, out / "course-q8_0.gguf", "Q8_0"),
            "Q4_K_M": llamacpp.quantize(f32, out / "course-q4_k_m.gguf", "Q4_K_M")}


@pytest.fixture(scope="module")
def llm_f32(gguf):
    llm = llamacpp.load(gguf["f32"], threads=1, kv_cache="f32")
    yield llm
    llm.close()


TEXTS = ["Mia has a red ball.", "Question: what is 7 plus 8? Answer: 15",
         "  two  spaces, tabs\tand\nnewlines\n\n", "Numbers 12345 and ü ö ß 🚀", "<|user|>\nhi<|end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(llm_f32, hf, text):
    tokenizer = hf[1]
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm_f32.tokenize(text.encode(), add_bos=False, special=True) == ours


def test_f32_gguf_logits_match_transformers(llm_f32, hf, gguf):
    model, tokenizer = hf
    ids = tokenizer("Mia has a red ball. She goes to the park and", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    exact = llamacpp.logits(llm_f32, ids)  # f32 KV cache: only the order of sums differs from PyTorch's
    assert exact.shape == ref.shape and np.abs(exact - ref).max() < 5e-5
    default = llamacpp.load(gguf["f32"], threads=1)  # llama.cpp's default f16 KV cache rounds keys and values
    diff = np.abs(llamacpp.logits(default, ids) - ref).max()
    assert np.abs(exact - ref).max() < diff < 1e-2
    default.close()


def test_evaluate_matches_pretrain_evaluate(llm_f32, hf):
    model, tokenizer = hf
    rows = pretrain.validation_rows(tokenizer, pretrain.Recipe(val_docs=12))[:3]
    assert abs(llamacpp.evaluate(llm_f32, rows) - pretrain.evaluate(model, rows)) < 1e-4


def test_generate_matches_infer_generate(llm_f32, hf):
    model, tokenizer = hf
    tasks = data.instruction_tasks(8, seed=5)
    prompts = [infer.format_prompt(tokenizer, t.prompt, "qa") for t in tasks]
    assert llamacpp.generate(llm_f32, tokenizer, prompts, 24) == infer.generate(model, tokenizer, prompts, 24)
    scored = llamacpp.score(llm_f32, tokenizer, tasks, "qa", 24)
    assert [r["completion"] for r in scored] == infer.generate(model, tokenizer, prompts, 24)


def test_quantized_files_are_smaller_and_close(gguf, hf):
    model, tokenizer = hf
    rows = pretrain.validation_rows(tokenizer, pretrain.Recipe(val_docs=12))[:2]
    sizes = {k: p.stat().st_size for k, p in gguf.items()}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["f32"] / 3
    ref = pretrain.evaluate(model, rows)
    losses = {}
    for kind in ("Q8_0", "Q4_K_M"):
        llm = llamacpp.load(gguf[kind], threads=1)
        assert llamacpp.weights_bytes(llm) < sizes[kind]
        losses[kind] = llamacpp.evaluate(llm, rows)
        llm.close()
    assert abs(losses["Q8_0"] - ref) < 0.01
    assert abs(losses["Q4_K_M"] - ref) < 0.1 and math.isfinite(losses["Q4_K_M"])


def test_bad_input(tmp_path, gguf, llm_f32, hf):
    with pytest.raises(ValueError, match="no config.json"):
        llamacpp.convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype"):
        llamacpp.convert(COURSE_MODEL_DIR, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(ValueError, match="kind must be one of"):
        llamacpp.quantize(gguf["f32"], tmp_path / "x.gguf", "Q3_XYZ")
    with pytest.raises(ValueError, match="no GGUF file"):
        llamacpp.quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="no GGUF file"):
        llamacpp.load(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="kv_cache"):
        llamacpp.load(gguf["f32"], kv_cache="q4")
    with pytest.raises(ValueError, match="must not be empty"):
        llamacpp.logits(llm_f32, [])
    with pytest.raises(ValueError, match="do not fit"):
        llamacpp.logits(llm_f32, [1] * (llm_f32.n_ctx() + 1))
    with pytest.raises(TypeError, match="2-D tensor"):
        llamacpp.evaluate(llm_f32, [1, 2, 3])
    with pytest.raises(TypeError, match="list of strings"):
        llamacpp.generate(llm_f32, hf[1], "one prompt")
    with pytest.raises(ValueError, match="max_new_tokens"):
        llamacpp.generate(llm_f32, hf[1], ["a"], 0)
    with pytest.raises(ValueError, match="must not be empty"):
        llamacpp.greedy(llm_f32, [], 4)
    for fn in (llamacpp.weights_bytes, lambda m: llamacpp.logits(m, [1]), lambda m: llamacpp.greedy(m, [1], 2)):
        with pytest.raises(TypeError, match="llama_cpp.Llama"):
            fn(hf[0])


def test_greedy_runs_to_length_and_matches_hf(llm_f32, hf):
    model, tokenizer = hf
    ids = tokenizer("Mia has a", add_special_tokens=False)["input_ids"]
    assert len(llamacpp.greedy(llm_f32, ids, 40)) == 40  # no stop: exactly what the speed tables time
    new = llamacpp.greedy(llm_f32, ids, 40, stop=lambda new: new[-1] == tokenizer.eos_token_id)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert new == ref


def test_score_completions_checks_lengths():
    tasks = data.instruction_tasks(2, seed=1)
    with pytest.raises(ValueError, match="one string per task"):
        infer.score_completions(tasks, ["only one"])


def test_tensor_types_counts_each_type_of_a_gguf_file(gguf, tmp_path):
    f32, q8 = llamacpp.tensor_types(gguf["f32"]), llamacpp.tensor_types(gguf["Q8_0"])
    assert set(f32) == {"F32"} and sum(q8.values()) == f32["F32"]
    # Q8_0 stores the weight matrices in blocks of 32; the norms' vectors stay F32
    assert q8["Q8_0"] > 0 and set(q8) <= {"Q8_0", "F32"}
    assert list(q8.values()) == sorted(q8.values(), reverse=True)
    with pytest.raises(ValueError, match="no GGUF file"):
        llamacpp.tensor_types(tmp_path / "absent.gguf")


def test_quantize_is_silent_unless_verbose(gguf, tmp_path, capfd):
    llamacpp.quantize(gguf["f32"], tmp_path / "quiet.gguf", "Q4_K_M")
    assert capfd.readouterr() == ("", "")  # not even llama.cpp's C-level warnings
    llamacpp.quantize(gguf["f32"], tmp_path / "loud.gguf", "Q4_K_M", verbose=True)
    out, err = capfd.readouterr()
    assert "q4_k" in (out + err).lower()  # a line per tensor, with the type chosen
    assert (tmp_path / "quiet.gguf").read_bytes() == (tmp_path / "loud.gguf").read_bytes()
