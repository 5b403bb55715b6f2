"""llmlab.reasoning.GRPO, the training loop, on the course model; and
llmlab.memory.rl_training_memory.

The loop's pieces (group_advantages, completion_logps, grpo_loss) are checked against
trl in test_reasoning.py; here the loop itself: it learns a verifiable reward, a group
whose rewards agree moves nothing, the loss it optimises is grpo_loss recomputed from
outside on the same completions, masks stop at EOS, and bad input fails early.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from llmlab import memory as M
from llmlab import reasoning as R

PROMPTS = ["Mia has a", "Sam has a", "Tom has a", "Lily has a"]

# one torch thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model_tok(course_model):
    model, tok = course_model
    return copy.deepcopy(model), tok


def blue(prompt, completion):  # the verifier: the course model names a colour next
    return float("blue" in completion)


def length(prompt, completion):
    return float(len(completion))


# --------------------------------------------------------------- learning --

def test_grpo_raises_a_verifiable_reward(model_tok):
    model, tok = model_tok
    probe = R.GRPO(model, tok, blue, group_size=32, max_new_tokens=2, seed=100)
    before = probe.rollout(PROMPTS)["metrics"]["reward"]  # 128 samples, no update
    grpo = R.GRPO(model, tok, blue, group_size=8, lr=5e-4, max_new_tokens=2, seed=0)
    logs = [grpo.step(PROMPTS) for _ in range(4)]
    after = probe.rollout(PROMPTS)["metrics"]["reward"]
    # measured: 0.109 before; after 4 steps 0.914 (seed 0), 0.84-0.98 over seeds 0-7
    assert before < 0.3, before  # the word is rare before training
    assert after > before + 0.5, (before, after)
    for log in logs:  # the health signals are there and in range
        assert 0 <= log["frac_reward_zero_std"] <= 1 and log["entropy"] > 0
        assert log["rewards/blue/mean"] == pytest.approx(log["reward"])
        assert 1 <= log["completions/mean_length"] <= log["completions/max_length"] <= 2
        assert 0 <= log["completions/clipped_ratio"] <= 1 and log["grad_norm"] >= 0
        assert "kl" not in log  # beta = 0: no reference model, nothing to measure
    assert grpo.ref_model is None


def test_same_seed_same_run(model_tok):
    model, tok = model_tok
    runs = [R.GRPO(copy.deepcopy(model), tok, blue, group_size=4, lr=1e-3,
                   max_new_tokens=2, seed=3).step(PROMPTS[:2]) for _ in range(2)]
    assert runs[0] == runs[1]


# ------------------------------------------------------- zero-std groups --

def test_groups_whose_rewards_agree_give_no_gradient(model_tok):
    model, tok = model_tok
    before = [p.detach().clone() for p in model.parameters()]
    grpo = R.GRPO(model, tok, lambda p, c: 1.0, group_size=4, lr=1e-3,
                  max_new_tokens=2)
    log = grpo.step(PROMPTS[:2])
    assert log["frac_reward_zero_std"] == 1.0 and log["reward_std"] == 0.0
    assert torch.equal(grpo.last_batch["advantages"], torch.zeros(8))
    assert log["grad_norm"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before,
                                                 strict=True))  # Adam moved nothing

    # one group agrees (all 1.0), the other does not (completion lengths): the first
    # group's rows get advantage 0 and no gradient through their log-probs
    def mixed(prompt, completion):
        return 1.0 if prompt == PROMPTS[0] else float(len(completion))

    grpo = R.GRPO(model, tok, mixed, group_size=4, max_new_tokens=3)
    log = grpo.step(PROMPTS[:2])
    b = grpo.last_batch
    assert log["frac_reward_zero_std"] == 0.5
    assert not b["advantages"][:4].any() and b["advantages"][4:].abs().sum() > 1
    logps = b["logps"].clone().requires_grad_(True)
    R.grpo_loss(logps, b["old_logps"], b["advantages"], b["completion_mask"],
                loss_type="dapo").loss.backward()
    assert not logps.grad[:4].any() and logps.grad[4:].abs().sum() > 0


# ---------------------------------------- the loop's loss is grpo_loss --

def test_step_optimises_grpo_loss_on_its_own_completions(model_tok):
    model, tok = model_tok
    grpo = R.GRPO(model, tok, [blue, length], reward_weights=[1.0, 0.1], group_size=4,
                  lr=1e-3, beta=0.04, loss_type="dr_grpo", max_new_tokens=3,
                  temperature=0.7)
    grpo.step(PROMPTS[:2])  # move off the reference, so the KL term is not 0
    policy = copy.deepcopy(model)  # the model as the next step samples and scores it
    log = grpo.step(PROMPTS[:2])
    b = grpo.last_batch
    args = (b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
            b["completion_mask"], 0.7)
    # rewards and advantages from the texts, the reward functions and group_advantages
    texts = zip(b["prompts"], b["completions"], strict=True)
    rewards = torch.tensor([blue(p, c) + 0.1 * length(p, c) for p, c in texts])
    assert torch.allclose(b["rewards"], rewards)
    assert torch.allclose(b["advantages"], R.group_advantages(rewards, 4), atol=1e-5)
    assert log["rewards/length/mean"] == pytest.approx(
        sum(map(len, b["completions"])) / 8)
    # log-probs under the sampling policy and the reference, recomputed from outside
    with torch.no_grad():
        logps, entropies = R.completion_logps(policy.train(), *args, entropy=True)
        ref = R.completion_logps(grpo.ref_model, *args)
    assert torch.allclose(b["logps"], logps, atol=1e-6)
    assert torch.allclose(b["ref_logps"], ref, atol=1e-6)
    out = R.grpo_loss(logps, logps, b["advantages"],
                      b["completion_mask"], loss_type="dr_grpo", beta=0.04,
                      ref_logps=ref, max_completion_length=3, entropies=entropies)
    assert log["loss"] == pytest.approx(out.loss.item(), abs=1e-6)
    for name in ("kl", "entropy", "clip_ratio/region_mean"):
        assert log[name] == pytest.approx(out.metrics[name], abs=1e-6), name
    assert log["kl"] > 0


def test_later_iterations_use_the_sampling_policys_logps(model_tok):
    model, tok = model_tok
    policy = copy.deepcopy(model)
    grpo = R.GRPO(model, tok, length, group_size=4, lr=1e-2, max_new_tokens=3,
                  num_iterations=3, epsilon_low=0.1, epsilon_high=0.1)
    log = grpo.step(PROMPTS[:2])
    b = grpo.last_batch
    with torch.no_grad():
        old = R.completion_logps(policy, b["prompt_ids"], b["prompt_mask"],
                                 b["completion_ids"], b["completion_mask"])
    assert torch.allclose(b["old_logps"], old, atol=1e-6)
    assert not torch.allclose(b["logps"], old, atol=1e-3)  # the policy moved
    out = R.grpo_loss(b["logps"], b["old_logps"], b["advantages"],
                      b["completion_mask"], epsilon_low=0.1, epsilon_high=0.1)
    assert log["loss"] == pytest.approx(out.loss.item(), abs=1e-6)
    assert log["clip_ratio/region_mean"] == out.metrics["clip_ratio/region_mean"] > 0


def test_completions_stop_at_eos(model_tok):
    model, tok = model_tok
    dot = tok.encode(".")[0]  # the course model ends "The red ball" with "." mostly
    grpo = R.GRPO(model, tok, length, group_size=8, max_new_tokens=2, eos_token_id=dot)
    batch = grpo.rollout(["The red ball", "Mia has a"])
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    lengths = mask.sum(1)
    ended = (ids == dot).any(1)
    assert ended.any() and not ended.all()
    for row, n in zip(ids, lengths.tolist(), strict=True):
        if (row[:n] == dot).any():  # EOS is the last token counted; padding after it
            assert row[n - 1] == dot and (row[n:] == tok.pad_token_id).all()
        else:
            assert n == 2
    m = batch["metrics"]
    assert m["completions/clipped_ratio"] == pytest.approx(1 - ended.float().mean())
    assert m["completions/mean_length"] == pytest.approx(lengths.float().mean())
    assert batch["old_logps"] is None and batch["ref_logps"] is None


# -------------------------------------------------------------- bad input --

@pytest.mark.parametrize("kwargs, error, match", [
    ({"group_size": 1}, ValueError, "group_size"),
    ({"loss_type": "ppo"}, ValueError, "loss_type"),
    ({"scale": "std"}, ValueError, "scale"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"lr": 0}, ValueError, "lr"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"epsilon_low": 1.0}, ValueError, "epsilon_low"),
    ({"num_iterations": 0}, ValueError, "num_iterations"),
    ({"reward_fns": "blue"}, TypeError, "reward_fns"),
    ({"reward_fns": []}, ValueError, "empty"),
    ({"reward_fns": [blue, 1.0]}, TypeError, "callable"),
    ({"reward_weights": [1.0, 2.0]}, ValueError, "reward_weights"),
    ({"model": torch.nn.Linear(2, 2)}, TypeError, "model"),
    ({"tokenizer": SimpleNamespace(encode=str.split)}, TypeError, "decode"),
    ({"eos_token_id": -1}, ValueError, "eos_token_id"),
    ({"eos_token_id": 2.0}, TypeError, "eos_token_id"),
])
def test_grpo_rejects_bad_settings(model_tok, kwargs, error, match):
    model, tok = model_tok
    args = {"model": model, "tokenizer": tok, "reward_fns": blue, **kwargs}
    with pytest.raises(error, match=match):
        R.GRPO(args.pop("model"), args.pop("tokenizer"), args.pop("reward_fns"),
               **args)


@pytest.mark.parametrize("prompts, reward, error, match", [
    ([], blue, ValueError, "prompts is empty"),
    ("Mia has a", blue, TypeError, "list of strings"),
    (["Mia has a", ""], blue, ValueError, "prompt 1 is empty"),
    (["Mia has a", 3], blue, TypeError, "prompt 1"),
    (["Mia has a"], lambda p, c: "1", TypeError, "must return a number"),
    (["Mia has a"], lambda p, c: True, TypeError, "must return a number"),
    (["Mia has a"], lambda p, c: float("nan"), ValueError, "None"),
])
def test_step_rejects_bad_prompts_and_rewards(model_tok, prompts, reward, error,
                                              match):
    model, tok = model_tok
    grpo = R.GRPO(model, tok, reward, group_size=2, max_new_tokens=1)
    with pytest.raises(error, match=match):
        grpo.step(prompts)


def test_unscorable_completions_get_no_advantage(model_tok):
    model, tok = model_tok

    def only_mia(prompt, completion):
        return None if prompt != PROMPTS[0] else float(len(completion))

    batch = R.GRPO(model, tok, only_mia, group_size=4, max_new_tokens=3).rollout(
        PROMPTS[:2])
    assert torch.isnan(batch["rewards"][4:]).all() and not batch["advantages"][4:].any()
    assert batch["metrics"]["reward"] == pytest.approx(batch["rewards"][:4].mean())


# ----------------------------------------------------------------- memory --

def test_rl_memory_counts_the_models_each_method_keeps():
    n, gb = 7e9, M.GB
    shape = M.Shape(4096, 11008, 32, 32, 32, 32000)  # Llama-2-7B
    frozen = M.estimate_inference_memory(n, 16, overhead=0)
    for sh, batch, seq in ((None, 1, 512), (shape, 4, 256)):
        kw = {"shape": sh, "batch_size": batch, "seq_len": seq}
        policy, pair = (M.estimate_training_memory(n, sh, b, seq, "adamw",
                                                   weight_bits=16).total / gb
                        for b in (batch, 2 * batch))  # DPO: chosen and rejected
        got = {m: M.rl_training_memory(m, n, **kw) for m in M.RL_METHODS}
        assert got["sft"]["total"] == pytest.approx(policy)
        assert got["dpo"]["total"] == pytest.approx(pair + frozen)
        assert got["grpo"]["total"] == pytest.approx(policy + frozen)
        assert got["ppo"]["total"] == pytest.approx(2 * policy + 2 * frozen)
        assert got["ppo"]["value_model"] == pytest.approx(got["ppo"]["policy"])
        for m in got.values():
            parts = m["policy"] + m["reference"] + m["reward_model"] + m["value_model"]
            assert m["total"] == pytest.approx(parts)
    # 7B in 16-bit with AdamW, weights and states only: 12 bytes per trained parameter
    assert M.rl_training_memory("grpo", n)["total"] == pytest.approx(98)
    assert M.rl_training_memory("ppo", n)["total"] == pytest.approx(196)
    no_ref = M.rl_training_memory("grpo", n, beta=0)
    assert no_ref["reference"] == 0 and no_ref["total"] == pytest.approx(84)
    assert M.rl_training_memory("ppo", n, beta=0)["total"] == pytest.approx(182)
    rm = M.rl_training_memory("grpo", n, reward_params=1e9)  # a learned reward model
    assert rm["reward_model"] == pytest.approx(2) and rm["total"] == pytest.approx(100)
    small = M.rl_training_memory("ppo", n, reward_params=1e9, value_params=1e9)
    assert small["total"] == pytest.approx(84 + 14 + 2 + 12)


@pytest.mark.parametrize("args, kwargs, error", [
    (("rlhf", 7e9), {}, ValueError), (("grpo", "7B"), {}, TypeError),
    (("grpo", 7e9, 4), {}, ValueError),  # full training needs >= 16-bit weights
    (("grpo", 7e9), {"optimizer": "lion"}, ValueError),
    (("grpo", 7e9), {"beta": -1}, ValueError),
    (("sft", 7e9), {"beta": 0.1}, ValueError),
    (("dpo", 7e9), {"beta": 0}, ValueError),
    (("dpo", 7e9), {"reward_params": 1e9}, ValueError),
    (("grpo", 7e9), {"value_params": 1e9}, ValueError),
])
def test_rl_memory_rejects_bad_input(args, kwargs, error):
    with pytest.raises(error):
        M.rl_training_memory(*args, **kwargs)
