"""CTranslate2 and ONNX Runtime GenAI: converted offline, their fp32 greedy tokens and logits are transformers'."""
import numpy as np
import pytest
import torch

from llmlab import backends
from llmlab.models import COURSE_MODEL_DIR

torch.set_num_threads(1)

PROMPTS = ["Mia has a", "One day, Leo goes to the", "Question: What is 3 plus 4? Answer:"]
FP32 = {"ctranslate2": "float32", "onnxruntime-genai": "fp32"}
NEW = 32


def _skip_if_missing(backend):
    reason = backends.missing(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")


@pytest.fixture(scope="module")
def fp32_engines(tmp_path_factory):
    """Each installed backend's fp32 conversion of the course model, loaded with one thread."""
    out = {}
    for backend, precision in FP32.items():
        if backends.missing(backend) is None:
            folder = backends.convert(backend, COURSE_MODEL_DIR, tmp_path_factory.mktemp(backend) / precision,
                                      precision)
            out[backend] = backends.load(backend, folder)
    return out


def _hf_greedy(model, tok, prompt, n=NEW):
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return ids, out[0, len(ids):].tolist()


def _first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_fp32_greedy_tokens_and_logits_equal_transformers(backend, fp32_engines, course_model):
    _skip_if_missing(backend)
    model, tok = course_model
    engine = fp32_engines[backend]
    for prompt in PROMPTS:
        ids, hf = _hf_greedy(model, tok, prompt)
        ours = backends.greedy(engine, ids, NEW)
        assert len(ours) == NEW
        assert ours == hf, f"{backend}, {prompt!r}: first divergence at new token {_first_divergence(ours, hf)}"
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        logits = backends.next_token_logits(engine, ids)
        assert logits.shape == hf_logits.shape
        assert np.abs(logits - hf_logits).max() < 1e-4


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_a_batch_decodes_as_its_prompts_one_by_one(backend, fp32_engines, course_model):
    _skip_if_missing(backend)
    _, tok = course_model
    engine = fp32_engines[backend]
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    if backend == "onnxruntime-genai":  # no padding: prompts of one length
        rows = [r[:3] for r in rows]
    together = backends.greedy(engine, rows, 12)
    assert together == [backends.greedy(engine, r, 12) for r in rows]


def test_the_onnx_builder_needs_our_lm_head_fix(fp32_engines, course_model, tmp_path):
    """Without the fix the builder takes any Linear as wide as the vocabulary for the LM head; the course
    model's MLP is that wide, so the logits would come out of layer 0. The shipped conversion wires the real
    head: its graph's logits are computed from the final norm."""
    _skip_if_missing("onnxruntime-genai")
    import onnx

    graph = onnx.load(str(fp32_engines["onnxruntime-genai"].path / "model.onnx"), load_external_data=False).graph
    (head,) = [n for n in graph.node if n.output and n.output[0] == "logits"]
    assert "final_norm" in head.input[0]
    assert course_model[0].config.intermediate_size == course_model[0].config.vocab_size  # why it matters here


def test_int8_ctranslate2_is_smaller_and_decodes(tmp_path, course_model):
    _skip_if_missing("ctranslate2")
    model, tok = course_model
    fp32 = backends.convert("ctranslate2", COURSE_MODEL_DIR, tmp_path / "f32", "float32")
    int8 = backends.convert("ctranslate2", COURSE_MODEL_DIR, tmp_path / "i8", "int8")
    assert backends.file_bytes(int8) < backends.file_bytes(fp32) / 3
    engine = backends.load("ctranslate2", int8)
    ids, hf = _hf_greedy(model, tok, PROMPTS[0])
    ours = backends.greedy(engine, ids, NEW)
    assert len(ours) == NEW and all(0 <= t < model.config.vocab_size for t in ours)
    print(f"int8 CTranslate2 agrees with fp32 transformers on {sum(a == b for a, b in zip(ours, hf))}/{NEW} tokens")


def test_bad_inputs(tmp_path, fp32_engines):
    with pytest.raises(ValueError):
        backends.missing("vllm")
    with pytest.raises(TypeError):
        backends.missing(3)
    with pytest.raises(ValueError):
        backends.convert("tensorrt", COURSE_MODEL_DIR, tmp_path / "x", "fp32")
    with pytest.raises(ValueError, match="precision"):
        backends.convert("ctranslate2", COURSE_MODEL_DIR, tmp_path / "x", "fp32")  # CTranslate2 says float32
    with pytest.raises(ValueError, match="precision"):
        backends.convert("onnxruntime-genai", COURSE_MODEL_DIR, tmp_path / "x", "nf4")
    with pytest.raises(ValueError, match="config.json"):
        backends.convert("ctranslate2", tmp_path, tmp_path / "x", "float32")
    with pytest.raises(ValueError):
        backends.file_bytes(tmp_path / "nothing")
    for backend in backends.BACKENDS:
        with pytest.raises(ValueError):
            backends.load(backend, tmp_path, threads=1)  # not a converted model
        with pytest.raises(ValueError):
            backends.load(backend, tmp_path, threads=0)
        with pytest.raises(TypeError):
            backends.load(backend, tmp_path, threads=1.5)
    with pytest.raises(TypeError):
        backends.greedy("a model", [1, 2], 4)
    for backend, engine in fp32_engines.items():
        with pytest.raises(ValueError):
            backends.greedy(engine, [1, 2], 0)
        with pytest.raises(TypeError):
            backends.greedy(engine, [1, 2], 2.0)
        with pytest.raises(TypeError):
            backends.greedy(engine, [], 4)
        with pytest.raises(TypeError):
            backends.greedy(engine, "Mia has a", 4)
        with pytest.raises(TypeError):
            backends.greedy(engine, [1.0, 2.0], 4)
        with pytest.raises(ValueError):
            backends.greedy(engine, [[1, 2], []], 4)
        with pytest.raises(ValueError):
            backends.next_token_logits(engine, [[1, 2], [3, 4]])
    if "onnxruntime-genai" in fp32_engines:
        with pytest.raises(ValueError, match="same length"):
            backends.greedy(fp32_engines["onnxruntime-genai"], [[1, 2], [3, 4, 5]], 4)
    if "ctranslate2" in fp32_engines:
        with pytest.raises(ValueError, match="token ids"):
            backends.greedy(fp32_engines["ctranslate2"], [1, 10**6], 4)
