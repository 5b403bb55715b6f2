"""llmlab.reasoning: pass@k against exact combinatorics, GRPO against trl 1.16, the same batch.

The GRPO reference is a real ``trl.GRPOTrainer`` (GRPOConfig with ``use_cpu=True``, ``report_to="none"``) built once
on a copy of the course model:

* advantages - ``GRPOTrainer._generate_and_score_completions`` on six prompts (two groups of three), with a reward
  function that returns the rewards under test; its ``advantages`` and its logged ``frac_reward_zero_std``;
* log-probabilities - ``GRPOTrainer._get_per_token_logps_and_entropies`` (trl's fused LM head);
* losses - ``GRPOTrainer._compute_loss(model, inputs)`` in train mode on a hand-built ``inputs`` dict, and the
  clip-ratio, KL and entropy metrics it logs.

The trainer is built once with trl's defaults (``beta=0.0``); each case then sets the attributes ``__init__`` copies
from the config and ``_compute_loss`` reads (``loss_type``, ``beta``, ``scale_rewards``), so a case costs one forward
pass instead of a trainer. Normalisers: one process (``accelerator.num_processes == 1``), ``steps_per_generation=1``
(the config's default, equal to ``gradient_accumulation_steps=1``) and ``current_gradient_accumulation_steps = 1``,
which ``Trainer`` only sets inside its training loop, so the test sets it.
"""
import copy
import math

import pytest
import torch

from llmlab import reasoning as R
from llmlab.evaluate import bootstrap_interval

TOL = 1e-6  # losses and metrics against trl

# one torch thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ pass@k --

def test_pass_at_k_equals_exact_combinatorics():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert R.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert R.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert R.pass_at_k(10, 0, 5) == 0.0 and R.pass_at_k(10, 6, 5) == 1.0  # n - c < k: some sample is right
    assert R.pass_at_k(200, 100, 100) == pytest.approx(1 - math.comb(100, 100) / math.comb(200, 100), abs=1e-12)


def test_pass_at_k_is_unbiased_and_the_naive_estimate_is_not():
    n, k, p = 5, 3, 0.3
    truth = 1 - (1 - p) ** k  # pass@k of a problem solved with probability p per sample

    def expectation(estimate):  # over c ~ Binomial(n, p), exactly
        return sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * estimate(c) for c in range(n + 1))

    assert expectation(lambda c: R.pass_at_k(n, c, k)) == pytest.approx(truth, abs=1e-12)
    naive = expectation(lambda c: 1 - (1 - c / n) ** k)
    assert truth == pytest.approx(0.657) and naive == pytest.approx(0.57216)  # biased low at small n
    assert R.pass_at_k(5, 1, 2) == pytest.approx(0.4) and 1 - (1 - 1 / 5) ** 2 == pytest.approx(0.36)


@pytest.mark.parametrize("args, error", [((5.0, 1, 1), TypeError), ((True, 1, 1), TypeError),
                                         ((5, 6, 1), ValueError), ((5, 1, 6), ValueError),
                                         ((5, 1, 0), ValueError), ((5, -1, 1), ValueError),
                                         ((0, 0, 1), ValueError)])
def test_pass_at_k_rejects_bad_input(args, error):
    with pytest.raises(error):
        R.pass_at_k(*args)


def test_mean_pass_at_k_reuses_the_bootstrap_interval():
    counts = [0, 1, 3, 8, 8, 2, 0, 5]
    got = R.mean_pass_at_k(counts, 8, 2)
    values = [R.pass_at_k(8, c, 2) for c in counts]
    assert got["value"] == pytest.approx(sum(values) / len(values)) and got["n"] == 8
    assert (got["ci_low"], got["ci_high"]) == bootstrap_interval(values)
    assert got["ci_low"] <= got["value"] <= got["ci_high"]
    mixed = R.mean_pass_at_k([1, 2], [4, 8], 1)
    assert mixed["value"] == pytest.approx((1 / 4 + 2 / 8) / 2)
    with pytest.raises(ValueError, match="entries"):
        R.mean_pass_at_k([1, 2], [4], 1)
    with pytest.raises(ValueError, match="empty"):
        R.mean_pass_at_k([], 4, 1)
    with pytest.raises(TypeError):
        R.mean_pass_at_k("12", 4, 1)
    with pytest.raises(TypeError, match="n must be an int"):
        R.mean_pass_at_k([1, 2], 8.0, 1)


# ----------------------------------------------------- voting and best-of-N --

def test_majority_vote_ignores_none_and_breaks_ties_by_first_seen():
    assert R.majority_vote(["7", None, "9", "7", None, None]) == "7"
    assert R.majority_vote(["9", "7", "7", "9"]) == "9"  # tie: the first seen wins
    assert R.majority_vote([None, 3, 4]) == 3
    assert R.majority_vote([None, None]) is None
    assert R.majority_vote([math.nan, math.nan, 1.0]) == 1.0  # NaN counts as None
    with pytest.raises(TypeError):
        R.majority_vote("77")
    with pytest.raises(ValueError):
        R.majority_vote([])
    with pytest.raises(TypeError, match="hashable"):
        R.majority_vote([["7"]])


def test_best_of_n_takes_the_first_top_score():
    assert R.best_of_n(["a", "b", "c"], [0.1, 0.9, 0.3]) == "b"
    assert R.best_of_n(["a", "b", "c"], [1, 0, 1]) == "a"
    with pytest.raises(ValueError, match="scores"):
        R.best_of_n(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="finite"):
        R.best_of_n(["a", "b"], [1.0, math.nan])
    with pytest.raises(TypeError):
        R.best_of_n(["a", "b"], [1.0, "2"])


# ------------------------------------------------------------ KL estimators --

def test_kl_estimators_bias_and_sign_on_samples():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    assert exact == pytest.approx(0.7184, abs=1e-4)  # KL(p || q)
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    ks = R.kl_estimators(p.log()[x], q.log()[x])
    se = {name: k.std().item() / math.sqrt(len(x)) for name, k in ks.items()}
    for name in ("k1", "k3"):  # unbiased: the sample mean is within 4 standard errors of the exact KL
        assert abs(ks[name].mean().item() - exact) < 4 * se[name], name
    assert ks["k2"].mean().item() - exact > 20 * se["k2"]  # biased high here: 0.816 vs 0.718
    assert ks["k2"].mean().item() == pytest.approx(0.816, abs=0.005)
    assert (ks["k1"] < 0).any() and (ks["k3"] >= 0).all()
    # exact expectations over p: k1 and k3 give KL, k2 does not
    full = R.kl_estimators(p.log(), q.log())
    assert (p * full["k1"]).sum().item() == pytest.approx(exact, abs=1e-12)
    assert (p * full["k3"]).sum().item() == pytest.approx(exact, abs=1e-12)
    assert (p * full["k2"]).sum().item() == pytest.approx(0.8164, abs=1e-4)
    # k3 is trl's per_token_kl, as written in GRPOTrainer._compute_loss
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    trl_kl = torch.exp(ref - logp) - (ref - logp) - 1
    assert torch.equal(R.kl_estimators(logp, ref)["k3"], trl_kl)
    with pytest.raises(ValueError, match="shape"):
        R.kl_estimators(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError):
        R.kl_estimators([0.1], torch.zeros(1))


# ------------------------------------------------------------- trl fixture --

@pytest.fixture(scope="module")
def grpo(course_model, tmp_path_factory):
    """A real trl GRPOTrainer on a copy of the course model (trl patches the model's forward), in train mode, and
    the reward queue its reward function reads."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = course_model
    model = copy.deepcopy(model)
    queue = []

    def reward(completions, **kwargs):
        return queue.pop(0)

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, per_device_train_batch_size=6, num_generations=3,
                      max_completion_length=24, logging_strategy="no", save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": ["1 + 1 ="] * 6}))
    assert trainer.accelerator.num_processes == 1 and args.steps_per_generation == 1
    assert trainer.beta == 0.0 and args.use_bias_correction_kl and trainer.temperature == 1.0
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop only
    model.train()
    return trainer, model, tokenizer, queue


def _pad(rows, pad, left):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


@pytest.fixture(scope="module")
def batch(grpo):
    """Four prompt/completion rows laid out as trl lays them (left-padded prompts, right-padded completions)."""
    _, _, tokenizer, _ = grpo
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = enc(["What is 12 + 7?", "Spell cat.", "Name a colour.", "What is 3 * 4?"])
    completions = enc([" 19", " c a t, then more letters", " red", " 12, because three fours"])
    prompt_ids, prompt_mask = _pad(prompts, tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = _pad(completions, tokenizer.pad_token_id, left=False)
    assert (completion_mask == 0).any() and (prompt_mask == 0).any()
    return prompt_ids, prompt_mask, completion_ids, completion_mask


# -------------------------------------------------------------- advantages --

@pytest.mark.parametrize("scale", R.SCALES)
def test_group_advantages_equal_trl(grpo, scale):
    trainer, _, _, queue = grpo
    rewards = [1.0, 0.0, 0.0, 0.5, 0.5, 0.5]  # the second group has zero std: advantage 0
    trainer.scale_rewards = scale
    queue.append(rewards)
    try:
        out = trainer._generate_and_score_completions([{"prompt": "What is 2 + 3?"}] * 3 + [{"prompt": "Hi"}] * 3)
    finally:
        trainer.scale_rewards = "group"
    mine = R.group_advantages(rewards, 3, scale)
    torch.testing.assert_close(mine, out["advantages"], rtol=0, atol=TOL)
    assert (mine[3:] == 0).all()
    if scale == "group":  # by hand: mean 1/3, sample std sqrt(1/3), plus trl's 1e-4
        assert mine[0].item() == pytest.approx((2 / 3) / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)
        assert R.zero_std_share(rewards, 3) == trainer._metrics["train"]["frac_reward_zero_std"][-1] == 0.5


def test_group_advantages_leave_out_unscorable_completions():
    got = R.group_advantages([1.0, None, 0.0, 2.0, 2.0, 2.0], 3)
    assert got[1] == 0 and (got[3:] == 0).all()
    assert got[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4), rel=1e-6)  # mean 0.5, std of two
    assert R.zero_std_share([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], 2) == 0.5


@pytest.mark.parametrize("kwargs, error", [
    ({"rewards": [1.0, 0.0, 1.0], "group_size": 2}, ValueError),
    ({"rewards": [1.0, 0.0], "group_size": 1}, ValueError),
    ({"rewards": [1.0, 0.0], "group_size": 2, "scale": "std"}, ValueError),
    ({"rewards": [1.0, math.inf], "group_size": 2}, ValueError),
    ({"rewards": ["1", 0.0], "group_size": 2}, TypeError),
    ({"rewards": [1.0, 0.0], "group_size": 2.0}, TypeError),
    ({"rewards": "10", "group_size": 2}, TypeError),
])
def test_group_advantages_reject_bad_input(kwargs, error):
    with pytest.raises(error):
        R.group_advantages(**kwargs)


# ------------------------------------------------------------ log-probs --

def test_completion_logps_equal_trl(grpo, batch):
    trainer, model, _, _ = grpo
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    with torch.no_grad():
        logps, entropies = R.completion_logps(model, *batch, entropy=True)
        want, want_entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.size(1), compute_entropy=True)
    # float32: the two agree to 2.3e-7 relative (3.8e-6 on a log-prob of -17 was the largest gap seen)
    torch.testing.assert_close(logps, want, rtol=1e-6, atol=TOL)
    torch.testing.assert_close(entropies, want_entropy, rtol=0, atol=1e-5)  # entropies up to log(4096) = 8.3
    assert (logps[completion_mask == 0] == 0).all() and (logps[completion_mask == 1] < 0).all()


def test_completion_logps_reject_bad_input(grpo, batch):
    _, model, _, _ = grpo
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    with pytest.raises(TypeError):
        R.completion_logps("model", *batch)
    with pytest.raises(ValueError, match="integer"):
        R.completion_logps(model, prompt_ids.float(), prompt_mask, completion_ids, completion_mask)
    with pytest.raises(ValueError, match="shape"):
        R.completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        R.completion_logps(model, *batch, temperature=0.0)


# ------------------------------------------------------------------ losses --

def _perturbed(logps, mask, seed):
    g = torch.Generator().manual_seed(seed)
    return ((logps + 0.3 * torch.randn(logps.shape, generator=g)) * mask).detach()


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
def test_grpo_loss_equals_trl(grpo, batch, loss_type, beta):
    trainer, model, _, _ = grpo
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    with torch.no_grad():
        logps = R.completion_logps(model, *batch)
    old, ref = _perturbed(logps, completion_mask, 1), _perturbed(logps, completion_mask, 2)
    advantages = torch.tensor([1.0, -0.7, 0.0, 0.4])
    num_items = 2 * int(completion_mask.sum())  # DAPO: the tokens of a generation batch twice this size
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(num_items)}
    if beta:
        inputs["ref_per_token_logps"] = ref
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer._metrics["train"].clear()
    try:
        want = trainer._compute_loss(model, inputs)
    finally:
        trainer.loss_type, trainer.beta = "dapo", 0.0
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    logps, entropies = R.completion_logps(model, *batch, entropy=True)
    got, metrics = R.grpo_loss(logps, old, advantages, completion_mask, loss_type=loss_type, beta=beta,
                               ref_logps=ref if beta else None, max_completion_length=24, num_items=num_items,
                               entropies=entropies)
    assert abs(got.item() - want.item()) <= TOL, (got.item(), want.item())
    assert set(metrics) == set(logged)
    for name in metrics:
        # entropies near 8 carry float32 steps of ~5e-7: relative there
        tol = {"abs": TOL} if name != "entropy" else {"rel": TOL, "abs": 5e-6}
        assert metrics[name] == pytest.approx(logged[name], **tol), name
    # the perturbation clips some tokens on both sides, so the metrics are not trivially zero
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    if loss_type == "dapo" and beta:  # and the gradients agree
        model.zero_grad()
        trainer.beta = beta
        try:
            trainer._compute_loss(model, inputs).backward()
        finally:
            trainer.beta = 0.0
        want_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got.backward()
        for p, w in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)
        model.zero_grad()


def test_grpo_loss_aggregations_by_hand():
    """Two sequences, 1 and 3 tokens, every token loss 1 on-policy (ratio 1, advantage -1): "grpo" weighs the
    sequences equally, the token-level losses weigh the tokens."""
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-1.0, -1.0])
    loss = lambda t, **kw: R.grpo_loss(logps, logps, adv, mask, loss_type=t, **kw).loss.item()
    assert loss("grpo") == 1.0 and loss("bnpo") == 1.0 and loss("dapo") == 1.0
    assert loss("dr_grpo", max_completion_length=4) == pytest.approx(4 / (2 * 4))
    assert loss("dapo", num_items=8) == pytest.approx(4 / 8)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"loss_type": "ppo"}, ValueError, "loss_type"),
    ({"beta": 0.1}, ValueError, "ref_logps"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"loss_type": "dr_grpo"}, ValueError, "max_completion_length"),
    ({"loss_type": "dr_grpo", "max_completion_length": 2}, ValueError, "shorter"),
    ({"epsilon_low": "0.2"}, TypeError, "epsilon_low"),
    ({"advantages": torch.zeros(3)}, ValueError, "advantages"),
    ({"advantages": [0.0, 0.0]}, TypeError, "advantages"),
    ({"mask": torch.full((2, 3), 2)}, ValueError, "0 and 1"),
    ({"old_logps": torch.zeros(2, 4)}, ValueError, "old_logps"),
    ({"logps": [[0.0]]}, TypeError, "logps"),
    ({"epsilon_low": 1.0}, ValueError, "epsilon_low"),
    ({"loss_type": "dapo", "num_items": 0}, ValueError, "num_items"),
    ({"advantages": torch.zeros(2, dtype=torch.float64, device="meta")}, ValueError, "device"),
])
def test_grpo_loss_rejects_bad_input(kwargs, error, match):
    args = {"logps": torch.zeros(2, 3), "old_logps": torch.zeros(2, 3), "advantages": torch.zeros(2),
            "mask": torch.ones(2, 3)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        R.grpo_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("mask"), **args)
