import math

import pandas as pd
import pytest
import torch

from llmlab import data, evaluate, infer, pretrain

torch.set_num_threads(1)


def test_perplexity_of_rows_is_exp_of_pretrain_evaluate_and_hf_loss(course_model):
    model, tok = course_model
    rows = pretrain.validation_rows(tok, pretrain.Recipe(val_docs=30, seq_len=64))[:6]
    ours = evaluate.perplexity(model, rows, batch_size=4)
    assert ours == pytest.approx(math.exp(pretrain.evaluate(model, rows, batch_size=6)), rel=1e-5)
    with torch.no_grad():  # transformers' own loss: the mean next-token cross-entropy over all rows
        hf_loss = model(input_ids=rows, labels=rows).loss.item()
    assert ours == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_perplexity_of_texts_matches_hf_loss_per_text_and_padding_changes_nothing(course_model):
    model, tok = course_model
    texts = data.corpus_split("validation", 5)
    batched = evaluate.sequence_nll(model, texts, tok, batch_size=5)  # right-padded to the longest text
    for text, row in zip(texts, batched):
        ids = torch.tensor([[tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]])
        with torch.no_grad():
            hf_loss = model(input_ids=ids, labels=ids).loss.item()
        assert row["tokens"] == ids.shape[1] - 1 and row["bytes"] == len(text.encode())
        assert row["nats"] / row["tokens"] == pytest.approx(hf_loss, rel=1e-5)
    total = sum(r["nats"] for r in batched)
    assert evaluate.perplexity(model, texts, tok) == pytest.approx(math.exp(total / sum(r["tokens"] for r in batched)))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert evaluate.bits_per_byte(model, tok, texts) == pytest.approx(total / math.log(2) / n_bytes)


def test_loglikelihood_equals_a_plain_forward_pass_per_choice(course_model):
    model, tok = course_model
    contexts = ["Question: What is 3 plus 4? Answer:",
                "Mia has a red kite.\nQuestion: What color is Mia's kite? Answer:"]
    conts = [" 3 plus 4 is 7.", " Mia's kite is blue."]
    ours = evaluate.loglikelihood(model, tok, contexts * 2, conts + conts[::-1], batch_size=3)
    for (ctx, cont), got in zip(zip(contexts * 2, conts + conts[::-1]), ours):
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids)))
        assert got["tokens"] == len(ids) - len(ctx_ids)
        assert got["logprob"] == pytest.approx(expected, abs=1e-4)
    assert ours[0]["greedy"] and not ours[3]["greedy"]  # its own answer to 3 plus 4; not after the kite story
    assert ours[0]["logprob"] > ours[2]["logprob"]  # the right sum is likelier than the wrong story answer


def test_trailing_context_spaces_move_to_the_continuation(course_model):
    _, tok = course_model
    assert evaluate._encode_pair(tok, "Answer: ", "7") == evaluate._encode_pair(tok, "Answer:", " 7")


def test_multiple_choice_picks_argmax_and_argmax_per_byte(course_model):
    model, tok = course_model
    questions = evaluate.multiple_choice_tasks(tok, 14, seed=5)
    tasks = data.instruction_tasks(14, seed=5, kinds=data.EXACT_TASKS)
    for q, t in zip(questions, tasks):
        assert q["choices"][q["label"]] == " " + t.response and len(set(q["choices"])) == 4
    rows = evaluate.multiple_choice(model, tok, questions)
    for q, r in zip(questions, rows):
        assert r["pred"] == max(range(4), key=lambda i: r["logprobs"][i])
        per_byte = [lp / len(c.encode()) for lp, c in zip(r["logprobs"], q["choices"])]
        assert r["pred_norm"] == max(range(4), key=lambda i: per_byte[i])
        assert r["acc"] == (r["pred"] == q["label"])
    assert sum(r["acc"] for r in rows) >= 12  # the course model knows these in its pretraining format


def test_exact_match_agrees_with_infer_score_for_a_model_and_a_generation_function(course_model):
    model, tok = course_model
    tasks = data.instruction_tasks(10, seed=3, kinds=data.TASKS)
    reference = infer.score(model, tok, tasks, style="chat", max_new_tokens=16)
    assert evaluate.exact_match(model, tok, tasks, style="chat", max_new_tokens=16) == reference
    generate = lambda prompts: infer.generate(model, tok, prompts, max_new_tokens=16)  # noqa: E731
    assert evaluate.exact_match(generate, tok, tasks, style="chat") == reference
    acc = evaluate.accuracy(reference)
    exact = [r["correct"] for r in reference if r["correct"] is not None]
    assert acc["value"] == sum(exact) / len(exact) and acc["n"] == len(exact)
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]


def _wilson_by_inverting_the_score_test(k, n, z):
    """The Wilson interval by definition: the p whose score statistic |k/n - p| / sqrt(p(1-p)/n) is <= z."""
    inside = lambda p: abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)  # noqa: E731

    def edge(lo, hi):  # bisect between a p inside the interval and one outside
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo

    centre = (k + z * z / 2) / (n + z * z)
    return edge(centre, 0.0), edge(centre, 1.0)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (7, 20), (50, 64), (1, 1), (400, 1000)])
def test_wilson_interval_matches_scipy_and_the_score_test(k, n):
    lo, hi = evaluate.wilson_interval(k, n)
    z = 1.959963984540054
    assert (lo, hi) == pytest.approx(_wilson_by_inverting_the_score_test(k, n, z), abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_compare_proportions_ranks_only_separated_intervals():
    assert evaluate.compare_proportions(53, 64, 10, 64) == "higher"  # 0.83 vs 0.16: far apart
    assert evaluate.compare_proportions(10, 64, 53, 64) == "lower"
    # 0.672 vs 0.609 at n = 64: the intervals overlap, so no ranking
    assert evaluate.compare_proportions(43, 64, 39, 64) == "tie"
    # the same rates on 100 times the examples separate
    assert evaluate.compare_proportions(4300, 6400, 3900, 6400) == "higher"
    # the rule is exactly "the intervals do not overlap"
    for k_a, k_b in [(40, 25), (41, 25), (45, 30), (50, 35)]:
        (lo_a, hi_a), (lo_b, hi_b) = evaluate.wilson_interval(k_a, 64), evaluate.wilson_interval(k_b, 64)
        expected = "higher" if lo_a > hi_b else "tie"
        assert evaluate.compare_proportions(k_a, 64, k_b, 64) == expected
    with pytest.raises(ValueError, match="cannot exceed"):
        evaluate.compare_proportions(65, 64, 1, 64)
    with pytest.raises(ValueError, match="confidence"):
        evaluate.compare_proportions(1, 64, 1, 64, confidence=1.5)


def test_bootstrap_interval_of_a_mean_is_close_to_the_normal_interval():
    values = [float(i % 7) for i in range(700)]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    lo, hi = evaluate.bootstrap_interval(values, seed=0)
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * sd / math.sqrt(len(values)), rel=0.1)
    assert evaluate.bootstrap_interval(values, seed=0) == (lo, hi)  # deterministic per seed


def test_ngram_overlap():
    corpus = ["Mia has a red kite. One day, she takes the kite to the park."]
    got = evaluate.ngram_overlap(["mia has a red kite", "Leo has a blue ball", "kite"], corpus, n=3)
    assert got[0] == 1.0 and got[1] == 0.0 and got[2] == 0.0  # "kite": shorter than n, no n-grams
    assert evaluate.ngram_overlap(["Mia has a blue kite"], corpus, n=2) == [pytest.approx(2 / 4)]


def test_run_returns_one_row_per_metric_with_intervals(course_model):
    model, tok = course_model
    table = evaluate.run(model, tok, n=8)
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == ["perplexity", "bits per byte", "exact match (qa)", "gold reward (qa)",
                                 "multiple choice acc", "multiple choice acc_norm"]
    assert (table["ci_low"] <= table["value"] + 1e-12).all() and (table["value"] <= table["ci_high"] + 1e-12).all()
    assert (table["n"] == 8).all()
    generate = lambda prompts: infer.generate(model, tok, prompts, max_new_tokens=16)  # noqa: E731
    only = evaluate.run(generate, tok, n=8)
    assert list(only.index) == ["exact match (qa)", "gold reward (qa)"]
    assert only.loc["exact match (qa)", "value"] == table.loc["exact match (qa)", "value"]


def test_bad_inputs_raise_clear_errors(course_model):
    model, tok = course_model
    with pytest.raises(ValueError, match="cannot exceed"):
        evaluate.wilson_interval(5, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        evaluate.wilson_interval(1, 2.0)
    with pytest.raises(ValueError, match="confidence"):
        evaluate.wilson_interval(1, 2, confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        evaluate.bootstrap_interval([])
    with pytest.raises(TypeError, match="numbers"):
        evaluate.bootstrap_interval(["a", "b"])
    with pytest.raises(ValueError, match="rows must be"):
        evaluate.perplexity(model, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="tokenizer"):
        evaluate.perplexity(model, ["some text"])
    with pytest.raises(TypeError, match="list of strings"):
        evaluate.perplexity(model, "some text", tok)
    with pytest.raises(TypeError, match="causal LM"):
        evaluate.perplexity("gpt2", torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="continuations"):
        evaluate.loglikelihood(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="label"):
        evaluate.multiple_choice(model, tok, [{"context": "Q:", "choices": [" a", " b"], "label": 2}])
    with pytest.raises(TypeError, match="list of llmlab.data.Task"):
        evaluate.exact_match(model, tok, ["What is 1 plus 2?"])
    with pytest.raises(ValueError, match="one string per prompt"):
        evaluate.exact_match(lambda prompts: ["7"], tok, data.instruction_tasks(2))
    with pytest.raises(ValueError, match="no row has an exact answer"):
        evaluate.accuracy([{"correct": None}])
    with pytest.raises(ValueError, match="suite"):
        evaluate.run(model, tok, suite="mmlu")
    with pytest.raises(ValueError, match="log-probabilities"):
        evaluate.run(lambda prompts: prompts, tok, suite="perplexity")
    with pytest.raises(TypeError, match="function prompts -> completions"):
        evaluate.run(42, tok)
    with pytest.raises(TypeError, match="test_texts"):
        evaluate.ngram_overlap("a b c", ["a b c"])


def test_a_llama_cpp_model_runs_through_the_same_harness(tmp_path, course_model):
    from llmlab import llamacpp
    from llmlab.models import COURSE_MODEL_DIR

    if llamacpp.missing():
        pytest.skip(f"needs llama-cpp-python ({llamacpp.missing()})")
    model, tok = course_model
    llm = llamacpp.load(llamacpp.convert(COURSE_MODEL_DIR, tmp_path / "f32.gguf", "f32"), threads=1, kv_cache="f32")
    try:
        rows = pretrain.validation_rows(tok, pretrain.Recipe(val_docs=20, seq_len=64))[:4]
        assert evaluate.perplexity(llm, rows) == pytest.approx(math.exp(llamacpp.evaluate(llm, rows)), rel=1e-9)
        assert evaluate.perplexity(llm, rows) == pytest.approx(evaluate.perplexity(model, rows), rel=1e-3)
        tasks = data.instruction_tasks(6, seed=2)
        reference = llamacpp.score(llm, tok, tasks, max_new_tokens=16)
        assert evaluate.exact_match(llm, tok, tasks, max_new_tokens=16) == reference
        table = evaluate.run(llm, tok, n=4)
        assert list(table.index) == ["perplexity", "bits per byte", "exact match (qa)", "gold reward (qa)"]
    finally:
        llm.close()


def test_model_card_scores_keep_their_provenance(tmp_path):
    """Chapter: Evaluation. Every reported score is pinned to the developer's README at
    a commit, and the table row it came from prints the value."""
    import copy
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path = root / "book" / "evaluation" / "model_card_scores.json"
    scores = evaluate.load_model_card_scores(path)
    assert evaluate.check_model_card_scores(scores) >= 40
    by = {
        (s["model"], s["benchmark"], s["setting"]): s["value"] for s in scores["scores"]
    }
    assert by["DeepSeek-R1", "AIME 2024", "Pass@1"] == 79.8
    assert scores["benchmarks"]["SWE-bench Verified"]["n"] == 500
    for change, match in (
        (lambda d: d["scores"][0].update(value=12.3), "does not print"),
        (lambda d: d["scores"][0].update(value=101.0), "percentage"),
        (lambda d: d["scores"][0].update(source="https://example.org/x"), "pinned"),
        (lambda d: d["scores"][0].update(benchmark="nope"), "benchmark"),
        (lambda d: d["benchmarks"]["AIME 2024"].update(n_source=None), "n_source"),
    ):
        bad = copy.deepcopy(scores)
        change(bad)
        with pytest.raises(ValueError, match=match):
            evaluate.check_model_card_scores(bad)
    with pytest.raises(TypeError):
        evaluate.load_model_card_scores(42)
    with pytest.raises(TypeError):
        evaluate.check_model_card_scores({"scores": []})
    with pytest.raises(ValueError):
        evaluate.load_model_card_scores(tmp_path / "missing.json")
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"benchmarks": {}, "scores": [{"model": "x"}]}))
    with pytest.raises(ValueError):
        evaluate.load_model_card_scores(bad_file)
