"""Alignment from scratch: the preference losses (reward model, DPO, IPO, KTO, ORPO) and a compact PPO for LMs.

Chapter: Alignment (RLHF vs DPO). Every loss here consumes per-sequence log-probabilities, the one number
``sequence_logprobs`` computes from a model, and the tests check each against trl 1.16's own implementation on
the same batch. trl (since 1.13) no longer ships a PPO trainer, so the RLHF side is written out in full at the
end: a value head, GAE, the clipped policy and value losses, a per-token KL penalty to a frozen reference model,
and a ``PPO`` class that ties them together.

Conventions. Log-probabilities are computed in float32. A batch of preference pairs is given as 1-D tensors of
shape ``(batch,)``: policy and reference log-probabilities of the chosen and of the rejected completions.
``beta`` is the strength of the pull towards the reference model (DPO, IPO, KTO) or the weight of the
odds-ratio term (ORPO). The preference losses return a ``PreferenceLoss``: the batch-mean loss to call
``backward()`` on, and the implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))``, detached, for logging
(reward accuracy is ``(chosen_rewards > rejected_rewards).float().mean()``).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ checks --

def _tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _batch(allow_empty=False, **named):
    """Check 1-D float tensors of one shape, non-empty unless ``allow_empty``; return their length."""
    for name, x in named.items():
        if _tensor(x, name).dim() != 1:
            raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(x.shape)}")
    if len({x.shape for x in named.values()}) > 1:
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in named.items())
        raise ValueError(f"shapes must match: {shapes}")
    n = len(next(iter(named.values())))
    if n == 0 and not allow_empty:
        raise ValueError(f"empty batch: {', '.join(named)} have no elements")
    return n


def _number(v, name, low=0.0, high=math.inf, low_open=True):
    """A finite real number in ``(low, high]`` (or ``[low, high]`` when not ``low_open``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
        where = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name} must be in {where}, got {v}")
    return float(v)


def _count(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _ids(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D integer tensor (batch, seq), got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    return x


def _mask(mask, like, name):
    """A 0/1 (or bool) tensor of ``like``'s shape, returned as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be 0/1 with shape {tuple(like.shape)}, got shape {tuple(mask.shape)}")
    return mask.bool()


# ------------------------------------------------------- log-probabilities --

def _forward(model, input_ids, attention_mask, hidden_states=False):
    """One forward pass; positions count only attended tokens, so left-padded rows are read correctly too."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                 output_hidden_states=hidden_states, use_cache=False)


def _token_logprobs(logits, targets):
    """log p(target) at each position: log_softmax of the logits (float32), gathered at the targets."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """``log pi(completion | prompt)``: the sum of the log-probabilities of the tokens ``labels_mask`` marks.

    Token ``t`` is scored by the logits at position ``t - 1``, so the first token cannot be a label. Returns
    float32 of shape ``(batch,)``, with gradients when the model has them (wrap a reference model in
    ``torch.no_grad()``). ``average=True`` divides by the number of completion tokens: the length-normalized
    log-probability that ORPO, and trl's IPO, use.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable torch model, got {type(model).__name__}")
    _ids(input_ids, "input_ids")
    attention_mask = _mask(attention_mask, input_ids, "attention_mask")
    labels_mask = _mask(labels_mask, input_ids, "labels_mask")
    if labels_mask[:, 0].any():
        raise ValueError("labels_mask marks the first token, which has no position before it to predict it")
    if (labels_mask & ~attention_mask).any():
        raise ValueError("labels_mask marks tokens that attention_mask hides (padding)")
    if not labels_mask.any(dim=1).all():
        raise ValueError("every row needs at least one completion token in labels_mask")
    logits = _forward(model, input_ids, attention_mask).logits[:, :-1]  # position t-1 predicts token t
    mask = labels_mask[:, 1:]
    per_token = _token_logprobs(logits, input_ids[:, 1:]) * mask
    total = per_token.sum(-1)
    return total / mask.sum(-1) if average else total


# --------------------------------------------------------- preference losses --

class PreferenceLoss(NamedTuple):
    """``loss``: 0-D, the batch mean. ``chosen_rewards`` / ``rejected_rewards``: implicit rewards per sequence,
    detached (for DPO, IPO and KTO ``beta * (policy - reference)`` log-probs; for ORPO ``beta * policy``)."""
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """The reward model's loss: ``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over pairs.

    The negative log-likelihood of the human label under the Bradley-Terry model
    ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``. ``margin`` (optional, per pair) asks for a gap
    at least that large, as trl's ``RewardTrainer`` does when the data has a ``margin`` column.
    """
    named = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    _batch(**named, **({} if margin is None else {"margin": margin}))
    delta = chosen_rewards - rejected_rewards - (0 if margin is None else margin)
    return -F.logsigmoid(delta).mean()


def _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    _batch(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
           ref_rejected=ref_rejected)
    _number(beta, "beta")
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """DPO: ``-log sigmoid(beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)])``.

    The reward model's Bradley-Terry loss with the reward replaced by the policy's own implicit reward
    ``beta * log(pi / pi_ref)``: no reward model and no sampling. At ``policy == reference`` the loss is log 2.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """IPO: ``(h - 1 / (2 beta))^2`` with ``h`` the DPO margin of log-ratios, averaged over pairs.

    A squared loss aims ``h`` at a finite target, where DPO's logistic loss keeps pushing it up even when the
    data are deterministic. Pass length-averaged log-probs (``sequence_logprobs(..., average=True)``) to get
    trl's ``loss_type="ipo"``, which normalizes by the number of completion tokens; sums give the paper's form.
    """
    chosen, rejected = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = ((chosen - rejected - 1 / (2 * beta)) ** 2).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: an estimate of ``KL(pi || pi_ref)``, the batch mean of
    ``log pi - log pi_ref`` on mismatched (prompt, completion) pairs, clamped at 0 and detached (as in trl)."""
    _batch(policy_kl=policy_kl, ref_kl=ref_kl)
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, policy_kl: torch.Tensor, ref_kl: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO: unpaired thumbs-up / thumbs-down data, scored against the reference point ``z0 = kto_kl(...)``.

    Desirable: ``1 - sigmoid(beta * (logratio - z0))``; undesirable: ``1 - sigmoid(beta * (z0 - logratio))``,
    weighted, then averaged over all examples. ``chosen`` and ``rejected`` may differ in size (either may be
    empty, not both); ``policy_kl`` / ``ref_kl`` are log-probs of completions paired with other prompts.
    """
    n_chosen = _batch(True, policy_chosen=policy_chosen, ref_chosen=ref_chosen)
    n_rejected = _batch(True, policy_rejected=policy_rejected, ref_rejected=ref_rejected)
    if n_chosen + n_rejected == 0:
        raise ValueError("empty batch: no desirable and no undesirable examples")
    z0 = kto_kl(policy_kl, ref_kl)
    beta = _number(beta, "beta")
    weights = _number(desirable_weight, "desirable_weight"), _number(undesirable_weight, "undesirable_weight")
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = torch.cat([weights[0] * (1 - torch.sigmoid(beta * (chosen - z0))),
                        weights[1] * (1 - torch.sigmoid(beta * (z0 - rejected)))])
    return PreferenceLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float = 0.1,
              nll: torch.Tensor | None = None) -> PreferenceLoss:
    """ORPO: supervised fine-tuning on the chosen completions plus an odds-ratio penalty; no reference model.

    ``policy_*`` are length-averaged log-probs (``sequence_logprobs(..., average=True)``), so ``p = exp(.)`` is
    a per-token probability with odds ``p / (1 - p)``. Loss: ``nll - beta * mean(log sigmoid(log odds(chosen)
    - log odds(rejected)))``. ``nll`` defaults to ``-policy_chosen.mean()``; trl uses the token-mean
    cross-entropy over the chosen prompt and completion, so pass that to match it. Rewards: ``beta * policy_*``.
    """
    _batch(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    beta = _number(beta, "beta")
    if (policy_chosen > 0).any() or (policy_rejected > 0).any():
        raise ValueError("average log-probabilities cannot be positive")
    if nll is not None and _tensor(nll, "nll").dim() != 0:
        raise ValueError(f"nll must be a 0-D tensor (the SFT loss), got shape {tuple(nll.shape)}")
    chosen, rejected = policy_chosen.float(), policy_rejected.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    nll = -chosen.mean() if nll is None else nll
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


# ---------------------------------------------------------------------- PPO --

class ValueHead(nn.Module):
    """``V(s)``: one number per position, a linear map of the policy's last hidden state. Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(_count(hidden_size, "hidden_size"), 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation along the last dim; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last step is 0: the episode ends), and
    ``A_t = sum_k (gamma * lam)^k * delta_{t+k}``; ``returns = A + V`` are the value head's targets.
    ``lam = 1`` gives Monte-Carlo returns minus V, ``lam = 0`` one-step TD errors.
    """
    _tensor(rewards, "rewards")
    _tensor(values, "values")
    if rewards.shape != values.shape or rewards.dim() == 0 or rewards.numel() == 0:
        raise ValueError(f"rewards and values must be non-empty with one shape, got {tuple(rewards.shape)} "
                         f"and {tuple(values.shape)}")
    gamma, lam = _number(gamma, "gamma", 0, 1, False), _number(lam, "lam", 0, 1, False)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = rewards + gamma * next_values - values
    steps = torch.arange(rewards.shape[-1], device=rewards.device)
    k = steps[None, :] - steps[:, None]  # k[t, s] = s - t: how far ahead delta_s lies from step t
    weights = torch.where(k >= 0, torch.pow(gamma * lam, k.clamp(min=0).to(rewards.dtype)), 0.0)
    advantages = deltas @ weights.T  # A_t = sum_s weights[t, s] * delta_s
    return advantages, advantages + values


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _whiten(x, mask):
    """Shift and scale to mean 0, std 1 over the kept tokens (0 elsewhere): a scale-free signal every batch."""
    mean = _masked_mean(x, mask)
    std = _masked_mean((x - mean) ** 2, mask).sqrt()
    return (x - mean) / (std + 1e-8) * mask


def _ppo_inputs(mask, **named):
    first = next(iter(named.values()))
    for name, x in named.items():
        if _tensor(x, name).shape != first.shape or x.numel() == 0:
            raise ValueError(f"{', '.join(named)} must be non-empty with one shape, got {name} {tuple(x.shape)}")
    return torch.ones_like(first, dtype=torch.bool) if mask is None else _mask(mask, first, "mask")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor | None = None, clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token: ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` with
    ``r = pi / pi_old``, averaged over the tokens ``mask`` keeps. Returns ``(loss, clip_fraction)``: a step
    gains nothing from pushing ``r`` past the clip range, which keeps each update close to the rollout policy."""
    mask = _ppo_inputs(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    eps = _number(clip_range, "clip_range")
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    loss = _masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, _masked_mean((clipped > unclipped).float(), mask).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor | None = None, clip_range: float = 0.2) -> torch.Tensor:
    """The value head's clipped loss: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` averaged over kept tokens, with
    ``V_clip = V_old + clip(V - V_old, -eps, eps)`` (trl's old PPOTrainer, from OpenAI's baselines)."""
    mask = _ppo_inputs(mask, values=values, old_values=old_values, returns=returns)
    eps = _number(clip_range, "clip_range")
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * _masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards as InstructGPT and trl's old PPOTrainer built them: ``-kl_coef * (log pi - log pi_ref)``
    at every completion token, plus the sequence's score on its last token. ``mask`` marks a prefix of each row
    (the completion up to and including EOS). Returns ``(rewards, kl)``, both per token, 0 outside the mask."""
    _batch(scores=scores)
    mask = _ppo_inputs(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.dim() != 2 or len(scores) != len(logprobs) or not mask[:, 0].all():
        raise ValueError(f"need scores (batch,) and (batch, T) log-probs whose mask keeps each row's first token; "
                         f"got {tuple(scores.shape)} and {tuple(logprobs.shape)}")
    kl_coef = _number(kl_coef, "kl_coef", low_open=False)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(-1) - 1
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
           eos_token_id: int | None = None, pad_token_id: int = 0,
           generator: torch.Generator | None = None, cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions token by token at temperature 1, the distribution PPO's ratio assumes.

    Returns ``(completion_ids, completion_mask)``, each ``(batch, max_new_tokens)``; after a row's EOS (which
    counts), tokens are ``pad_token_id`` and masked out. ``cache=False`` recomputes the whole sequence at each
    token (short and slow, fine for small models: PPO's default). ``cache=True`` keeps the keys and values (a
    KV cache) and stops drawing once every row has ended: the same distribution, logits equal to float
    rounding, and each token costs one position instead of the whole sequence (GRPO's long traces).
    """
    _ids(prompt_ids, "prompt_ids")
    attn = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else _mask(
        prompt_mask, prompt_ids, "prompt_mask")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
    n_new = _count(max_new_tokens, "max_new_tokens")
    ids, tokens, alive = prompt_ids, [], []
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    past = None
    for _ in range(n_new):
        if not cache:
            logits = _forward(model, ids, attn).logits[:, -1].float()
        else:
            positions = attn.long().cumsum(-1) - 1
            step_ids = ids if past is None else ids[:, -1:]
            out = model(input_ids=step_ids, attention_mask=attn.long(), past_key_values=past, use_cache=True,
                        position_ids=positions.clamp(min=0)[:, -step_ids.shape[1]:])
            past, logits = out.past_key_values, out.logits[:, -1].float()
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        token = torch.where(done, pad_token_id, token)
        tokens.append(token)
        alive.append(~done)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        ids = torch.cat([ids, token[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(done[:, None])], 1)
        if cache and bool(done.all()):
            break
    while len(tokens) < n_new:  # every row ended early (cache=True): padding, masked out
        tokens.append(torch.full_like(done, pad_token_id, dtype=prompt_ids.dtype))
        alive.append(torch.zeros_like(done))
    return torch.stack(tokens, 1), torch.stack(alive, 1)


def frozen_copy(model):
    """A deep copy of ``model`` for a reference model. A trl/accelerate ``Trainer`` replaces ``model.forward`` with
    a closure over the original model; ``copy.deepcopy`` keeps that closure, so the copy would still run the
    original's weights. Dropping the instance attribute restores the class's ``forward`` on the copy."""
    ref = copy.deepcopy(model)
    ref.__dict__.pop("forward", None)
    return ref


class PPO:
    """RLHF with PPO on a causal LM: ``step(prompt_ids)`` does rollout -> rewards -> advantages -> updates.

    ``reward_fn(prompt_ids, completion_ids, completion_mask)`` returns one score per row. The reference model is a
    frozen copy of ``model`` as it is now (or ``ref_model``); the value head reads the policy's last hidden state
    and trains with it. Defaults follow trl's old PPOTrainer, except the fixed ``kl_coef`` (no adaptive KL).
    """

    def __init__(self, model, reward_fn: Callable, *, ref_model=None, lr: float = 1e-5, kl_coef: float = 0.05,
                 clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0,
                 lam: float = 0.95, epochs: int = 4, minibatch_size: int = 8, max_new_tokens: int = 16,
                 eos_token_id: int | None = None, pad_token_id: int = 0, max_grad_norm: float = 1.0, seed: int = 0):
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        self.model, self.reward_fn = model, reward_fn
        self.ref_model = (frozen_copy(model) if ref_model is None else ref_model).eval().requires_grad_(False)
        self.kl_coef, self.vf_coef = _number(kl_coef, "kl_coef", low_open=False), _number(vf_coef, "vf_coef")
        self.clip_range = _number(clip_range, "clip_range")
        self.clip_range_value = _number(clip_range_value, "clip_range_value")
        self.gamma, self.lam = _number(gamma, "gamma", 0, 1, False), _number(lam, "lam", 0, 1, False)
        self.epochs, self.minibatch_size = _count(epochs, "epochs"), _count(minibatch_size, "minibatch_size")
        self.max_new_tokens = _count(max_new_tokens, "max_new_tokens")
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.max_grad_norm = _number(max_grad_norm, "max_grad_norm")
        device = next(model.parameters()).device
        self.value_head = ValueHead(model.config.get_text_config().hidden_size).to(device)
        self.params = [p for p in [*model.parameters(), *self.value_head.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=_number(lr, "lr"))
        self.generator = torch.Generator(device).manual_seed(seed)

    def evaluate(self, model, prompt_ids, prompt_mask, completion_ids, values=False):
        """Per-token log-probs of the completion under ``model`` (and the value head's ``V`` if ``values``)."""
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attn = torch.cat([prompt_mask, torch.ones_like(completion_ids, dtype=torch.bool)], 1)
        out = _forward(model, ids, attn, hidden_states=values)
        start = prompt_ids.shape[1] - 1  # the last prompt position predicts the first completion token
        logprobs = _token_logprobs(out.logits[:, start:-1], completion_ids)
        return logprobs, (self.value_head(out.hidden_states[-1][:, start:-1]) if values else None)

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> dict:
        """Sample, score, penalize the KL per token, and estimate advantages: everything the updates need."""
        _ids(prompt_ids, "prompt_ids")
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else _mask(
            prompt_mask, prompt_ids, "prompt_mask")
        completion, mask = sample(self.model, prompt_ids, prompt_mask, self.max_new_tokens, self.eos_token_id,
                                  self.pad_token_id, self.generator)
        logprobs, values = self.evaluate(self.model, prompt_ids, prompt_mask, completion, values=True)
        ref_logprobs, _ = self.evaluate(self.ref_model, prompt_ids, prompt_mask, completion)
        scores = self.reward_fn(prompt_ids, completion, mask)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(prompt_ids),):
            raise ValueError(f"reward_fn must return a tensor of shape ({len(prompt_ids)},), got {scores!r}")
        rewards, kl = kl_penalized_rewards(scores.float(), logprobs, ref_logprobs, mask, self.kl_coef)
        values = values * mask
        advantages, returns = gae(rewards, values, self.gamma, self.lam)
        advantages = _whiten(advantages, mask)
        return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion=completion, mask=mask,
                    logprobs=logprobs, values=values, returns=returns, advantages=advantages, scores=scores,
                    kl=kl.sum(-1))

    def step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> dict:
        """One PPO iteration on a batch of prompts; returns the mean score and KL and the last losses."""
        batch = self.rollout(prompt_ids, prompt_mask)
        for _ in range(self.epochs):
            order = torch.randperm(len(prompt_ids), generator=self.generator, device=self.generator.device)
            for idx in order.split(self.minibatch_size):
                mb = {k: v[idx] for k, v in batch.items()}
                logprobs, values = self.evaluate(self.model, mb["prompt_ids"], mb["prompt_mask"], mb["completion"],
                                                 values=True)
                policy_loss, clip_fraction = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"],
                                                             mb["mask"], self.clip_range)
                value_loss = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], self.clip_range_value)
                self.optimizer.zero_grad()
                (policy_loss + self.vf_coef * value_loss).backward()
                nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
        return {"score": batch["scores"].float().mean().item(), "kl": batch["kl"].mean().item(),
                "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                "clip_fraction": clip_fraction.item()}
