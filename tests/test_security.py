import base64
import random

import pytest
import torch

from llmlab import security as S

torch.set_num_threads(1)


def test_words_never_occur_in_the_world_of_stories():
    """A secret or an injected word found in an answer cannot have come from the note."""
    notes = " ".join(c.user for c in S.benign_cases(200, seed=3, kinds=("note_qa",)))
    assert len(S.WORDS) >= 8
    assert not [w for w in S.WORDS if S.says(notes, w)]


def test_generators_are_deterministic_per_seed():
    assert S.benign_cases(20, seed=1) == S.benign_cases(20, seed=1)
    assert S.benign_cases(20, seed=1) != S.benign_cases(20, seed=2)
    for kw in ({"goal": "hijack"}, {"goal": "leak", "phrasing": "heldout"}, {"goal": "misinform"}):
        assert S.attack_cases("indirect", 10, seed=4, **kw) == S.attack_cases("indirect", 10, seed=4, **kw)
    for style in S.JAILBREAKS:
        a = S.attack_cases("jailbreak", 10, seed=4, style=style)
        assert a == S.attack_cases("jailbreak", 10, seed=4, style=style)
    assert S.hierarchy_cases(12, seed=0) == S.hierarchy_cases(12, seed=0)
    assert [c.kind for c in S.benign_cases(10)] == [S.KINDS[i % len(S.KINDS)] for i in range(10)]


def test_inject_hides_the_instruction_in_the_note_and_keeps_the_question():
    case = S.benign_cases(1, seed=5, kinds=("note_qa",))[0]
    for goal in S.INJECTION_GOALS:
        bad = S.inject(case, goal, "heldout", random.Random(1))
        assert bad.question == case.question and bad.user.endswith("\n" + case.question)
        assert bad.response == case.response and bad.answer == case.answer  # the wanted answer is unchanged
        assert len(bad.note) > len(case.note) and bad.note != case.note
        assert S.injection_filter(bad.note) and not S.injection_filter(case.note)
    assert S.inject(case, "leak", rng=random.Random(1)).target == case.secret
    mis = S.inject(case, "misinform", rng=random.Random(1))
    assert mis.target != case.answer and mis.target in (S.COLORS if case.answer in S.COLORS else S.PLACES)


def test_filter_catches_its_phrasings_and_misses_the_obfuscated_ones():
    for ph in ("train", "heldout"):
        for t in S.INJECTIONS[ph]:
            assert S.injection_filter(t.format(w="moon"))
    for t in S.INJECTIONS["obfuscated"]:
        assert not S.injection_filter(t.format(w="moon"))
    assert not any(S.injection_filter(c.note) for c in S.benign_cases(100, seed=7, kinds=("note_qa",)))
    assert S.injection_filter("IGNORE   previous\ninstructions")


def test_spotlight_modes_against_the_library():
    case = S.benign_cases(1, seed=2, kinds=("note_qa",))[0]
    b64 = S.spotlight(case, "base64")
    assert base64.b64decode(b64.note).decode() == case.note  # Python's base64 decodes it back
    assert b64.user == f"Note: {base64.b64encode(case.note.encode()).decode()}\n{case.question}"
    marked = S.spotlight(case, "datamark")
    assert " " not in marked.note and marked.note.replace(S.MARK, " ") == case.note
    assert S.spotlight(case, "delimit").note == f"<<{case.note}>>"
    own = S.benign_cases(2, seed=2)[1]  # note_say: the user's request written into the note
    assert own.kind == "note_say" and S.spotlight(own, "delimit").user == f"Note: <<{own.note}>>"
    assert S.injection_filter(own.user)  # the filter cannot tell the user's own request from an injected one
    plain = S.benign_cases(4, seed=2, kinds=("public",))[0]
    assert S.spotlight(plain, "base64") == plain  # nothing to mark
    jb = S.jailbreak(plain, "base64")
    assert base64.b64decode(jb.user.split(": ")[1]).decode() == S.SECRET_REQUEST


def test_leak_and_says_checks():
    assert S.leaks("It is a p p l e!", "apple") and S.leaks("elppa", "apple") and S.leaks("APPLE.", "apple")
    assert not S.leaks("The public word is moon.", "apple")
    assert S.says("moon.", "moon") and not S.says("moonlight", "moon")


def test_success_rates_by_hand():
    cases = S.attack_cases("indirect", 4, seed=0, goal="hijack")
    outs = [f"{cases[0].target}.", "Wrong.", f"I say {cases[2].target.upper()}", cases[3].response]
    assert S.attack_success_rate(cases, outs) == 2 / 4
    # benign accuracy: only the last answer gives the note's answer (and only it)
    assert S.benign_accuracy(cases, outs) == 1 / 4
    leak = S.attack_cases("jailbreak", 3, seed=0, style="leet")
    outs = [S.REFUSAL, " ".join(leak[1].secret), f"The secret word is {leak[2].decoy}."]
    assert S.attack_success_rate(leak, outs) == 1 / 3
    assert S.chance_rate(leak, outs) == 1 / 3
    assert S.benign_accuracy(leak, outs) == 1 / 3  # the refusal is the benign answer to a secret request


def test_followed_injection_counts_any_instruction_word():
    cases = S.attack_cases("indirect", 3, seed=0, goal="hijack")
    outs = [f"{cases[0].target}.", "moon." if cases[1].target != "moon" else "star.", cases[2].response]
    assert S.followed_rate(cases, outs) == 2 / 3
    assert S.attack_success_rate(cases, outs) == 1 / 3  # only the first copied the attacker's exact word
    with pytest.raises(ValueError):
        S.followed_injection(S.benign_cases(3)[2], "moon.")  # not a note question


def test_output_check_blocks_leaks_and_off_type_answers_but_not_misinformation():
    case = S.benign_cases(1, seed=5, kinds=("note_qa",))[0]
    assert S.output_check(case, case.response)
    assert not S.output_check(case, f"{case.secret}.")
    assert not S.output_check(case, "moon.")  # no colour or place at all
    wrong = S.inject(case, "misinform", rng=random.Random(0))
    assert S.output_check(wrong, case.response.replace(case.answer, wrong.target))  # the limit


def test_defences_in_the_application(course_model):
    model, tok = course_model
    cases = S.attack_cases("indirect", 3, seed=0, goal="hijack") + S.benign_cases(2, seed=0, kinds=("public",))
    out = S.respond(model, tok, cases, defence="input filter", max_new_tokens=4)
    assert out[:3] == [S.BLOCKED] * 3 and all(o != S.BLOCKED for o in out[3:])
    checked = S.respond(model, tok, cases, defence="output check", max_new_tokens=4)
    plain = S.respond(model, tok, cases, max_new_tokens=4)
    assert checked == [o if S.output_check(c, o) else S.BLOCKED for c, o in zip(cases, plain)]


def test_finetune_learns_the_chat_and_masks_the_prompt(course_model):
    import copy

    model, tok = course_model
    rows = S._encode(tok, S.benign_cases(3))
    for full, start in rows:
        assert tok.decode(full[start:]).endswith(".<|end|>") and start < len(full)
    m = copy.deepcopy(model)
    losses = S.finetune(m, tok, S.benign_cases(16, seed=0, kinds=("public",)), steps=12, batch_size=4, lr=2e-3,
                        progress=False)
    assert len(losses) == 12 and losses[-1] < losses[0] / 2


def test_gcg_loss_never_rises_and_is_deterministic(course_model):
    model, tok = course_model
    case = S.benign_cases(1, seed=0, kinds=("secret",))[0]
    a = S.gcg_suffix(model, tok, case, f"{case.secret}.", n_tokens=4, steps=3, top_k=8, batch=8, seed=1)
    b = S.gcg_suffix(model, tok, case, f"{case.secret}.", n_tokens=4, steps=3, top_k=8, batch=8, seed=1)
    assert a == b and len(a["losses"]) == 4 and len(a["suffix_ids"]) == 4
    assert all(x >= y for x, y in zip(a["losses"], a["losses"][1:]))
    # the reported loss is the model's own loss on the chat with that suffix
    text = S.chat_prompt(tok, case)
    head, tail = text.split(case.user, 1)
    ids = (tok(head + case.user + " ", add_special_tokens=False)["input_ids"] + a["suffix_ids"]
           + tok(tail, add_special_tokens=False)["input_ids"])
    tgt = tok(f"{case.secret}.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids + tgt]), labels=torch.tensor([[-100] * len(ids) + tgt]))
    assert out.loss.item() == pytest.approx(a["losses"][-1], rel=1e-4)


def test_bad_inputs_raise():
    case = S.benign_cases(1, kinds=("note_qa",))[0]
    secret = S.benign_cases(5)[4]
    with pytest.raises(ValueError):
        S.make_case("poem", random.Random(0))
    with pytest.raises(TypeError):
        S.make_case("say", 0)
    with pytest.raises(ValueError):
        S.benign_cases(0)
    with pytest.raises(TypeError):
        S.benign_cases(3, seed="0")
    with pytest.raises(ValueError):
        S.inject(secret)  # no note to inject into
    with pytest.raises(ValueError):
        S.inject(case, goal="steal")
    with pytest.raises(ValueError):
        S.jailbreak(case, "poetry")
    with pytest.raises(ValueError):
        S.many_shot(-1, random.Random(0))
    with pytest.raises(ValueError):
        S.attack_cases("direct", 3)
    with pytest.raises(ValueError):
        S.spotlight(case, "rot13")
    with pytest.raises(TypeError):
        S.injection_filter(None)
    with pytest.raises(ValueError):
        S.leaks("x", " ")
    with pytest.raises(ValueError):
        S.attack_succeeded(case, "x")  # not an attack
    with pytest.raises(ValueError):
        S.attack_success_rate(S.attack_cases("indirect", 2), ["only one"])
    with pytest.raises(ValueError):
        S.benign_accuracy([], [])
    with pytest.raises(TypeError):
        S.answer_correct("case", "x")
    with pytest.raises(ValueError):
        S.training_cases("paranoid")
    with pytest.raises(ValueError):
        S.load_variant("paranoid")
    with pytest.raises(ValueError):
        S.chance_rate([case], ["x"])  # no decoy
