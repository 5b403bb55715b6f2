"""llmlab.scratchpad: SFT on traces, sampling and scoring, the shipped checkpoint (chapter: Reasoning; Lab 5).

The SFT examples are checked against transformers' own rendering of the chat turn and its assistant mask (what
trl's assistant-only loss trains on); greedy sampling against a hand-written argmax loop; the counts against the
verifier; the held-out set against every training set the chapter draws.
"""
import math

import pytest
import torch

from llmlab import data, reasoning, scratchpad, tokenization


@pytest.fixture(scope="module")
def course(course_model, one_torch_thread):
    return course_model


def test_examples_are_the_chat_template_and_the_loss_covers_what_trls_assistant_mask_covers(course):
    _, tok = course
    template = tokenization.training_chat_template(tok)
    for task in data.reasoning_tasks(6, seed=5):
        for traces in (True, False):
            ids, n_prompt = scratchpad.encode_example(tok, task, traces=traces)
            answer = task.response if traces else data.direct_answer(task)
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": answer}],
                chat_template=template, return_assistant_tokens_mask=True, return_dict=True)
            full, mask = rendered["input_ids"], rendered["assistant_masks"]
            assert full[: len(ids)] == ids  # the template adds only a newline after the turn
            assert [i for i, m in enumerate(mask) if m] == list(range(n_prompt, len(ids)))
            assert ids[-1] == scratchpad.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|end|>")


def test_sft_lowers_the_loss_and_repeats_exactly(course):
    import copy

    model, tok = course
    tasks = data.reasoning_tasks(32, seed=6)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        runs.append(scratchpad.sft_on_tasks(m, tok, tasks, steps=6, batch_size=8, lr=1e-3, warmup=2,
                                            log_every=1))
    a, b = runs
    assert a["step"] == list(range(1, 7)) and a["loss"] == b["loss"]  # seeded: one machine repeats exactly
    # the first steps of a longer schedule, as the chapter re-runs a stored run's prefix
    prefix = scratchpad.sft_on_tasks(copy.deepcopy(model), tok, tasks, steps=6, batch_size=8, lr=1e-3, warmup=2,
                                     log_every=1, stop_after=3)
    assert prefix["step"] == [1, 2, 3] and prefix["loss"] == a["loss"][:3]
    assert a["loss"][-1] < 0.8 * a["loss"][0]
    assert a["answer_tokens"] > 0 and a["seconds"] > 0
    with torch.no_grad():  # the logged loss is the masked cross-entropy of the batch
        ids, n = scratchpad.encode_example(tok, tasks[0])
        logits = model(input_ids=torch.tensor([ids])).logits[0, n - 1 : len(ids) - 1]
        by_hand = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[n:]))
        labels = torch.tensor([[-100] * n + ids[n:]])
        assert model(input_ids=torch.tensor([ids]), labels=labels).loss.item() == pytest.approx(
            by_hand.item(), rel=1e-5)


def test_greedy_sampling_is_the_argmax_loop_and_counts_its_tokens(course):
    model, tok = course
    tasks = data.reasoning_tasks(2, seed=7)
    rows = scratchpad.sample_tasks(model, tok, tasks, 1, temperature=0, max_new_tokens=12)
    end = scratchpad.end_of_turn_id(tok)
    for task, row in zip(tasks, rows, strict=True):
        ids = tok.encode(scratchpad.chat_prompt(tok, task.prompt), add_special_tokens=False)
        new = []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(token)
                if token == end:
                    break
        assert row["tokens"] == [len(new)]
        assert row["completions"] == [tok.decode(new, skip_special_tokens=True)]


def test_sampling_is_seeded_and_scoring_counts_what_the_verifier_says(course):
    model, tok = course
    tasks = data.reasoning_tasks(3, seed=8)
    a = scratchpad.sample_tasks(model, tok, tasks, 5, temperature=1.0, max_new_tokens=8, seed=3)
    b = scratchpad.sample_tasks(model, tok, tasks, 5, temperature=1.0, max_new_tokens=8, seed=3)
    assert a == b and all(len(r["completions"]) == len(r["tokens"]) == 5 for r in a)
    assert all(1 <= t <= 8 for r in a for t in r["tokens"])
    # scoring made-up completions: counts, majority and tokens
    task = tasks[0]
    fake = [{"completions": [f"{data.MARKER} {task.answer}", "Answer: 1000", "no marker",
                             f"x\n{data.MARKER} {task.answer}", "Answer: 1000"], "tokens": [3, 3, 2, 5, 3]}]
    (row,) = scratchpad.score_samples([task], fake)
    assert row["c"] == 2 and row["n"] == 5 and row["correct"] == [True, False, False, True, False]
    assert row["answers"][2] is None and row["majority"] == task.answer and row["majority_correct"]
    # the rows feed reasoning's estimator directly
    ks = {k: reasoning.mean_pass_at_k([row["c"]], row["n"], k)["value"] for k in (1, 2)}
    assert ks[1] == pytest.approx(2 / 5)
    assert ks[2] == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))


def test_the_held_out_set_never_meets_a_training_set():
    held = scratchpad.held_out_tasks()
    assert len(held) == scratchpad.SFT_RECIPE["n_eval"] and scratchpad.held_out_tasks(10) == held[:10]
    assert {t.kind for t in held} == set(data.REASONING_TASKS)
    r = scratchpad.SFT_RECIPE
    assert data.overlap(scratchpad.training_tasks(r["steps"] * r["batch_size"]), held) == []
    g = scratchpad.GRPO_RECIPE
    assert data.overlap(data.reasoning_tasks(g["steps"] * g["prompts_per_step"], seed=g["task_seed"],
                                             exclude=held), held) == []


def test_the_shipped_checkpoint_loads_with_its_provenance_and_solves_tasks(one_torch_thread):
    model, tok, provenance = scratchpad.load_model()
    assert provenance["recipe"]["steps"] > 0 and provenance["stored_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tasks = scratchpad.held_out_tasks(16)
    rows = scratchpad.score_samples(tasks, scratchpad.sample_tasks(model, tok, tasks, 1, temperature=0))
    # it writes traces with a final answer, and gets most of them right
    assert sum(r["answers"][0] is not None for r in rows) >= 14
    assert sum(r["c"] for r in rows) >= 8


@pytest.mark.parametrize("call, error", [
    (lambda m, t: scratchpad.sample_tasks(m, t, data.reasoning_tasks(2), 2, temperature=0), ValueError),
    (lambda m, t: scratchpad.sample_tasks(m, t, data.reasoning_tasks(2), 0), ValueError),
    (lambda m, t: scratchpad.sample_tasks(m, t, data.reasoning_tasks(2), temperature=-1.0), ValueError),
    (lambda m, t: scratchpad.sample_tasks(m, t, [], 1), ValueError),
    (lambda m, t: scratchpad.sample_tasks(m, t, ["What is 1 plus 2?"], 1), TypeError),
    (lambda m, t: scratchpad.sample_tasks("model", t, data.reasoning_tasks(2), 1), TypeError),
    (lambda m, t: scratchpad.sft_on_tasks(m, t, data.reasoning_tasks(2), steps=0), ValueError),
    (lambda m, t: scratchpad.sft_on_tasks(m, t, data.reasoning_tasks(2), lr=0.0), ValueError),
    (lambda m, t: scratchpad.sft_on_tasks(m, t, data.reasoning_tasks(2), traces="yes"), TypeError),
    (lambda m, t: scratchpad.score_samples(data.reasoning_tasks(2), [{"completions": [], "tokens": []}]),
     ValueError),
    (lambda m, t: scratchpad.held_out_tasks(10_000), ValueError),
    (lambda m, t: scratchpad.load_model("missing"), ValueError),
    (lambda m, t: scratchpad.chat_prompt(t, ""), ValueError),
])
def test_bad_input_raises_one_clear_error(course, call, error):
    model, tok = course
    with pytest.raises(error):
        call(model, tok)
