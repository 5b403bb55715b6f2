"""Reasoning: test-time compute estimators and GRPO from scratch.

Chapter: Reasoning (test-time compute and RL with verifiable rewards). Two halves:

* spending compute at test time - ``pass_at_k`` (the unbiased estimator of Chen et al.
  2021) and ``mean_pass_at_k`` over many problems with a bootstrap interval,
  ``majority_vote`` (self-consistency, Wang et al. 2023) and ``best_of_n``;
* spending it at training time - GRPO (Shao et al. 2024) written out:
  ``group_advantages`` and ``zero_std_share``, the per-token ``completion_logps`` of a
  model, the clipped objective ``grpo_loss`` with its four aggregations (sequence mean
  "grpo", "bnpo", Dr. GRPO's constant normaliser, DAPO's token-level mean) and the
  health metrics trl logs, and Schulman's KL estimators ``kl_estimators``; and
  ``GRPO``, the loop that ties them together (sample a group per prompt with
  ``llmlab.align.sample``, score with any verifier, update, report the health signals).

The tests check every GRPO piece against trl 1.16's ``GRPOTrainer`` on the same batch
(losses and metrics to 1e-6), and pass@k against exact combinatorics; the loop is
checked against those pieces recomputed from outside (tests/test_grpo_loop.py).
Nothing here knows about tasks: the functions take counts, answers, rewards and
log-probabilities, and the loop takes reward functions of (prompt, completion) text.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch

from llmlab.align import _masked_mean, frozen_copy, sample
from llmlab.evaluate import bootstrap_interval

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ------------------------------------------------------------------ checks --

def _int(v, name, minimum=0):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _number(v, name, minimum=0.0):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {v}")
    return float(v)


def _list(v, name):
    if isinstance(v, (str, bytes, dict)) or not isinstance(v, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a list, got {type(v).__name__}")
    v = v.tolist() if isinstance(v, torch.Tensor) else list(v)
    if not v:
        raise ValueError(f"{name} is empty")
    return v


def _float_tensor(x, name, dim=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() != dim or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {dim}-D floating-point tensor, "
                         f"got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _mask(mask, like, name):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask


# ------------------------------------------------------------ test-time compute --

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). The chance
    that at least one of ``k`` samples drawn without replacement from the ``n`` is
    correct, ``1 - C(n-c, k) / C(n, k)``, in the numerically stable product form
    ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``; 1.0 when ``n - c < k``. Unlike the plug-in
    ``1 - (1 - c/n)**k``, its expectation over the samples is exactly the true pass@k.
    """
    _int(n, "n", 1)
    _int(c, "c", 0)
    _int(k, "k", 1)
    if c > n:
        raise ValueError(f"c ({c}) cannot exceed n ({n})")
    if k > n:
        raise ValueError(f"k ({k}) cannot exceed n ({n}): pass@k needs n >= k samples")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts, n, k: int, confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """pass@k averaged over problems, with a bootstrap interval over problems.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). ``counts``
    holds the number of correct samples per problem; ``n`` is the number of samples per
    problem (one int, or one per problem). Returns ``{"value", "ci_low", "ci_high",
    "n"}`` (``n``: problems), the interval from ``llmlab.evaluate.bootstrap_interval``.
    """
    counts = _list(counts, "counts")
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        ns = [_int(n, "n", 1)] * len(counts)  # a float n gets one clear TypeError
    else:
        ns = _list(n, "n")
    if len(ns) != len(counts):
        raise ValueError(f"n has {len(ns)} entries for {len(counts)} counts")
    values = [pass_at_k(ni, ci, k) for ni, ci in zip(ns, counts)]
    lo, hi = bootstrap_interval(values, confidence=confidence, resamples=resamples,
                                seed=seed)
    return {"value": sum(values) / len(values), "ci_low": lo, "ci_high": hi,
            "n": len(values)}


def majority_vote(answers):
    """The most frequent non-None answer (self-consistency, Wang et al. 2023).

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). ``None``
    marks a sample whose answer could not be extracted; it never wins. Ties go to the
    answer seen first, so the vote is deterministic. Returns None if all are None
    (a float NaN counts as None).
    Answers must be hashable (compare normalised strings or numbers).
    """
    answers = _list(answers, "answers")
    tally: dict = {}
    for a in answers:
        if isinstance(a, float) and math.isnan(a):
            a = None  # NaN != NaN: it could never gather votes
        if a is not None:
            try:
                tally[a] = tally.get(a, 0) + 1
            except TypeError:
                raise TypeError(f"answers must be hashable, got {type(a).__name__}") \
                    from None
    if not tally:
        return None
    top = max(tally.values())
    return next(a for a, count in tally.items() if count == top)  # dicts keep order


def best_of_n(candidates, scores):
    """The candidate with the highest score (best-of-N with a verifier or reward model).

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). Ties go to
    the first candidate with the top score. Scores must be finite numbers.
    """
    candidates = _list(candidates, "candidates")
    scores = _list(scores, "scores")
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, Real):
            raise TypeError(f"scores must be numbers, got {type(s).__name__}")
        if not math.isfinite(s):
            raise ValueError(f"scores must be finite, got {s}")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return candidates[best]


# ---------------------------------------------------------------- GRPO --

def _rewards(rewards, group_size):
    """Float32 1-D rewards (None -> NaN, an unscorable completion) in groups."""
    if isinstance(rewards, torch.Tensor):
        if rewards.dim() != 1 or not rewards.is_floating_point():
            raise ValueError(f"rewards must be a 1-D float tensor, got {rewards.dtype} "
                             f"of shape {tuple(rewards.shape)}")
        values = rewards.detach().float()
    else:
        items = _list(rewards, "rewards")
        for r in items:
            if r is not None and (isinstance(r, bool) or not isinstance(r, Real)):
                raise TypeError(f"rewards must be numbers or None, "
                                f"got {type(r).__name__}")
        values = torch.tensor([math.nan if r is None else float(r) for r in items])
    _int(group_size, "group_size", 2)
    if values.numel() == 0 or values.numel() % group_size:
        raise ValueError(f"{values.numel()} rewards do not split into groups of "
                         f"{group_size}")
    if torch.isinf(values).any():
        raise ValueError("rewards must be finite (None or NaN for an unscorable one)")
    return values


def _nanstd(x, dim=None):
    """Standard deviation ignoring NaNs, with Bessel's correction (n - 1)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.nan)
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


def group_advantages(rewards, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over a standard deviation.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). ``rewards``
    lists ``group_size`` consecutive completions per prompt. ``scale``: "group" divides
    by the group's std (GRPO), "batch" by the whole batch's std (the baseline stays the
    group mean), "none" not at all (Dr. GRPO). As trl 1.16 computes it: sample std
    (n - 1), ``+ 1e-4`` in the denominator, None/NaN rewards left out of the statistics
    and given advantage 0. A group whose rewards are all equal gets advantage 0: no
    learning signal (see ``zero_std_share``).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = _rewards(rewards, group_size)
    groups = r.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(group_size)
    advantages = r - mean
    if scale == "group":
        std = _nanstd(groups, 1).repeat_interleave(group_size)
        advantages = advantages / (std + 1e-4)
    elif scale == "batch":
        advantages = advantages / (_nanstd(r) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_share(rewards, group_size: int) -> float:
    """The share of groups whose rewards all agree (zero std): they teach GRPO nothing.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). trl logs it
    as ``frac_reward_zero_std`` (with its default "group" scaling). When it nears 1
    (every prompt all right or all wrong) "the reward does not go up": no gradient.
    """
    groups = _rewards(rewards, group_size).view(-1, group_size)
    std = _nanstd(groups, 1)
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()


def kl_estimators(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    """Schulman's three per-sample estimators of KL(p || q), for samples drawn from p.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). With
    ``log r = log q(x) - log p(x)`` (``logp`` under the policy p, ``ref_logp`` under
    the reference q): ``k1 = -log r`` (unbiased, negative on some samples),
    ``k2 = (log r)**2 / 2`` (biased, low variance), ``k3 = (r - 1) - log r``
    (unbiased and never negative; trl's ``per_token_kl`` before its default
    ``use_bias_correction_kl`` multiplies it by the importance ratio). See
    http://joschu.net/blog/kl-approx.html. Returns ``{"k1", "k2", "k3"}``, elementwise.
    """
    for x, name in ((logp, "logp"), (ref_logp, "ref_logp")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp "
                         f"{tuple(ref_logp.shape)} must have the same shape")
    log_r = ref_logp - logp
    return {"k1": -log_r, "k2": log_r**2 / 2, "k3": torch.exp(log_r) - log_r - 1}


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                     temperature: float = 1.0, entropy: bool = False):
    """Per-token log-probabilities of the completion tokens under ``model``.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). Prompts are
    left-padded and completions right-padded, as trl's GRPOTrainer lays them out; the
    logits (divided by ``temperature``) at position t-1 score token t through
    ``log_softmax`` and ``gather``. Padding positions get 0. Returns a
    ``(batch, completion_len)`` float tensor, with gradients when the model has them;
    ``entropy=True`` returns ``(logps, entropies)``, the entropy of each next-token
    distribution (a health signal: it collapses as the policy sharpens). No
    ``position_ids`` are passed, as in trl: left padding then shifts absolute
    positions, which a RoPE model (the course model, Llama, SmolLM2) does not see.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable torch model, "
                        f"got {type(model).__name__}")
    for x, name in ((prompt_ids, "prompt_ids"), (completion_ids, "completion_ids")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.dtype == torch.bool or x.dim() != 2 \
                or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 2-D integer tensor, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
    if prompt_ids.size(0) != completion_ids.size(0):
        raise ValueError(f"prompt_ids has {prompt_ids.size(0)} rows, completion_ids "
                         f"{completion_ids.size(0)}")
    _mask(prompt_mask, prompt_ids, "prompt_mask")
    _mask(completion_mask, completion_ids, "completion_mask")
    temperature = _number(temperature, "temperature")
    if temperature == 0:
        raise ValueError("temperature must be > 0")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_ids.size(1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, -width - 1:-1].float() / temperature  # t-1 predicts t
    logprobs = logits.log_softmax(-1)
    keep = completion_mask.bool()
    logps = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    logps = logps.masked_fill(~keep, 0.0)
    if not entropy:
        return logps
    entropies = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~keep, 0.0)
    return logps, entropies


def _seq_means(x, mask):
    """Each row's mean over its masked tokens; rows without tokens are left out."""
    means = ((x * mask).sum(-1) / mask.sum(-1)).tolist()
    return [v for v in means if not math.isnan(v)]


class GRPOLoss(NamedTuple):
    """``loss``: the 0-D loss to call ``backward()`` on. ``metrics``: floats, as trl
    logs them (``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max``, and
    ``kl`` when ``beta > 0``, ``entropy`` when entropies are given)."""
    loss: torch.Tensor
    metrics: dict


def grpo_loss(logps, old_logps, advantages, mask, *, loss_type: str = "grpo",
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logps=None, max_completion_length: int | None = None,
              num_items=None, entropies=None,
              use_bias_correction_kl: bool = True) -> GRPOLoss:
    """The clipped GRPO objective with token-level importance ratios, and its metrics.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). Per token,
    with ``ratio = exp(logps - old_logps)`` and the sequence's advantage A:
    ``-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)``, plus
    ``beta * k3`` (``kl_estimators``) towards ``ref_logps`` when ``beta > 0``, the k3
    term multiplied by ``ratio`` when ``use_bias_correction_kl`` (trl 1.16's default,
    from DeepSeek-V3.2). ``mask`` marks completion tokens. ``loss_type`` aggregates:

    * "grpo" - mean over each sequence's tokens, then over sequences (Shao et al. 2024;
      long sequences weigh each token less: a length bias);
    * "bnpo" - mean over all tokens of this batch;
    * "dr_grpo" - sum over tokens / (batch rows * ``max_completion_length``), a
      constant (Liu et al. 2025, Dr. GRPO);
    * "dapo" - sum over tokens / ``num_items``, the tokens of the whole generation
      batch (default: this batch's), a token-level mean (Yu et al. 2025, DAPO).

    Equals trl 1.16's ``GRPOTrainer._compute_loss`` with one process, no gradient
    accumulation and ``steps_per_generation=1``. Returns a ``GRPOLoss``.
    """
    _float_tensor(logps, "logps")
    for x, name in ((old_logps, "old_logps"), (ref_logps, "ref_logps"),
                    (entropies, "entropies")):
        if x is not None and _float_tensor(x, name).shape != logps.shape:
            raise ValueError(f"{name} must have shape {tuple(logps.shape)}, "
                             f"got {tuple(x.shape)}")
    if old_logps is None:
        raise TypeError("old_logps must be a torch.Tensor (logps.detach() on-policy)")
    mask = _mask(mask, logps, "mask").to(logps.dtype)
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError("advantages must be a floating-point torch.Tensor")
    if advantages.device != logps.device:
        raise ValueError(f"advantages are on {advantages.device}, logps on "
                         f"{logps.device}: move them to the same device")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.dim() != 2 or advantages.size(0) != logps.size(0) \
            or advantages.size(1) not in (1, logps.size(1)):
        raise ValueError(f"advantages must have shape ({logps.size(0)},) or "
                         f"{tuple(logps.shape)}, got {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_low = _number(epsilon_low, "epsilon_low")
    epsilon_high = _number(epsilon_high, "epsilon_high")
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low must be < 1, got {epsilon_low}")
    beta = _number(beta, "beta")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps, the reference model's log-probs")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        if _int(max_completion_length, "max_completion_length", 1) < logps.size(1):
            raise ValueError(f"max_completion_length ({max_completion_length}) is "
                             f"shorter than the completions ({logps.size(1)} tokens)")
    if loss_type == "dapo" and num_items is not None:
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.item()
        num_items = _number(num_items, "num_items")
        if num_items == 0:
            raise ValueError("num_items must be > 0 (the generation batch's tokens)")

    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta > 0:
        kl = kl_estimators(logps, ref_logps)["k3"]
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl

    tokens = (per_token * mask)
    if loss_type == "grpo":
        loss = (tokens.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = tokens.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = tokens.sum() / (logps.size(0) * max_completion_length)
    else:
        total = mask.sum().item() if num_items is None else num_items
        loss = tokens.sum() / max(total, 1.0)

    def mean(x):
        return _masked_mean(x, mask).item()

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
        region = torch.maximum(low, high)
        per_seq_low = _seq_means(low, mask)  # NaN for a row without tokens
        per_seq_high = _seq_means(high, mask)
        metrics = {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
                   "clip_ratio/region_mean": mean(region),
                   "clip_ratio/low_min": min(per_seq_low, default=math.nan),
                   "clip_ratio/high_max": max(per_seq_high, default=math.nan)}
        if beta > 0:
            metrics["kl"] = mean(kl)
        if entropies is not None:
            metrics["entropy"] = mean(entropies)
    return GRPOLoss(loss, metrics)


# ------------------------------------------------------------ GRPO trainer --

def _reward_functions(reward_fns, reward_weights):
    """``(functions, names, weights)`` from a callable or a list, as trl takes them."""
    fns = [reward_fns] if callable(reward_fns) else reward_fns
    if isinstance(fns, (str, bytes)) or not isinstance(fns, Sequence):
        raise TypeError(f"reward_fns must be a callable or a list of callables, "
                        f"got {type(reward_fns).__name__}")
    fns = list(fns)
    if not fns:
        raise ValueError("reward_fns is empty")
    for f in fns:
        if not callable(f):
            raise TypeError(f"reward functions must be callable, "
                            f"got {type(f).__name__}")
    names = [getattr(f, "__name__", type(f).__name__) for f in fns]
    names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    if reward_weights is None:
        weights = [1.0] * len(fns)
    else:
        weights = [_number(w, "reward_weights", -math.inf)
                   for w in _list(reward_weights, "reward_weights")]
        if len(weights) != len(fns):
            raise ValueError(f"{len(weights)} reward_weights for {len(fns)} reward "
                             f"functions")
    return fns, names, torch.tensor(weights)


def _tempered(model, temperature):
    """``model`` with its logits divided by ``temperature``, for ``align.sample``."""
    if temperature == 1.0:
        return model

    def forward(**kwargs):
        out = model(**kwargs)
        return _Logits(out.logits / temperature, getattr(out, "past_key_values", None))
    return forward


class _Logits(NamedTuple):
    logits: torch.Tensor
    past_key_values: object = None


class GRPO:
    """GRPO on a causal LM: ``step(prompts)`` samples a group of completions per
    prompt, scores them, and makes one update with ``grpo_loss``.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards). The loop
    trl's ``GRPOTrainer`` runs, written out on one process. ``reward_fns`` is one
    function ``reward_fn(prompt_text, completion_text) -> float`` (a verifier) or a
    list of them; their rewards are weighted by ``reward_weights`` and summed, as trl
    does (``None`` from every function marks an unscorable completion: advantage 0).
    ``tokenizer`` needs ``encode(text) -> ids`` and ``decode(ids,
    skip_special_tokens=True)``, ``eos_token_id`` and ``pad_token_id`` (or EOS).

    Each step: prompts are left-padded and repeated ``group_size`` times; completions
    are sampled with ``llmlab.align.sample`` (KV cache, model in eval mode, no gradients, logits
    divided by ``temperature``; a row stops after its EOS, which counts as a token);
    rewards -> ``group_advantages`` (``scale``); when ``num_iterations > 1`` the
    sampling policy's log-probs ("old") are kept, and with ``beta > 0`` the reference's;
    then ``num_iterations`` updates on the same completions (the first has ratio 1) with
    ``grpo_loss`` (``loss_type``, ``epsilon_low``/``epsilon_high``), each an Adam step
    after clipping the gradient norm to ``max_grad_norm``. The reference model is a
    ``frozen_copy`` of the model (or ``ref_model``), made only when ``beta > 0``.
    Defaults are trl 1.16's (lr 1e-6, beta 0, DAPO's loss, group scaling), except
    ``max_new_tokens=16`` and ``group_size=8`` (trl's ``num_generations``). Sampling
    draws from a generator seeded with ``seed``: runs repeat exactly on one machine.
    ``last_batch`` holds the tensors of the last update (to recompute its loss).
    ``eos_token_id`` ends a completion (default the tokenizer's EOS; a chat model's
    answer ends at its end-of-turn token, ``llmlab.scratchpad.end_of_turn_id``).
    """

    def __init__(self, model, tokenizer, reward_fns, *, reward_weights=None,
                 ref_model=None, group_size: int = 8, lr: float = 1e-6,
                 beta: float = 0.0, epsilon_low: float = 0.2,
                 epsilon_high: float = 0.2, loss_type: str = "dapo",
                 scale: str = "group", max_new_tokens: int = 16,
                 temperature: float = 1.0, num_iterations: int = 1,
                 max_grad_norm: float = 1.0, seed: int = 0,
                 eos_token_id: int | None = None):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, "
                            f"got {type(model).__name__}")
        for attr in ("encode", "decode"):
            if not callable(getattr(tokenizer, attr, None)):
                raise TypeError(f"tokenizer needs an {attr} method, "
                                f"got {type(tokenizer).__name__}")
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                raise ValueError("tokenizer has no eos_token_id: completions could not "
                                 "end (pass eos_token_id)")
        self.eos_token_id = _int(eos_token_id, "eos_token_id")
        self.reward_fns, self.reward_names, self.reward_weights = _reward_functions(
            reward_fns, reward_weights)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, "
                             f"got {loss_type!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        for v, name in ((lr, "lr"), (temperature, "temperature"),
                        (max_grad_norm, "max_grad_norm")):
            if _number(v, name) == 0:
                raise ValueError(f"{name} must be > 0")
        self.model, self.tokenizer = model, tokenizer
        self.group_size = _int(group_size, "group_size", 2)
        self.beta = _number(beta, "beta")
        self.epsilon_low = _number(epsilon_low, "epsilon_low")
        self.epsilon_high = _number(epsilon_high, "epsilon_high")
        if self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low must be < 1, got {epsilon_low}")
        self.loss_type, self.scale = loss_type, scale
        self.max_new_tokens = _int(max_new_tokens, "max_new_tokens", 1)
        self.temperature = float(temperature)
        self.num_iterations = _int(num_iterations, "num_iterations", 1)
        self.max_grad_norm = float(max_grad_norm)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = self.eos_token_id if pad is None else pad
        self.ref_model = None
        if self.beta > 0:
            ref = frozen_copy(model) if ref_model is None else ref_model
            self.ref_model = ref.eval().requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=float(lr))
        device = next(model.parameters()).device
        self.generator = torch.Generator(device).manual_seed(_int(seed, "seed"))
        self.last_batch: dict = {}

    def _encode(self, prompts):
        """Left-padded ``(ids, mask)`` for a list of prompt strings."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, "
                            f"got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        rows = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, prompt {i} is "
                                f"{type(p).__name__}")
            ids = list(self.tokenizer.encode(p))
            if not p or not ids:
                raise ValueError(f"prompt {i} is empty")
            rows.append(ids)
        width = max(map(len, rows))
        device = next(self.model.parameters()).device
        ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            device=device)
        return ids, mask

    def _score(self, prompts, completions):
        """``(len(completions), n_functions)`` rewards; None -> NaN."""
        table = torch.full((len(completions), len(self.reward_fns)), math.nan)
        pairs = zip(self.reward_fns, self.reward_names, strict=True)
        for j, (fn, name) in enumerate(pairs):
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
                r = fn(p, c)
                if r is None:
                    continue
                if isinstance(r, bool) or not isinstance(r, Real):
                    raise TypeError(f"reward function {name} must return a number or "
                                    f"None, got {type(r).__name__} ({r!r})")
                if not math.isfinite(r):
                    raise ValueError(f"reward function {name} returned {r}; return "
                                     f"None for a completion it cannot score")
                table[i, j] = float(r)
        return table

    def rollout(self, prompts) -> dict:
        """Sample ``group_size`` completions per prompt and score them: no update.

        Returns the tensors the update needs (``prompt_ids``, ``prompt_mask``,
        ``completion_ids``, ``completion_mask``, ``rewards``, ``advantages``,
        ``old_logps``, ``ref_logps``; the last two None when not needed), the texts
        (``prompts``, ``completions``) and ``metrics`` (see ``step``).
        """
        prompt_ids, prompt_mask = self._encode(prompts)
        g = self.group_size
        prompt_ids = prompt_ids.repeat_interleave(g, 0)
        prompt_mask = prompt_mask.repeat_interleave(g, 0)
        training = self.model.training
        self.model.eval()
        completion_ids, completion_mask = sample(
            _tempered(self.model, self.temperature), prompt_ids, prompt_mask,
            self.max_new_tokens, self.eos_token_id, self.pad_token_id, self.generator,
            cache=True)
        completion_mask = completion_mask.long()
        texts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                 for row, m in zip(completion_ids, completion_mask, strict=True)]
        repeated = [p for p in prompts for _ in range(g)]
        per_func = self._score(repeated, texts)
        unscorable = torch.isnan(per_func).all(1)
        rewards = (per_func * self.reward_weights).nansum(1)
        rewards[unscorable] = math.nan
        # on the model's device: grpo_loss multiplies them with the model's ratios
        advantages = group_advantages(rewards, g, self.scale)
        advantages = advantages.to(completion_ids.device)
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask,
                self.temperature)
        with torch.no_grad():
            old = completion_logps(self.model, *args) if self.num_iterations > 1 \
                else None
            ref = completion_logps(self.ref_model, *args) if self.beta > 0 else None
        self.model.train(training)

        lengths = completion_mask.sum(1).float()
        ended = ((completion_ids == self.eos_token_id) & completion_mask.bool()).any(1)
        metrics = {"reward": torch.nanmean(rewards).item(),
                   "reward_std": _nanstd(rewards).item(),
                   # per group, whatever the scale (trl logs it from the batch std
                   # when scale="batch": then it is 0 or 1)
                   "frac_reward_zero_std": zero_std_share(rewards, g)}
        for j, name in enumerate(self.reward_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, j]).item()
            metrics[f"rewards/{name}/std"] = _nanstd(per_func[:, j]).item()
        metrics.update({"completions/mean_length": lengths.mean().item(),
                        "completions/max_length": lengths.max().item(),
                        "completions/clipped_ratio": (~ended).float().mean().item()})
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "completion_ids": completion_ids, "completion_mask": completion_mask,
                "rewards": rewards, "advantages": advantages, "old_logps": old,
                "ref_logps": ref, "prompts": repeated, "completions": texts,
                "metrics": metrics}

    def step(self, prompts) -> dict:
        """One GRPO iteration on a list of prompt strings; returns its health signals.

        The signals people check when "the reward does not go up" (trl's names):
        ``reward`` and ``reward_std`` (weighted sum, over all completions),
        ``rewards/<name>/mean`` and ``/std`` per reward function,
        ``frac_reward_zero_std`` (groups that teach nothing), ``entropy`` (mean over
        completion tokens; a collapse means the policy stopped exploring),
        ``clip_ratio/...`` (nonzero only from the second of ``num_iterations``
        updates), ``kl`` to the reference (only when ``beta > 0``),
        ``completions/mean_length`` and ``max_length`` (tokens, EOS included) and
        ``completions/clipped_ratio`` (the share that hit ``max_new_tokens`` without
        EOS: truncated), plus ``loss`` and ``grad_norm`` (before clipping). Loss,
        clip ratios, KL, entropy and grad norm are those of the last update.
        """
        batch = self.rollout(prompts)
        args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                batch["completion_mask"], self.temperature)
        training = self.model.training
        self.model.train()
        for _ in range(self.num_iterations):
            logps, entropies = completion_logps(self.model, *args, entropy=True)
            old = logps.detach() if batch["old_logps"] is None else batch["old_logps"]
            out = grpo_loss(logps, old, batch["advantages"], batch["completion_mask"],
                            loss_type=self.loss_type, epsilon_low=self.epsilon_low,
                            epsilon_high=self.epsilon_high, beta=self.beta,
                            ref_logps=batch["ref_logps"],
                            max_completion_length=self.max_new_tokens,
                            entropies=entropies.detach())
            self.optimizer.zero_grad()
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
        self.model.train(training)
        self.last_batch = {**{k: v for k, v in batch.items() if k != "metrics"},
                           "logps": logps.detach(), "old_logps": old.detach(),
                           "loss": out.loss.detach()}
        return {**batch["metrics"], **out.metrics, "loss": out.loss.item(),
                "grad_norm": grad_norm.item()}
