import pytest

from llmlab import data


def test_deterministic_per_seed():
    assert data.pretraining_corpus(50, seed=3) == data.pretraining_corpus(50, seed=3)
    assert data.pretraining_corpus(50, seed=3) != data.pretraining_corpus(50, seed=4)
    a = [t.prompt for t in data.instruction_tasks(40, seed=1)]
    assert a == [t.prompt for t in data.instruction_tasks(40, seed=1)]


def test_splits_are_disjoint_enough():
    train = set(data.corpus_split("train", 2000))
    val = data.corpus_split("validation", 200)
    # stories are combinatorial: a validation document rarely repeats a training one verbatim
    assert sum(d in train for d in val) < 0.1 * len(val)


@pytest.mark.parametrize("kind", data.EXACT_TASKS)
def test_canonical_response_is_correct_and_wrong_one_is_not(kind):
    for t in data.instruction_tasks(30, seed=5, kinds=[kind]):
        assert data.check_answer(t, t.response), t
        assert data.parse_prompt(t.prompt).answer == t.answer
        assert not data.check_answer(t, "I do not know.")


def test_check_answer_reads_wrong_answers():
    t = data.make_task("add", __import__("random").Random(0))
    a, b = t.prompt[8:-1].split(" plus ")
    assert data.check_answer(t, f"{a} plus {b} is {int(a) + int(b)}.")
    assert not data.check_answer(t, f"{a} plus {b} is {int(a) + int(b) + 1}.")


def test_gold_reward_orders_preference_pairs():
    pairs = data.preference_pairs(300, seed=0)
    kinds = {p["kind"] for p in pairs}
    assert kinds == set(data.TASKS)
    for p in pairs:
        assert data.gold_reward(p["prompt"], p["chosen"]) > data.gold_reward(p["prompt"], p["rejected"]), p


def test_gold_reward_components():
    p = "What is 3 plus 4?"
    assert data.gold_reward(p, "3 plus 4 is 7.") == 1.25
    assert data.gold_reward(p, "3 plus 4 is 8.") == 0.25
    rambling = "Let me think. " * 10 + "3 plus 4 is 7."
    assert data.gold_reward(p, rambling) < 1.0
    s = "Tell me a story about a dog at the park."
    good = data.make_story(__import__("random").Random(0), animal="dog", place="park").text
    assert data.gold_reward(s, good) == 1.25
    assert data.gold_reward(s, "The dog. The dog. The dog.") < data.gold_reward(s, good)


def test_bad_inputs():
    with pytest.raises(TypeError):
        data.instruction_tasks("3")
    with pytest.raises(ValueError):
        data.instruction_tasks(-1)
    with pytest.raises(ValueError):
        data.instruction_tasks(3, kinds=["poetry"])
    with pytest.raises(TypeError):
        data.pretraining_corpus(3, seed=1.5)
    with pytest.raises(ValueError):
        data.parse_prompt("Write a poem.")
    with pytest.raises(TypeError):
        data.gold_reward("What is 3 plus 4?", None)
    with pytest.raises(ValueError):
        data.corpus_split("dev", 3)
    with pytest.raises(TypeError):
        data.make_task("add", 0)
    with pytest.raises(TypeError):
        data.extract_answer("add", "What is 1 plus 2?", None)
    with pytest.raises(TypeError):
        data.preference_pairs(3, seed="a")
    with pytest.raises(ValueError):
        data.make_story(__import__("random").Random(0), animal="dragon")


def test_chat_example_is_one_user_and_one_assistant_turn():
    task = data.instruction_tasks(1, seed=3)[0]
    ex = data.chat_example(task)
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
    assert ex["messages"][0]["content"] == task.prompt and data.check_answer(task, ex["messages"][1]["content"])
    with pytest.raises(TypeError, match="Task"):
        data.chat_example({"prompt": "x"})


def test_held_out_tasks_and_pairs_exclude_every_trained_prompt():
    train = data.instruction_tasks(480, seed=1)
    plain = data.instruction_tasks(64, seed=11)
    assert data.overlap(train, plain)  # two seeds of a small task space share prompts
    held = data.instruction_tasks(64, seed=11, exclude=train)
    assert data.overlap(train, held) == [] and [t.kind for t in held] == [t.kind for t in plain]
    assert held == data.instruction_tasks(64, seed=11, exclude={t.prompt for t in train})  # deterministic
    assert data.instruction_tasks(64, seed=11, exclude=()) == plain
    pairs = data.preference_pairs(400, seed=0)
    test_pairs = data.preference_pairs(200, seed=1, exclude=pairs)
    assert data.overlap(pairs, data.preference_pairs(200, seed=1)) and data.overlap(pairs, test_pairs) == []
    assert data.overlap(["a", "b"], [{"prompt": "b"}, "c"]) == ["b"]


def test_held_out_bad_inputs():
    with pytest.raises(TypeError):
        data.instruction_tasks(4, exclude="What is 2 plus 2?")  # one prompt, not a collection
    with pytest.raises(TypeError):
        data.overlap([1, 2], ["a"])
    every_add = data.instruction_tasks(20_000, seed=0, kinds=("add",))
    with pytest.raises(ValueError, match="no 'add' task left"):
        data.instruction_tasks(1, seed=5, kinds=("add",), exclude=every_add)


def test_reference_english_is_prose_from_the_python_reference_in_a_fixed_order():
    from pydoc_data.topics import topics

    paragraphs = data.reference_english(30, min_words=40)
    assert len(paragraphs) == 30 and len(set(paragraphs)) == 30
    assert paragraphs == data.reference_english(30, min_words=40)  # deterministic
    assert data.reference_english(10) == paragraphs[:10]
    source = " ".join(" ".join(line.strip() for line in t.splitlines()) for t in topics.values())
    for p in paragraphs:
        assert len(p.split()) >= 40 and "\n" not in p and not p.startswith((" ", "*" * 3))
        assert p in source  # the reference's own words, lines joined
    # one paragraph per topic in turn: the first ones come from different topics
    firsts = [next(k for k, t in topics.items() if p[:60] in " ".join(t.split())) for p in paragraphs[:5]]
    assert len(set(firsts)) == 5


def test_reference_english_rejects_bad_counts():
    with pytest.raises(TypeError):
        data.reference_english("10")
    with pytest.raises(ValueError):
        data.reference_english(-1)
    with pytest.raises(ValueError, match="prose paragraphs"):
        data.reference_english(10**6)
