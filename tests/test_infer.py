import pytest

from llmlab import data, infer


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
