"""llmlab.align against trl 1.16, the library it explains, and a PPO run whose reward must rise.

The references, all in trl 1.16.0 (each loss is computed inside a trainer method, so each test calls that method on
a trainer made with ``object.__new__`` and given only the attributes the method reads, with real models):

* reward model - ``trl.trainer.reward_trainer.RewardTrainer.compute_loss``
* DPO and IPO  - ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` (``loss_type="sigmoid"`` / ``"ipo"``)
* KTO          - ``trl.trainer.kto_trainer.KTOTrainer._compute_loss`` (promoted out of ``trl.experimental`` in 1.x)
* ORPO         - ``trl.experimental.orpo.orpo_trainer.ORPOTrainer.get_batch_loss_metrics``

trl 1.16 has no PPO trainer (no ``PPOTrainer``, ``PPOConfig`` or ``AutoModelForCausalLMWithValueHead`` anywhere in
the package, ``trl.experimental`` included), so ``align.PPO`` is tested by what it must do: raise a reward.
"""
import contextlib
import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmlab import align as A
from llmlab.data import preference_pairs

# one torch thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_llama(vocab=16, seed=0, head="causal", pad_token_id=0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None, num_labels=1)
    return (LlamaForCausalLM if head == "causal" else LlamaForSequenceClassification)(config).eval()


def _rows(tokenizer, prompts, completions):
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for prompt + completion + EOS."""
    seqs = []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(f"Question: {prompt} Answer:", add_special_tokens=False)["input_ids"]
        c = tokenizer(f" {completion}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((p, c))
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attention[i, :len(p) + len(c)] = 1
        completion[i, len(p):len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


@pytest.fixture(scope="module")
def pairs(course_model):
    """Six course preference pairs as one batch ``[chosen; rejected]`` (trl's DPO layout), the course model as
    the reference and a randomly nudged copy of it as the policy (so policy != reference)."""
    model, tokenizer = course_model
    data = preference_pairs(6, seed=3)
    prompts = [d["prompt"] for d in data]
    batch = _rows(tokenizer, prompts * 2, [d["chosen"] for d in data] + [d["rejected"] for d in data])
    reference = copy.deepcopy(model)
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.05)
    return SimpleNamespace(batch=batch, policy=policy, reference=reference, tokenizer=tokenizer, prompts=prompts,
                           data=data, n=len(data))


def _logps(model, rows, average=False):
    return A.sequence_logprobs(model, rows["input_ids"], rows["attention_mask"], rows["completion_mask"], average)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           autocast=contextlib.nullcontext, unwrap_model=lambda m: m)


def _bare(trainer_cls, **attributes):
    """A trl trainer without its ``__init__``: only the attributes its loss method reads."""
    trainer = object.__new__(trainer_cls)
    trainer.__dict__.update({
        "accelerator": _accelerator(), "args": SimpleNamespace(gradient_checkpointing_kwargs=None),
        "aux_loss_enabled": False, "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0, "_tp_size": 1, **attributes})
    return trainer


def _fused(model, **kwargs):
    """A copy of ``model`` with trl's fused LM head (what trl's trainers add in ``__init__``)."""
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(model)
    add_fused_lm_head(model, **kwargs)
    return model


# ---------------------------------------------------------- log-probabilities --

def test_sequence_logprobs_is_a_gather_of_log_softmax():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 16, (3, 9), generator=g)
    attention = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    labels = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 4 + [0] * 2, [0] * 2 + [1] * 3 + [0] * 4])
    got = A.sequence_logprobs(model, ids, attention, labels)
    assert got.shape == (3,) and got.dtype == torch.float32 and (got < 0).all()
    with torch.no_grad():
        for b in range(3):
            n = int(attention[b].sum())
            logits = model(input_ids=ids[b:b + 1, :n]).logits[0]  # the row alone, unpadded
            want = sum(torch.log_softmax(logits[t - 1], -1)[ids[b, t]] for t in range(n) if labels[b, t])
            torch.testing.assert_close(got[b], want, rtol=1e-6, atol=1e-6)
    avg = A.sequence_logprobs(model, ids, attention, labels, average=True)
    torch.testing.assert_close(avg, got / labels.sum(1), rtol=1e-6, atol=1e-6)


def test_sequence_logprobs_left_padding_changes_nothing():
    model = _tiny_llama()
    ids = torch.randint(1, 16, (1, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[0, 0, 1, 1, 1, 1]])
    alone = A.sequence_logprobs(model, ids, torch.ones_like(ids), labels)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    torch.testing.assert_close(A.sequence_logprobs(model, padded, mask, torch.cat([torch.zeros(1, 3), labels], 1)),
                               alone, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_gradients_flow_to_the_model():
    model = _tiny_llama()
    ids = torch.randint(1, 16, (2, 5), generator=torch.Generator().manual_seed(3))
    A.sequence_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0, 1, 1, 1, 1]] * 2)).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------- against trl --

def test_reward_model_loss_matches_trl_reward_trainer(pairs):
    from trl import RewardTrainer

    reward_model = _tiny_llama(vocab=768, head="classification", pad_token_id=pairs.tokenizer.pad_token_id)
    inputs = {k: pairs.batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        chosen, rejected = reward_model(**inputs).logits.squeeze(-1).chunk(2)
    margin = torch.linspace(0, 0.5, pairs.n)
    for extra in ({}, {"margin": margin}):
        trainer = _bare(RewardTrainer, model=reward_model, args=SimpleNamespace(center_rewards_coefficient=None))
        with torch.no_grad():
            want = RewardTrainer.compute_loss(trainer, reward_model, {**inputs, **extra})
        got = A.bradley_terry_loss(chosen, rejected, **extra)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert trainer._metrics["eval"]["margin"][0] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)


def _trl_dpo(pairs, loss_type, beta):
    from trl import DPOTrainer

    policy = _fused(pairs.policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = _bare(DPOTrainer, model=policy, ref_model=_fused(pairs.reference), beta=beta, loss_types=[loss_type],
                    loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=False,
                    use_weighting=False, label_smoothing=0.0)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, dict(pairs.batch), return_outputs=False)
    return loss, trainer._metrics["eval"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(pairs, beta):
    want, metrics = _trl_dpo(pairs, "sigmoid", beta)
    with torch.no_grad():
        policy_chosen, policy_rejected = _logps(pairs.policy, pairs.batch).chunk(2)
        ref_chosen, ref_rejected = _logps(pairs.reference, pairs.batch).chunk(2)
    got = A.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-6)
    # trl's logged numbers: our sequence_logprobs are its log-probs, our implicit rewards its rewards
    assert metrics["logps/chosen"][0] == pytest.approx(policy_chosen.mean().item(), rel=1e-6)
    assert metrics["logps/rejected"][0] == pytest.approx(policy_rejected.mean().item(), rel=1e-6)
    # rewards are beta * (difference of two float32 sums of ~10-60 log-probs): equal to 1e-6 of those sums
    tol = 1e-6 * beta * torch.cat([policy_rejected, ref_rejected, policy_chosen, ref_chosen]).abs().max().item()
    assert metrics["rewards/chosen"][0] == pytest.approx(got.chosen_rewards.mean().item(), abs=tol)
    assert metrics["rewards/rejected"][0] == pytest.approx(got.rejected_rewards.mean().item(), abs=tol)
    assert metrics["rewards/accuracies"][0] == (got.chosen_rewards > got.rejected_rewards).float().mean().item()
    assert not got.chosen_rewards.requires_grad


def test_ipo_on_average_logprobs_matches_trl(pairs):
    want, _ = _trl_dpo(pairs, "ipo", 0.1)
    with torch.no_grad():
        policy_chosen, policy_rejected = _logps(pairs.policy, pairs.batch, average=True).chunk(2)
        ref_chosen, ref_rejected = _logps(pairs.reference, pairs.batch, average=True).chunk(2)
    got = A.ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-6)


def test_kto_matches_trl(pairs):
    from trl import KTOTrainer

    # KTO is unpaired: the 12 completions, desirable or not, in an interleaved order, and for the KL estimate each
    # completion again behind the next row's prompt (the mismatched pairs trl's collator builds).
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    completions = [d["chosen"] for d in pairs.data] + [d["rejected"] for d in pairs.data]
    prompts = pairs.prompts * 2
    rows = _rows(pairs.tokenizer, [prompts[i] for i in order], [completions[i] for i in order])
    kl_rows = _rows(pairs.tokenizer, [prompts[i] for i in order], [completions[i] for i in order[1:] + order[:1]])
    label = torch.tensor([i < pairs.n for i in order])
    inputs = {**rows, "label": label, **{f"KL_{k}": v for k, v in kl_rows.items()}}
    # Roles swapped (the course model as the policy, the nudged copy as the reference) so that the KL estimate is
    # positive: with it negative, trl and we both clamp it to 0 and the test would not see the reference point.
    policy, reference = pairs.reference, pairs.policy
    fused = _fused(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = _bare(KTOTrainer, model=fused, ref_model=_fused(reference), beta=0.1, loss_type="kto",
                    calculate_KL=True, precompute_ref_logps=False, desirable_weight=1.0, undesirable_weight=1.5)
    with torch.no_grad():
        want = KTOTrainer._compute_loss(trainer, fused, inputs, return_outputs=False)
        policy_logps, ref_logps = _logps(policy, rows), _logps(reference, rows)
        policy_kl, ref_kl = _logps(policy, kl_rows), _logps(reference, kl_rows)
    got = A.kto_loss(policy_logps[label], policy_logps[~label], ref_logps[label], ref_logps[~label], policy_kl, ref_kl,
                     beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-6)
    z0 = A.kto_kl(policy_kl, ref_kl)
    tol = 1e-6 * torch.cat([policy_kl, ref_kl]).abs().max().item()  # a difference of float32 sums, as for DPO
    assert trainer._metrics["eval"]["kl"][0] == pytest.approx(z0.item(), abs=tol)
    assert z0 > 0  # the reference point is in play here, not clamped away


def test_orpo_matches_trl(pairs):
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = ({k: v.chunk(2)[i] for k, v in pairs.batch.items()} for i in (0, 1))
    batch = {}
    for name, rows in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{name}_input_ids"] = rows["input_ids"]
        batch[f"{name}_attention_mask"] = rows["attention_mask"]
        batch[f"{name}_labels"] = rows["input_ids"].masked_fill(rows["completion_mask"] == 0, -100)
    trainer = _bare(ORPOTrainer, beta=0.1, is_encoder_decoder=False, padding_value=pairs.tokenizer.pad_token_id)
    with torch.no_grad():
        want, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, pairs.policy, batch)
        policy_chosen, policy_rejected = _logps(pairs.policy, chosen, True), _logps(pairs.policy, rejected, True)
        # trl's SFT term: token-mean cross-entropy over the chosen prompt and completion (the model's own loss)
        labels = chosen["input_ids"].masked_fill(chosen["attention_mask"] == 0, -100)
        nll = pairs.policy(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"], labels=labels).loss
    got = A.orpo_loss(policy_chosen, policy_rejected, beta=0.1, nll=nll)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(got.chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["nll_loss"] == pytest.approx(nll.item(), abs=1e-6)
    default = A.orpo_loss(policy_chosen, policy_rejected, beta=0.1)  # the paper's SFT term: completion tokens only
    assert default.loss - got.loss == pytest.approx((-policy_chosen.mean() - nll).item(), abs=1e-5)


# ------------------------------------------------------------ loss properties --

def test_dpo_at_the_reference_is_log_2(pairs):
    x = torch.tensor([-3.0, -10.0, -0.5])
    y = torch.tensor([-4.0, -2.0, -7.5])
    for beta in (0.01, 0.1, 1.0, 5):
        assert A.dpo_loss(x, y, x, y, beta).loss.item() == pytest.approx(math.log(2), abs=1e-7)
    with torch.no_grad():  # and on real sequences: the course model as its own reference
        chosen, rejected = _logps(pairs.reference, pairs.batch).chunk(2)
    assert A.dpo_loss(chosen, rejected, chosen, rejected).loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    policy_chosen = torch.tensor([-5.0, -8.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-6.0, -4.0, -9.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-5.5, -7.0, -3.0]), torch.tensor([-5.0, -4.5, -8.0])
    A.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1).loss.backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent: chosen up, rejected down
    # and the weight is sigmoid(-margin): pairs the model already ranks well get less push
    margin = 0.1 * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).detach()
    torch.testing.assert_close(-policy_chosen.grad, 0.1 * torch.sigmoid(-margin) / 3)


def test_ipo_is_minimal_at_its_target_margin():
    beta = 0.25
    zero = torch.zeros(2)
    at_target = A.ipo_loss(torch.full((2,), 1 / (2 * beta)), zero, zero, zero, beta)
    assert at_target.loss.item() == 0
    assert A.ipo_loss(torch.full((2,), 5.0), zero, zero, zero, beta).loss > 0  # past the target costs too


def test_kto_reference_point_is_clamped_and_detached():
    policy_kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert A.kto_kl(policy_kl, torch.tensor([0.0, 0.0])).item() == 0  # a negative estimate counts as 0
    z0 = A.kto_kl(policy_kl, torch.tensor([-3.0, -3.0]))
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad
    only_desirable = A.kto_loss(torch.tensor([-1.0]), torch.tensor([]), torch.tensor([-1.0]), torch.tensor([]),
                                policy_kl, torch.tensor([-3.0, -3.0]), beta=1.0)
    assert only_desirable.loss.item() == pytest.approx(1 - 1 / (1 + math.exp(1.5)))


def test_bradley_terry_is_log_2_for_equal_rewards_and_falls_with_the_gap():
    r = torch.tensor([0.3, -1.0])
    assert A.bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    assert A.bradley_terry_loss(r + 2, r) < A.bradley_terry_loss(r + 1, r) < math.log(2)


# ----------------------------------------------------------------------- PPO --

def _gae_loop(rewards, values, gamma, lam):
    """GAE the way trl's old PPOTrainer wrote it: one backward pass over the steps."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    # deltas: 1 + 0.9*1 - 0.5 = 1.4, 0 + 0 - 1 = -1, 2 + 0 - 0 = 2; gamma*lam = 0.45, summed from the end
    advantages, returns = A.gae(rewards, values, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.355, -0.1, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[1.855, 0.9, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)])
def test_gae_matches_the_loop(gamma, lam):
    g = torch.Generator().manual_seed(4)
    rewards, values = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    for got, want in zip(A.gae(rewards, values, gamma, lam), _gae_loop(rewards, values, gamma, lam)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if (gamma, lam) == (1.0, 1.0):  # lam = 1: Monte-Carlo return-to-go minus the value
        returns_to_go = rewards.flip(1).cumsum(1).flip(1)
        torch.testing.assert_close(A.gae(rewards, values, 1.0, 1.0)[0], returns_to_go - values)


def test_ppo_losses_and_kl_rewards_by_hand():
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    old = torch.log(torch.tensor([[0.2, 0.5, 0.1]]))
    loss, clipped = A.ppo_policy_loss(old, old, advantages)
    assert loss.item() == pytest.approx(-advantages.mean().item()) and clipped.item() == 0
    # ratio 2 on a positive advantage: the gain is capped at 1 + eps; masked tokens do not count
    new = old + torch.log(torch.tensor([[2.0, 1.0, 1.0]]))
    loss, clipped = A.ppo_policy_loss(new, old, advantages, mask=torch.tensor([[1, 0, 0]]))
    assert loss.item() == pytest.approx(-1.2) and clipped.item() == 1
    value_loss = A.ppo_value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert value_loss.item() == pytest.approx(0.5 * ((0.8 ** 2) + 1.0) / 2)  # V moved 1 but clipped to 0.2
    rewards, kl = A.kl_penalized_rewards(torch.tensor([3.0]), torch.tensor([[-1.0, -2.0, -0.5]]),
                                         torch.tensor([[-1.5, -1.0, -0.5]]), torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1 + 3.0, 0.0]]))  # the score lands on the last token


def test_sample_stops_at_eos_and_masks_the_rest():
    model = _tiny_llama()
    prompts = torch.randint(1, 16, (64, 3), generator=torch.Generator().manual_seed(5))
    ids, mask = A.sample(model, prompts, max_new_tokens=12, eos_token_id=3, pad_token_id=0,
                         generator=torch.Generator().manual_seed(6))
    assert ids.shape == mask.shape == (64, 12) and mask[:, 0].all()
    for row, keep in zip(ids, mask):
        n = int(keep.sum())
        assert keep[:n].all() and not keep[n:].any() and (row[n:] == 0).all()
        assert (3 not in row[:n - 1].tolist()) and (n == 12 or row[n - 1] == 3)



def test_sample_with_a_kv_cache_draws_what_the_full_recompute_draws():
    """cache=True (GRPO's sampler) gives the same tokens from the same generator, left padding included, and
    pads the positions after every row has ended."""
    model = _tiny_llama()
    prompts = torch.randint(1, 16, (32, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompts)
    mask[::2, :2] = 0  # every other row left-padded by two
    draws = {cache: A.sample(model, prompts, mask, max_new_tokens=10, eos_token_id=3, pad_token_id=0,
                             generator=torch.Generator().manual_seed(6), cache=cache) for cache in (False, True)}
    assert torch.equal(draws[False][0], draws[True][0]) and torch.equal(draws[False][1], draws[True][1])
    # a single row that ends at once: the cached sampler stops drawing and pads to max_new_tokens
    ids, keep = A.sample(model, prompts[:1], max_new_tokens=200, eos_token_id=int(draws[True][0][0, 0]),
                         generator=torch.Generator().manual_seed(6), cache=True)
    assert ids.shape == keep.shape == (1, 200) and keep[0, 0] and not keep[0, 1:].any()
    with pytest.raises(TypeError, match="cache"):
        A.sample(model, prompts, cache="yes")

TARGET = 7


def _target_fraction(prompt_ids, completion_ids, completion_mask):
    return ((completion_ids == TARGET) & completion_mask).float().sum(-1) / completion_mask.sum(-1)


def _ppo_run(kl_coef, steps=40):
    model = _tiny_llama(vocab=16, seed=0)
    ppo = A.PPO(model, _target_fraction, lr=3e-3, kl_coef=kl_coef, max_new_tokens=8, minibatch_size=16, epochs=4,
                seed=0)
    g = torch.Generator().manual_seed(1)
    history = [ppo.step(torch.randint(1, 16, (32, 4), generator=g)) for _ in range(steps)]
    return ppo, history


def _exact_kl(ppo, prompts):
    """KL(policy || reference) summed over the sampled completion tokens, from the full next-token distributions."""
    with torch.no_grad():
        completion, mask = A.sample(ppo.model, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(7))
        ids = torch.cat([prompts, completion], 1)
        logp = torch.log_softmax(ppo.model(input_ids=ids).logits[:, 3:-1], -1)
        logq = torch.log_softmax(ppo.ref_model(input_ids=ids).logits[:, 3:-1], -1)
        return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(-1).mean().item()


def test_ppo_raises_the_reward():
    ppo, history = _ppo_run(kl_coef=0.02)
    start = sum(h["score"] for h in history[:3]) / 3
    end = sum(h["score"] for h in history[-3:]) / 3
    assert start < 0.15  # about 1/16: the untrained model picks the target token by chance
    assert end > 0.6, [round(h["score"], 3) for h in history]
    kl = _exact_kl(ppo, torch.randint(1, 16, (32, 4), generator=torch.Generator().manual_seed(8)))
    assert math.isfinite(history[-1]["kl"]) and history[-1]["kl"] > 0 and 0 < kl < math.inf
    assert all(math.isfinite(h["value_loss"]) and math.isfinite(h["policy_loss"]) for h in history)


def test_ppo_kl_penalty_holds_the_policy_at_the_reference():
    ppo, history = _ppo_run(kl_coef=1.0, steps=20)
    assert sum(h["score"] for h in history[-3:]) / 3 < 0.2
    assert _exact_kl(ppo, torch.randint(1, 16, (32, 4), generator=torch.Generator().manual_seed(8))) < 0.5


def test_ppo_step_on_the_course_model_with_left_padded_prompts_and_eos(course_model):
    """What the lab does: course prompts of different lengths, stop at EOS, score the text with gold_reward."""
    from llmlab.data import gold_reward, instruction_tasks

    model, tokenizer = course_model
    prompts = [t.prompt for t in instruction_tasks(4, seed=5)]
    encoded = [tokenizer(f"Question: {p} Answer:", add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    prompt_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    prompt_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])

    def reward(prompt_ids, completion_ids, completion_mask):
        texts = tokenizer.batch_decode(completion_ids * completion_mask, skip_special_tokens=True)
        return torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)])

    ppo = A.PPO(copy.deepcopy(model), reward, lr=1e-4, max_new_tokens=6, minibatch_size=2, epochs=1,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    stats = ppo.step(prompt_ids, prompt_mask)
    assert all(math.isfinite(v) for v in stats.values())
    moved = any(not torch.equal(p, q) for p, q in zip(ppo.model.parameters(), ppo.ref_model.parameters()))
    assert moved and not any(p.requires_grad for p in ppo.ref_model.parameters())


# -------------------------------------------------------------------- errors --

_x = torch.tensor([-1.0, -2.0])


@pytest.mark.parametrize("call,error", [
    (lambda: A.dpo_loss(_x, _x, _x, _x, beta=0), ValueError),
    (lambda: A.dpo_loss(_x, _x, _x, _x, beta=-0.1), ValueError),
    (lambda: A.dpo_loss(_x, _x, _x, _x, beta="0.1"), TypeError),
    (lambda: A.dpo_loss(_x, _x, _x, _x, beta=True), TypeError),
    (lambda: A.dpo_loss(_x, _x, _x, _x, beta=math.nan), ValueError),
    (lambda: A.dpo_loss(_x, _x[:1], _x, _x), ValueError),
    (lambda: A.dpo_loss(_x, _x, _x, [-1.0, -2.0]), TypeError),
    (lambda: A.dpo_loss(_x[:0], _x[:0], _x[:0], _x[:0]), ValueError),
    (lambda: A.dpo_loss(_x[None], _x[None], _x[None], _x[None]), ValueError),
    (lambda: A.dpo_loss(_x.long(), _x, _x, _x), ValueError),
    (lambda: A.ipo_loss(_x, _x, _x, _x, beta=0), ValueError),
    (lambda: A.ipo_loss(_x, _x, _x[:1], _x), ValueError),
    (lambda: A.bradley_terry_loss(_x, _x[:1]), ValueError),
    (lambda: A.bradley_terry_loss(_x[:0], _x[:0]), ValueError),
    (lambda: A.bradley_terry_loss(_x, 1.0), TypeError),
    (lambda: A.bradley_terry_loss(_x, _x, margin=_x[:1]), ValueError),
    (lambda: A.kto_loss(_x[:0], _x[:0], _x[:0], _x[:0], _x, _x), ValueError),
    (lambda: A.kto_loss(_x, _x, _x, _x, _x, _x[:1]), ValueError),
    (lambda: A.kto_loss(_x, _x, _x, _x, _x, _x, beta=0.0), ValueError),
    (lambda: A.kto_loss(_x, _x, _x, _x, _x, _x, undesirable_weight=-1), ValueError),
    (lambda: A.kto_loss(_x, _x, _x, _x, _x, None), TypeError),
    (lambda: A.orpo_loss(_x, -_x), ValueError),
    (lambda: A.orpo_loss(_x, _x, beta=0), ValueError),
    (lambda: A.orpo_loss(_x, _x, nll=_x), ValueError),
    (lambda: A.orpo_loss(_x, _x[:1]), ValueError),
    (lambda: A.gae(_x, _x, gamma=1.5), ValueError),
    (lambda: A.gae(_x, _x, lam=-0.1), ValueError),
    (lambda: A.gae(_x, _x[:1]), ValueError),
    (lambda: A.gae([1.0], _x), TypeError),
    (lambda: A.ppo_policy_loss(_x, _x, _x, clip_range=0), ValueError),
    (lambda: A.ppo_policy_loss(_x, _x, _x[:1]), ValueError),
    (lambda: A.ppo_value_loss(_x, _x, _x, mask=torch.tensor([1, 2])), ValueError),
    (lambda: A.kl_penalized_rewards(_x[:1], _x[None], _x[None], torch.tensor([[0, 1]])), ValueError),
    (lambda: A.PPO("gpt2", _target_fraction), TypeError),
    (lambda: A.PPO(_tiny_llama(), "reward"), TypeError),
    (lambda: A.PPO(_tiny_llama(), _target_fraction, lr=0), ValueError),
    (lambda: A.PPO(_tiny_llama(), _target_fraction, epochs=0), ValueError),
    (lambda: A.PPO(_tiny_llama(), _target_fraction, minibatch_size=2.0), TypeError),
    (lambda: A.ValueHead(0), ValueError),
    (lambda: A.sample(_tiny_llama(), torch.ones(2, 3)), ValueError),
    (lambda: A.sample(_tiny_llama(), torch.ones(2, 3, dtype=torch.long), max_new_tokens=0), ValueError),
])
def test_bad_inputs_raise_one_clear_error(call, error):
    with pytest.raises(error):
        call()


def test_sequence_logprobs_rejects_bad_masks():
    model = _tiny_llama()
    ids = torch.ones(2, 4, dtype=torch.long)
    ones, labels = torch.ones_like(ids), torch.tensor([[0, 1, 1, 1]] * 2)
    with pytest.raises(TypeError):
        A.sequence_logprobs("model", ids, ones, labels)
    with pytest.raises(TypeError):
        A.sequence_logprobs(model, ids.tolist(), ones, labels)
    with pytest.raises(ValueError):
        A.sequence_logprobs(model, ids.float(), ones, labels)
    with pytest.raises(ValueError, match="first token"):
        A.sequence_logprobs(model, ids, ones, torch.ones_like(ids))
    with pytest.raises(ValueError, match="padding"):
        A.sequence_logprobs(model, ids, torch.tensor([[1, 1, 1, 0]] * 2), labels)
    with pytest.raises(ValueError, match="at least one"):
        A.sequence_logprobs(model, ids, ones, torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError):
        A.sequence_logprobs(model, ids, ones[:, :3], labels)
    with pytest.raises(ValueError):
        A.sequence_logprobs(model, ids, ones * 2, labels)


def test_frozen_copy_does_not_run_the_original_after_a_trainer_patched_forward():
    """trl/accelerate replace ``model.forward`` with a closure over the model; a reference copy must not keep it."""
    from llmlab.align import frozen_copy
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    original = model.forward

    def forward(*args, **kwargs):  # accelerate wraps forward like this; deepcopy keeps functions as they are
        return original(*args, **kwargs)

    model.forward = forward
    ids = torch.tensor([[1, 2, 3]])
    naive, ref = copy.deepcopy(model), frozen_copy(model)
    with torch.no_grad():
        for m in (naive, ref):
            for p in m.parameters():
                p.add_(1.0)
        assert torch.equal(naive(ids).logits, model(ids).logits)  # the trap: deepcopy runs the original
        assert not torch.allclose(ref(ids).logits, model(ids).logits)
