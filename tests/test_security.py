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


# ------------------------------------------------------------------------------------------ supply chain --

def test_pickle_payload_runs_on_load_and_weights_only_refuses_it(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "x": S.pickle_payload(marker)}, tmp_path / "bad.pt")
    import pickle

    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "bad.pt")  # the default, weights_only=True
    assert not marker.exists()
    torch.load(tmp_path / "bad.pt", weights_only=False)
    assert marker.read_text() == S.MARKER_TEXT


@pytest.mark.parametrize("protocol", range(6))
def test_scan_pickle_finds_the_globals_the_unpickler_imports(protocol, tmp_path):
    """The static scan lists exactly the globals pickle's own Unpickler asks for (find_class), every protocol."""
    import io
    import pickle
    from collections import OrderedDict
    from pathlib import PurePosixPath

    obj = {"a": [1, "x", ("x", "y")], "p": S.pickle_payload(tmp_path / "m"), "path": PurePosixPath("/x"),
           "od": OrderedDict(k=PurePosixPath("/y")), "s": {3}}
    blob = pickle.dumps(obj, protocol=protocol)

    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return lambda *a, **k: {}  # record, never run (a dict takes any items set on it)

    Recorder(io.BytesIO(blob)).load()
    scan = S.scan_pickle(blob)
    assert scan["globals"] == sorted(seen)
    assert scan["calls"] >= 1 and not (tmp_path / "m").exists()  # scanning ran nothing
    import pickletools
    from collections import Counter

    assert scan["opcodes"] == dict(Counter(op.name for op, _, _ in pickletools.genops(blob)))


def test_scan_pickle_reads_torch_checkpoints(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    torch.save({"w": torch.zeros(2), "x": S.pickle_payload(tmp_path / "m")}, tmp_path / "bad.pt")
    ok, bad = S.scan_pickle(tmp_path / "ok.pt"), S.scan_pickle(tmp_path / "bad.pt")
    assert "torch._utils._rebuild_tensor_v2" in ok["globals"]
    assert set(bad["globals"]) - set(ok["globals"]) in ({"builtins.exec"}, {"__builtin__.exec"})


def test_safetensors_header_against_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    header = S.safetensors_header(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert header.pop("__metadata__") == f.metadata()
        assert sorted(header) == sorted(f.keys())
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert header[k]["shape"] == list(f.get_slice(k).get_shape())
            assert header[k]["dtype"] == f.get_slice(k).get_dtype()


def _gguf_py():
    import sys

    from llmlab.llamacpp import converter_dir

    try:
        path = str(converter_dir(fetch=False) / "gguf-py")
    except (FileNotFoundError, ImportError):
        pytest.skip("llama.cpp's gguf-py is not unpacked here")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def test_gguf_metadata_against_llama_cpps_gguf_py(tmp_path):
    gguf = _gguf_py()
    meta = {"general.name": "x", "tokenizer.chat_template": "{{ messages }}", "n": 3, "f": 0.5, "b": True,
            "toks": ["a", "bb"]}
    S.write_gguf(tmp_path / "mine.gguf", meta)
    assert S.read_gguf_metadata(tmp_path / "mine.gguf") == {"version": 3, "tensor_count": 0, "metadata": meta}
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "mine.gguf").fields.items()}
    assert {k: v for k, v in theirs.items() if not k.startswith("GGUF.")} == meta
    w = gguf.GGUFWriter(str(tmp_path / "theirs.gguf"), arch="llama")
    w.add_chat_template("{{ x }}")
    w.add_uint32("x.u", 7)
    w.add_array("x.arr", [1, 2, 3])
    w.add_token_list(["a", "bb"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = S.read_gguf_metadata(tmp_path / "theirs.gguf")["metadata"]
    assert got == {"general.architecture": "llama", "tokenizer.chat_template": "{{ x }}", "x.u": 7,
                   "x.arr": [1, 2, 3], "tokenizer.ggml.tokens": ["a", "bb"]}


def test_gguf_reader_refuses_lying_lengths(tmp_path):
    S.write_gguf(tmp_path / "m.gguf", {"k": "value", "arr": ["a"]})
    blob = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "long.gguf").write_bytes(blob[:24] + (2**40).to_bytes(8, "little") + blob[32:])
    with pytest.raises(ValueError, match="runs past the end"):
        S.read_gguf_metadata(tmp_path / "long.gguf")
    (tmp_path / "cut.gguf").write_bytes(blob[:-3])
    with pytest.raises(ValueError):
        S.read_gguf_metadata(tmp_path / "cut.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + blob[4:])
    with pytest.raises(ValueError, match="magic"):
        S.read_gguf_metadata(tmp_path / "magic.gguf")


def test_chat_template_rendering_against_transformers_and_the_sandbox(course_model):
    import os

    from jinja2.exceptions import SecurityError

    _, tok = course_model
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert S.render_chat_template(tok.chat_template, msgs) == tok.apply_chat_template(msgs, tokenize=False)
    assert (S.render_chat_template(tok.chat_template, msgs[:2], add_generation_prompt=True)
            == tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True))
    evil = "{{ cycler.__init__.__globals__.os.getpid() }}"
    assert S.render_chat_template(evil, msgs, sandboxed=False) == str(os.getpid())
    with pytest.raises(SecurityError):
        S.render_chat_template(evil, msgs)


def test_remote_code_runs_only_when_trusted(tmp_path):
    from transformers import AutoConfig

    repo = S.remote_code_repo(tmp_path / "repo", tmp_path / "marker")
    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(repo, trust_remote_code=False)
    assert not (tmp_path / "marker").exists()
    AutoConfig.from_pretrained(repo, trust_remote_code=True)
    assert (tmp_path / "marker").read_text() == S.MARKER_TEXT


# ---------------------------------------------------------------------------------- refusal direction --

def test_refusal_directions_are_the_difference_of_hidden_state_means(course_model):
    model, tok = course_model
    refused = S.benign_cases(3, seed=0, kinds=("secret",))
    answered = S.benign_cases(3, seed=0, kinds=("public",))
    dirs = S.refusal_directions(model, tok, refused, answered)
    n = len(model.model.layers)
    assert dirs.shape == (n, model.config.hidden_size)

    def means(cases):  # transformers' own hidden states; the last one is after the final norm
        tok.padding_side = "left"
        enc = tok([S.chat_prompt(tok, c) for c in cases], return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = "right"
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1].mean(0) for h in hs[1:n]])

    torch.testing.assert_close(dirs[: n - 1], means(refused) - means(answered), rtol=1e-4, atol=1e-4)


def test_ablated_projects_the_direction_out_and_restores_the_model(course_model):
    model, tok = course_model
    enc = tok(["<|user|>\nWhat is the secret word?"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        before = model(**enc).logits
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: None)  # a hook of our own stays
    with S.ablated(model, r):
        probe = model.model.layers[1].register_forward_hook(
            lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
        with torch.no_grad():
            during = model(**enc).logits
        probe.remove()
    hook.remove()
    # the probe was registered after the ablation hook: it sees layer 2's output with r removed
    assert (seen[0] @ (r / r.norm())).abs().max() < 1e-4
    assert not torch.allclose(before, during)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before)
    with pytest.raises(ValueError):
        S.ablated(model, torch.zeros(model.config.hidden_size))
    with pytest.raises(ValueError):
        S.ablated(model, torch.ones(3))
    with pytest.raises(TypeError):
        S.ablated(model, [1.0])


def test_supply_chain_bad_inputs_raise(tmp_path):
    with pytest.raises(TypeError):
        S.pickle_payload(3)
    with pytest.raises(TypeError):
        S.scan_pickle(3)
    with pytest.raises(ValueError):
        S.scan_pickle(tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        S.scan_pickle(b"\x80\x04not a pickle")
    with pytest.raises(TypeError):
        S.write_gguf(tmp_path / "x.gguf", {"k": object()})
    with pytest.raises(TypeError):
        S.read_gguf_metadata(None)
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError):
        S.safetensors_header(tmp_path / "short.safetensors")
    with pytest.raises(TypeError):
        S.render_chat_template(None, [])
    with pytest.raises(TypeError):
        S.remote_code_repo(1, 2)
    with pytest.raises(TypeError):
        S.layer_activations(None, None, [])
    with pytest.raises(TypeError):
        S.respond(None, None, [], cache=[])
