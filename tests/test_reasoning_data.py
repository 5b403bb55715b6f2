"""The reasoning tasks of llmlab.data: traces, the verifier, the format reward."""

import random
from dataclasses import replace

import pytest

from llmlab import data


def test_deterministic_round_robin_and_separate_from_instruction_tasks():
    tasks = data.reasoning_tasks(40, seed=3)
    assert tasks == data.reasoning_tasks(40, seed=3)
    assert tasks != data.reasoning_tasks(40, seed=4)
    assert [t.kind for t in tasks] == list(data.REASONING_TASKS) * 20
    only = data.reasoning_tasks(5, seed=3, kinds=["chain"])
    assert [t.kind for t in only] == ["chain"] * 5
    assert not set(data.REASONING_TASKS) & set(data.TASKS)
    assert data.reasoning_tasks(0) == []


def test_tasks_are_what_their_docstring_says():
    for t in data.reasoning_tasks(2000, seed=0):
        if t.kind == "add_carry":
            a, b = t.meta["a"], t.meta["b"]
            assert 100 <= a <= 999 and 100 <= b <= 999 and t.answer == str(a + b)
            assert any(data._carries(a, b)), "at least one carry"
            assert t.prompt == f"What is {data._spaced(str(a))} plus " \
                               f"{data._spaced(str(b))}?"
        else:
            value = t.meta["start"]
            assert 0 <= value <= data.MAX_OPERAND and len(t.meta["ops"]) in (2, 3)
            for op, k in t.meta["ops"]:
                value = data._apply(value, op, k)
                assert 0 <= value <= data.MAX_CHAIN
            assert t.answer == str(value) and t.prompt.startswith("Start with ")
        assert t.response == data.reasoning_trace(t)


def test_trace_and_direct_answer_format():
    rng = random.Random(0)
    t = replace(data.make_reasoning_task("add_carry", rng), meta={"a": 347, "b": 285},
                answer="632")
    assert data.reasoning_trace(t) == (
        "7 plus 5 is 12. Write 2, carry 1.\n4 plus 8 plus 1 is 13. Write 3, carry 1.\n"
        "3 plus 2 plus 1 is 6. Write 6.\nAnswer: 6 3 2")
    assert data.direct_answer(t) == "Answer: 6 3 2"
    t = replace(t, meta={"a": 999, "b": 999}, answer="1998")
    assert data.reasoning_trace(t).endswith("9 plus 9 plus 1 is 19. Write 1 9.\n"
                                            "Answer: 1 9 9 8")
    c = replace(data.make_reasoning_task("chain", rng), answer="32",
                meta={"start": 7, "ops": [("plus", 5), ("times", 3), ("minus", 4)]})
    assert data.reasoning_trace(c) == ("7 plus 5 is 12.\nThen 12 times 3 is 36.\n"
                                       "Then 36 minus 4 is 32.\nAnswer: 32")
    assert data.direct_answer(c) == "Answer: 32"


def test_traces_verify_for_their_own_task_only():
    tasks = data.reasoning_tasks(4000, seed=1)
    shuffled = tasks[1:] + tasks[:1]
    for t, other in zip(tasks, shuffled):
        for completion in (data.reasoning_trace(t), data.direct_answer(t)):
            assert data.verify(t, completion)
        assert data.format_reward(t.response) == 1.0
        assert data.format_reward(data.direct_answer(t)) == 0.0  # no scratchpad
        if other.answer != t.answer:
            assert not data.verify(t, other.response)
            assert not data.verify(t, data.direct_answer(other))


@pytest.mark.parametrize("completion, expected", [
    ("Answer: 32", "32"),
    ("Answer: 3 2", "32"),
    ("Answer: 6 3 2.", "632"),
    ("  answer :   32  ", "32"),
    ("ANSWER:32.", "32"),
    ("Answer: -4", "-4"),
    ("Answer: - 4", "-4"),
    ("Answer: +4", "4"),
    ("Answer: 032", "32"),
    ("Answer: -0", "0"),
    ("7 plus 5 is 12.\nAnswer: 12\nand then some garbage 99", "12"),
    ("Answer: 12 apples, I think", "12"),
    ("Answer: 5\nAnswer: 7", "7"),  # the last marker counts
    ("The answer: 1 1 2 0 is it", "1120"),
    ("12 plus 20 is 32.", None),  # no marker
    ("", None),
    ("Answer:", None),
    ("Answer: none", None),
    ("Answer: 32\nAnswer: I do not know", None),  # the last marker has no number
    ("Answer: 3.5", None),  # not an integer
    ("Answer: 1 2.5", None),
    ("Answer: 1,832", None),
    ("Answer:\n32", None),  # the number must be on the marker's line
    # a number that an operator or letters continue is not the answer it starts with
    ("Answer: 632-1", None),
    ("Answer: 632 - 100", None),
    ("Answer: 632/2", None),
    ("Answer: 632 = 632", None),
    ("Answer: 632e3", None),
    ("Answer: 0x632", None),
    ("Answer: " + "9" * 5000, "9" * 5000),  # past int()'s 4300-digit limit: no raise
])
def test_extract_final_answer(completion, expected):
    assert data.extract_final_answer(completion) == expected


def test_verify_reads_only_the_final_answer():
    t = data.reasoning_tasks(2, seed=2)[1]
    right, wrong = t.answer, str(int(t.answer) + 1)
    assert data.verify(t, f"Answer: {right}")
    assert data.verify(t, f"Answer: {data._spaced(right)}.")
    assert not data.verify(t, f"{t.response.rsplit(chr(10), 1)[0]}\nAnswer: {wrong}")
    # the answer only in the trace, not after the marker
    assert not data.verify(t, f"so it is {right}.")
    assert not data.verify(t, f"It is {right}.\nAnswer:")
    assert not data.verify(t, f"Answer: {right}\nAnswer: {wrong}")
    assert data.verify(t, f"Answer: {wrong}\nAnswer: {right}")


def test_format_reward_shape():
    t = data.reasoning_tasks(2, seed=5)
    for task in t:
        trace = task.response
        steps = trace.rsplit("\n", 1)[0]
        assert data.format_reward(trace) == 1.0
        assert data.format_reward("\n" + trace + "\n") == 1.0
        assert data.format_reward(trace + ".") == 1.0
        assert data.format_reward(trace + "\nAnswer: 3") == 0.0  # two markers
        assert data.format_reward(trace + " apples") == 0.0  # garbage after
        assert data.format_reward(trace + "\nThe end.") == 0.0
        assert data.format_reward(steps) == 0.0  # no marker
        assert data.format_reward(steps + "\nAnswer: soon") == 0.0
        assert data.format_reward("Hmm.\n" + trace) == 0.0
    # wrong steps keep the shape: format is not correctness
    assert data.format_reward("1 plus 1 is 3.\nAnswer: 3") == 1.0
    assert data.format_reward("Answer: 3") == 0.0


def test_held_out_sets_never_overlap_training():
    train = data.reasoning_tasks(3000, seed=0)
    plain = data.reasoning_tasks(256, seed=1)
    assert data.overlap(train, plain)  # chains are a small space: seeds share some
    held = data.reasoning_tasks(256, seed=1, exclude=train)
    assert data.overlap(train, held) == [] and len(held) == 256
    assert [t.kind for t in held] == [t.kind for t in plain]
    assert held == data.reasoning_tasks(256, seed=1, exclude={t.prompt for t in train})
    assert data.reasoning_tasks(256, seed=1, exclude=()) == plain
    # exact tasks and reasoning tasks never share a prompt
    assert data.overlap(data.instruction_tasks(500), train) == []


def test_bad_input():
    with pytest.raises(TypeError):
        data.reasoning_tasks("3")
    with pytest.raises(ValueError):
        data.reasoning_tasks(-1)
    with pytest.raises(TypeError):
        data.reasoning_tasks(3, seed=1.5)
    with pytest.raises(ValueError):
        data.reasoning_tasks(3, kinds=["add"])  # an exact kind, not a reasoning one
    with pytest.raises(ValueError):
        data.reasoning_tasks(3, kinds=[])
    with pytest.raises(TypeError):
        data.reasoning_tasks(3, kinds="chain")
    with pytest.raises(TypeError):
        data.reasoning_tasks(3, exclude="Start with 1.")
    with pytest.raises(ValueError):
        data.make_reasoning_task("add", random.Random(0))
    with pytest.raises(TypeError):
        data.make_reasoning_task("chain", 0)
    exact = data.instruction_tasks(1)[0]
    for fn in (data.reasoning_trace, data.direct_answer):
        with pytest.raises(ValueError):
            fn(exact)
        with pytest.raises(TypeError):
            fn("Start with 1.")
    task = data.reasoning_tasks(1)[0]
    with pytest.raises(ValueError):
        data.verify(exact, "Answer: 3")
    with pytest.raises(TypeError):
        data.verify(task, None)
    for fn in (data.extract_final_answer, data.format_reward):
        with pytest.raises(TypeError):
            fn(b"Answer: 3")
    with pytest.raises(ValueError, match="no 'chain' task left"):
        data.reasoning_tasks(1, kinds=["chain"], exclude=_every_chain())


def _every_chain():
    """Every chain prompt the generator can draw, enumerated."""
    def grow(value, ops):
        if len(ops) in (2, 3):
            said = [data._VERB[op].format(k=k) for op, k in ops]
            yield ", then ".join([said[0].capitalize(), *said[1:]])
        if len(ops) == 3:
            return
        for op, ks in (("plus", range(1, 10)), ("minus", range(1, 10)),
                       ("times", (2, 3))):
            for k in ks:
                new = data._apply(value, op, k)
                if 0 <= new <= data.MAX_CHAIN:
                    yield from grow(new, [*ops, (op, k)])

    return {f"Start with {start}. {said}. What is the result?"
            for start in range(data.MAX_OPERAND + 1) for said in grow(start, [])}
