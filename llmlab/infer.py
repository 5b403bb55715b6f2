"""Generating text and scoring it; decoding written out, speculative decoding, and how fast decoding can be.

Batched greedy generation and the course tasks' accuracy and reward (``generate``, ``score``) are used by the
course-loop lab and by every lab that compares models (quantization, fine-tuning, alignment). Two prompt styles:
``qa`` is how the base course model saw tasks in pretraining ("Question: ... Answer:"); ``chat`` applies the
tokenizer's chat template (instruction-tuned models). ``prompt_style`` picks one.

Chapter: Inference. ``decode`` is a decode loop that keeps its own KV cache (greedy, or sampling through
``sample_next``: temperature, ``top_k_filter``, ``top_p_filter``); ``speculative_decode`` lets a small draft model
propose tokens that the target checks in one pass; ``prompt_lookup_candidates`` drafts from the prompt itself;
``benchmark`` times a generation (time to first token, per-token latency, tokens/s) and ``roofline`` gives the
roofline bound on decoding speed (memory bandwidth and peak compute). Each is checked in the tests against
transformers: ``decode`` against
``model.generate``, the filters against its logits warpers, ``speculative_decode`` against the target's own greedy
output and, sampling, against the target's exact probabilities.
"""
from __future__ import annotations

import math
import statistics
import time
from numbers import Real
from pathlib import Path

import torch

PROMPT_STYLES = ("qa", "chat")
# what closes a chat turn: the course template's <|end|>, ChatML's <|im_end|> (SmolLM2,
# Qwen), where it is not already the tokenizer's EOS
END_OF_TURN = ("<|end|>", "<|im_end|>")


def prompt_style(model, tokenizer) -> str:
    """``qa`` for the base course model (it never saw chat turns in pretraining), else ``chat`` when the
    tokenizer has a chat template, else ``qa``."""
    from llmlab.models import COURSE_MODEL_DIR

    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if name and Path(name).resolve() == COURSE_MODEL_DIR.resolve():
        return "qa"
    return "chat" if getattr(tokenizer, "chat_template", None) else "qa"


def format_prompt(tokenizer, prompt: str, style: str = "qa") -> str:
    """Wrap a course task prompt the way the model expects it."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if style == "qa":
        *context, question = prompt.strip().split("\n")
        return "".join(c + "\n" for c in context) + f"Question: {question} Answer:"
    if style == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (already formatted), batched with left padding, stopping at the end of
    text or of a chat turn; each completion is cut at its first newline, where the course's documents start a new
    line of text."""
    import torch

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # stop at the end of text, and at the end of a chat turn where the tokenizer has one (the course's <|end|>)
    stop = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN
                                       if t in tokenizer.get_vocab() and t != tokenizer.eos_token]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm  # plain bars: widget bars render blank on the static site
        chunks = tqdm(chunks, desc="generate", unit="batch")
    try:
        for i in chunks:
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
            new = ids[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
    return out


def score(model, tokenizer, tasks, style: str = "qa", max_new_tokens: int = 32, batch_size: int = 16,
          progress: bool = False) -> list[dict]:
    """Generate an answer to each course task and score it: ``correct`` (exact tasks) and ``reward``
    (``llmlab.data.gold_reward``). Returns one dict per task."""
    from llmlab.data import Task

    if not all(isinstance(t, Task) for t in tasks):
        raise TypeError("tasks must be a list of llmlab.data.Task")
    prompts = [format_prompt(tokenizer, t.prompt, style) for t in tasks]
    return score_completions(tasks, generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress))


def score_completions(tasks, completions: list[str]) -> list[dict]:
    """Score completions however they were generated (PyTorch, llama.cpp): ``correct`` for exact tasks and
    ``reward`` (``llmlab.data.gold_reward``), one dict per task."""
    from llmlab.data import EXACT_TASKS, Task, check_answer, gold_reward

    if not all(isinstance(t, Task) for t in tasks):
        raise TypeError("tasks must be a list of llmlab.data.Task")
    if isinstance(completions, str) or len(completions) != len(tasks):
        raise ValueError("completions must be a list with one string per task")
    return [{"kind": t.kind, "prompt": t.prompt, "completion": c,
             "correct": check_answer(t, c) if t.kind in EXACT_TASKS else None,
             "reward": gold_reward(t.prompt, c)} for t, c in zip(tasks, completions)]


# ========================================================================== chapter: Inference ==

# Peak memory bandwidth in GB/s (10^9 bytes/s) from the vendors' data sheets. The A100 80GB is the SXM part (the
# PCIe card has 1935 GB/s); AWS's A10G has the A10's 600 GB/s.
GPU_BANDWIDTH_GB_S = {"T4": 320, "L4": 300, "A10G": 600, "RTX 4090": 1008, "A100-40GB": 1555, "A100-80GB": 2039,
                      "H100 PCIe": 2000, "H100 SXM": 3350, "H200": 4800}
# Peak dense 16-bit (FP16/BF16) tensor-core throughput in TFLOP/s (10^12 FLOP/s) from the same data sheets, without
# the 2:4 sparsity that doubles the headline figure (H100 SXM: 1,979 with sparsity, 989 dense). Only the GPUs whose
# data sheet gives the figure directly; the A10G's and the RTX 4090's depend on clocks and accumulation precision.
GPU_PEAK_TFLOPS = {"T4": 65, "L4": 121, "A100-40GB": 312, "A100-80GB": 312, "H100 PCIe": 756, "H100 SXM": 989,
                   "H200": 989}


# ------------------------------------------------------------------ checks --

def _causal_lm(model, name="model"):
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{name} must be a Hugging Face causal LM, got {type(model).__name__}")
    return model


def _input_ids(input_ids):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.numel() == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    return input_ids


def _count(v, name, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _real(v, name, low=0.0, high=math.inf, low_open=False):
    """A finite number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or not (low < v if low_open else low <= v) or not v <= high:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], got {v}")
    return v


def _sampling(temperature, top_k, top_p):
    _real(temperature, "temperature")
    if top_k is not None:
        _count(top_k, "top_k")
    if top_p is not None:
        _real(top_p, "top_p", 0.0, 1.0, low_open=True)


def _logits(logits):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point() or logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be a floating-point tensor (..., vocab), got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    return logits


def _generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


# ---------------------------------------------------------------- sampling --

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row and set the rest to -inf (a tie with the k-th keeps both, as
    transformers' ``TopKLogitsWarper`` does)."""
    _logits(logits)
    k = min(_count(k, "k"), logits.shape[-1])
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probabilities add up to ``p``, the token that
    crosses ``p`` included, and set the rest to -inf. A token is dropped when the tokens more likely than it
    already hold ``p`` of the probability, so the most likely token always stays. ``p = 1`` keeps every token."""
    _logits(logits)
    _real(p, "p", 0.0, 1.0, low_open=True)
    if p == 1:
        return logits
    probs, order = logits.float().softmax(dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from sorted order to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Divide by ``temperature``, then keep the ``top_k``, then the ``top_p`` nucleus: the order transformers'
    ``generate`` applies its warpers in. ``temperature`` must be > 0 here (0, greedy, is ``sample_next``'s)."""
    _logits(logits)
    _real(temperature, "temperature", low_open=True)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row from its logits ``(batch, vocab)``: the argmax when ``temperature`` is 0
    (greedy), else a draw from ``softmax(warp_logits(...))``. Returns ``(batch,)`` token ids."""
    _logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got {tuple(logits.shape)}")
    _sampling(temperature, top_k, top_p)
    _generator(generator)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).float().softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------- decoding --

@torch.no_grad()
def decode(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
           eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate with a Hugging Face causal LM, one token per forward pass, keeping the KV cache ourselves.

    With ``use_cache`` a ``DynamicCache`` holds every token's keys and values but the newest token's: the first
    pass feeds the whole prompt (prefill), each later one only the token just chosen. Without it, every step runs
    the whole sequence again: the same tokens, with work growing with the length. ``temperature`` 0 is greedy;
    else see ``sample_next``. Rows are not padded (all prompts have the same length). A row that has produced
    ``eos_token_id`` repeats it, and decoding stops once every row has. Returns the prompt and the new tokens,
    ``(batch, seq + n)``, as ``model.generate`` does.
    """
    from transformers import DynamicCache

    _causal_lm(model)
    _input_ids(input_ids)
    _count(max_new_tokens, "max_new_tokens")
    _sampling(temperature, top_k, top_p)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    if eos_token_id is not None:
        _count(eos_token_id, "eos_token_id", minimum=0)
    _generator(generator)

    cache = DynamicCache(config=model.config) if use_cache else None
    tokens = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if use_cache:  # feed only the tokens the cache lacks: the prompt first, then the newest token
            new = tokens[:, cache.get_seq_length():]
            logits = model(new, past_key_values=cache, use_cache=True).logits[:, -1]
        else:
            logits = model(tokens, use_cache=False).logits[:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_ids = next_ids.masked_fill(done, eos_token_id)
            done |= next_ids == eos_token_id
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        if done.all():
            break
    return tokens


# ---------------------------------------------------------- speculative decoding --

def _rollback(cache, length: int) -> None:
    """Forget the cached keys and values of every token past the first ``length``."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5: crop(-n) drops the last n tokens (a positive argument is an error)


def _accept_greedy(target_logits, draft_tokens):
    """Keep the draft tokens while they equal the target's argmax; then add the target's own next token."""
    best = target_logits.argmax(dim=-1).tolist()  # k + 1 tokens: the target's choice after each prefix
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == best[n]:
        n += 1
    return draft_tokens[:n] + [best[n]]


def _accept_sampled(p, q, draft_tokens, generator):
    """Leviathan et al.'s rule: keep draft token x with probability min(1, p(x) / q(x)); at the first rejection,
    draw from the leftover ``max(0, p - q)`` (normalized) and stop; if all are kept, draw one more from p.
    Every token kept or drawn is then distributed exactly as the target would sample it.
    ``p``: the target's probabilities, k + 1 rows; ``q``: the draft's, k rows."""
    kept = []
    for i, x in enumerate(draft_tokens):
        if torch.rand(1, generator=generator).item() < p[i][x] / q[i][x]:
            kept.append(x)
            continue
        leftover = (p[i] - q[i]).clamp(min=0)
        if leftover.sum() == 0:  # p == q up to rounding: a rejection that (almost) never happens
            leftover = p[i]
        return kept + [torch.multinomial(leftover, 1, generator=generator).item()]
    return kept + [torch.multinomial(p[len(draft_tokens)], 1, generator=generator).item()]


@torch.no_grad()
def speculative_decode(target, draft, input_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
                       temperature: float = 0.0, generator: torch.Generator | None = None):
    """Speculative decoding (Leviathan et al. 2023, Chen et al. 2023) for one sequence.

    Each round the small ``draft`` model (same tokenizer) proposes ``k`` tokens one by one, then the ``target``
    scores them all in ONE forward pass (the logits after each prefix). Greedy (``temperature`` 0): keep the
    longest prefix of the proposal that matches the target's argmax, plus the target's own next token, so the
    output is exactly the target's greedy output. Sampling: keep each token with probability min(1, p/q) and
    resample a rejection from norm(max(0, p - q)), so the output is distributed exactly as the target's samples.
    Either way a round yields 1 to k + 1 tokens for one target pass. Both models keep a KV cache, cut back after
    a rejection.

    Returns ``(tokens, stats)``: the prompt and ``max_new_tokens`` new tokens ``(1, seq + n)``, and a dict with
    ``proposed`` and ``accepted`` draft tokens, ``acceptance_rate`` and ``target_passes``/``draft_passes``
    (plain decoding needs ``max_new_tokens`` target passes).
    """
    from transformers import DynamicCache

    _causal_lm(target, "target")
    _causal_lm(draft, "draft")
    if _input_ids(input_ids).shape[0] != 1:
        raise ValueError(f"speculative_decode takes one sequence (batch 1), got batch {input_ids.shape[0]}")
    _count(max_new_tokens, "max_new_tokens")
    _count(k, "k")
    _real(temperature, "temperature")
    _generator(generator)
    if temperature > 0 and getattr(target.config, "vocab_size", None) != getattr(draft.config, "vocab_size", None):
        raise ValueError("sampling compares the target's and the draft's probabilities: their vocab_size must match")

    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    tokens = input_ids
    stats = {"proposed": 0, "accepted": 0, "target_passes": 0, "draft_passes": 0}
    while tokens.shape[1] < input_ids.shape[1] + max_new_tokens:
        n_draft = min(k, input_ids.shape[1] + max_new_tokens - tokens.shape[1] - 1)  # the round adds up to k + 1

        # 1. the draft proposes n_draft tokens, one forward pass each (its cache lacks the last token or two)
        proposal, q = tokens, []  # q: the draft's probabilities for each proposed token (sampling)
        for _ in range(n_draft):
            logits = draft(proposal[:, draft_cache.get_seq_length():], past_key_values=draft_cache,
                           use_cache=True).logits[0, -1]
            if temperature == 0:
                x = logits.argmax()
            else:
                q.append((logits / temperature).float().softmax(dim=-1))
                x = torch.multinomial(q[-1], 1, generator=generator)[0]
            proposal = torch.cat([proposal, x.view(1, 1)], dim=1)
        stats["draft_passes"] += n_draft

        # 2. the target scores the proposal in one pass: logits after the last token and after each draft token
        new = proposal[:, target_cache.get_seq_length():]
        target_logits = target(new, past_key_values=target_cache, use_cache=True).logits[0, -(n_draft + 1):]
        stats["target_passes"] += 1

        # 3. accept a prefix of the proposal and add one token from the target
        draft_tokens = proposal[0, tokens.shape[1]:].tolist()
        if temperature == 0:
            kept = _accept_greedy(target_logits, draft_tokens)
        else:
            p = (target_logits / temperature).float().softmax(dim=-1)
            kept = _accept_sampled(p, q, draft_tokens, generator)
        stats["proposed"] += n_draft
        stats["accepted"] += len(kept) - 1
        tokens = torch.cat([tokens, torch.tensor([kept], dtype=tokens.dtype, device=tokens.device)], dim=1)

        # 4. forget the rejected tokens: each cache keeps at most every token but the newest
        _rollback(target_cache, tokens.shape[1] - 1)
        _rollback(draft_cache, tokens.shape[1] - 1)
    stats["acceptance_rate"] = stats["accepted"] / stats["proposed"] if stats["proposed"] else 0.0
    return tokens, stats


def prompt_lookup_candidates(input_ids, ngram: int = 3, k: int = 4) -> torch.Tensor:
    """Prompt-lookup decoding's draft: no draft model, just the text so far. Find the last ``ngram`` tokens
    earlier in the sequence and propose the (up to) ``k`` tokens that followed them there; if they do not occur,
    try the last ``ngram - 1`` tokens, and so on down to one. Like transformers' ``prompt_lookup_num_tokens``,
    the first (leftmost) occurrence with a continuation wins. Returns a 1-D tensor, empty when nothing matches.

    ``input_ids``: a list of token ids, a 1-D tensor or a ``(1, seq)`` tensor.
    """
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise TypeError("input_ids must be a list of ints or a tensor of token ids")
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a list of ints or a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be one sequence of token ids, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    _count(ngram, "ngram")
    _count(k, "k")
    seq = input_ids.tolist()
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        last = seq[-n:]
        for start in range(len(seq) - n):  # occurrences that end before the sequence does
            if seq[start:start + n] == last:
                return input_ids[start + n:start + n + k].clone()
    return input_ids[:0].clone()


# ------------------------------------------------------------- measuring speed --

def benchmark(fn_or_model, input_ids: torch.Tensor | None = None, new_tokens: int = 32, repeats: int = 5,
              warmup: int = 1, batch_size: int = 1) -> dict:
    """Time a generation: total time for ``new_tokens`` new tokens, time to first token and the rest per token.

    ``fn_or_model``: a callable ``fn(n)`` that generates ``n`` new tokens for each of ``batch_size`` sequences
    (say ``lambda n: model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)``), or a Hugging
    Face model with ``input_ids`` (then ``decode(model, input_ids, n)``, greedy with a cache, and the batch size
    is ``input_ids``'s). After ``warmup`` untimed calls, each of ``repeats`` rounds times ``fn(1)`` (time to first
    token: the prefill and one step) and ``fn(new_tokens)``; the medians are reported. ``per_token_s`` is the
    time of each token after the first: ``(total_s - ttft_s) / (new_tokens - 1)``. ``tokens_per_s`` counts every
    sequence's tokens: ``batch_size * new_tokens / total_s``. ``threads``: torch's CPU thread count.
    """
    _count(new_tokens, "new_tokens")
    _count(repeats, "repeats")
    _count(warmup, "warmup", minimum=0)
    _count(batch_size, "batch_size")
    if isinstance(fn_or_model, torch.nn.Module):
        _causal_lm(fn_or_model)
        if input_ids is None:
            raise ValueError("benchmarking a model needs input_ids (or pass a callable fn(n))")
        if batch_size not in (1, _input_ids(input_ids).shape[0]):
            raise ValueError(f"batch_size {batch_size} differs from input_ids' batch {input_ids.shape[0]}")
        model, batch_size = fn_or_model, input_ids.shape[0]

        def fn(n):
            return decode(model, input_ids, n)
    elif callable(fn_or_model):
        if input_ids is not None:
            raise ValueError("input_ids go with a model; a callable fn(n) brings its own prompt")
        fn = fn_or_model
    else:
        raise TypeError(f"fn_or_model must be a callable fn(n) or a causal LM, got {type(fn_or_model).__name__}")

    def seconds(n):
        t0 = time.perf_counter()
        fn(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a GPU runs ahead of Python: wait for it before reading the clock
        return time.perf_counter() - t0

    for _ in range(warmup):
        fn(new_tokens)
    first, total = [], []
    for _ in range(repeats):
        first.append(seconds(1))
        total.append(seconds(new_tokens))
    ttft, total_s = statistics.median(first), statistics.median(total)
    return {"new_tokens": new_tokens, "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads(),
            "total_s": total_s, "ttft_s": ttft,
            "per_token_s": (total_s - ttft) / (new_tokens - 1) if new_tokens > 1 else ttft,
            "tokens_per_s": batch_size * new_tokens / total_s}


def roofline(n_params, bytes_per_param, bandwidth_gb_s, batch_size: int = 1, kv_bytes_per_token=0,
             context: int = 0, peak_tflops=None, flops_per_token=None) -> dict:
    """The roofline bound on decoding speed: the slower of a memory roof and a compute roof.

    Chapter: Inference (section 6). Memory roof: each decode step reads every weight once (shared by the whole
    batch) and each sequence's KV cache (``kv_bytes_per_token * context`` bytes, see
    ``llmlab.memory.kv_cache_bytes``), so a step takes at least ``bytes_per_step / bandwidth``. Compute roof:
    the step does ``batch_size * flops_per_token`` FLOPs (default ``2 * n_params``: one multiply-add per weight
    per token), so it takes at least ``flops_per_step / peak``. The step time is the larger of the two, hence
    ``tokens_per_s = min(memory bound, compute bound)``. The arithmetic intensity (FLOPs per byte read) decides
    which roof binds: below the ridge point ``peak / bandwidth`` a step is memory-bound, above it compute-bound.
    At batch 1 the intensity is about 2 / ``bytes_per_param``, far below any GPU's ridge point.

    ``bandwidth_gb_s``: GB/s (10^9 bytes/s), or a GPU name in ``GPU_BANDWIDTH_GB_S``. ``peak_tflops``: TFLOP/s
    (10^12 FLOP/s), a GPU name in ``GPU_PEAK_TFLOPS`` (dense 16-bit tensor-core peak), or None for no compute roof
    (an infinitely fast processor: the memory bound alone, as this function returned before it had the compute
    roof). ``flops_per_token``: FLOPs per generated token of one sequence (add attention's ``4 * n_layers *
    d_query * context`` for long caches); default ``2 * n_params``.

    Returns ``weight_bytes``, ``kv_bytes``, ``bytes_per_step``, ``flops_per_step``, ``arithmetic_intensity``
    (FLOP/byte), ``ridge_point`` (FLOP/byte; ``inf`` without a compute roof), ``memory_step_s`` and
    ``compute_step_s`` (lower bounds from each roof; ``compute_step_s`` is 0.0 without one), ``step_s`` (their
    maximum), ``bound`` (``"memory"`` or ``"compute"``: the roof that sets ``step_s``; a tie counts as memory),
    ``memory_bound_tokens_per_s`` and ``compute_bound_tokens_per_s`` (all sequences; ``inf`` without a compute
    roof), ``tokens_per_s_per_sequence`` and ``tokens_per_s`` (all sequences; upper bounds, the minimum of the two
    roofs) and ``attainable_tflops`` (``min(peak, intensity * bandwidth)``, the classic roofline's y axis).
    """
    for v, name in ((n_params, "n_params"), (bytes_per_param, "bytes_per_param")):
        _real(v, name, low_open=True)
    if isinstance(bandwidth_gb_s, str):
        if bandwidth_gb_s not in GPU_BANDWIDTH_GB_S:
            raise ValueError(f"unknown GPU {bandwidth_gb_s!r}; known: {sorted(GPU_BANDWIDTH_GB_S)} "
                             "(or pass its bandwidth in GB/s)")
        bandwidth_gb_s = GPU_BANDWIDTH_GB_S[bandwidth_gb_s]
    _real(bandwidth_gb_s, "bandwidth_gb_s", low_open=True)
    _count(batch_size, "batch_size")
    _real(kv_bytes_per_token, "kv_bytes_per_token")
    _count(context, "context", minimum=0)
    if isinstance(peak_tflops, str):
        if peak_tflops not in GPU_PEAK_TFLOPS:
            raise ValueError(f"no peak TFLOP/s stored for {peak_tflops!r}; known: {sorted(GPU_PEAK_TFLOPS)} "
                             "(or pass its peak in TFLOP/s)")
        peak_tflops = GPU_PEAK_TFLOPS[peak_tflops]
    if peak_tflops is not None:
        _real(peak_tflops, "peak_tflops", low_open=True)
    if flops_per_token is None:
        flops_per_token = 2 * n_params
    _real(flops_per_token, "flops_per_token", low_open=True)

    weight_bytes = n_params * bytes_per_param
    kv_bytes = batch_size * context * kv_bytes_per_token
    bytes_per_step = weight_bytes + kv_bytes
    flops_per_step = batch_size * flops_per_token
    bandwidth = bandwidth_gb_s * 1e9  # bytes/s
    peak = math.inf if peak_tflops is None else peak_tflops * 1e12  # FLOP/s
    memory_step_s = bytes_per_step / bandwidth
    compute_step_s = flops_per_step / peak
    step_s = max(memory_step_s, compute_step_s)
    intensity = flops_per_step / bytes_per_step
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bytes_per_step": bytes_per_step,
            "flops_per_step": flops_per_step, "arithmetic_intensity": intensity, "ridge_point": peak / bandwidth,
            "memory_step_s": memory_step_s, "compute_step_s": compute_step_s, "step_s": step_s,
            "bound": "memory" if memory_step_s >= compute_step_s else "compute",
            "memory_bound_tokens_per_s": batch_size / memory_step_s,
            "compute_bound_tokens_per_s": batch_size / compute_step_s if compute_step_s > 0 else math.inf,
            "tokens_per_s_per_sequence": 1 / step_s, "tokens_per_s": batch_size / step_s,
            "attainable_tflops": min(peak, intensity * bandwidth) / 1e12}
