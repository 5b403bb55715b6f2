"""Evaluating language models: perplexity, exact match, multiple choice, confidence intervals, contamination.

Chapter: Evaluation. One small harness that every lab scores its models through, built on what the other modules
already do (``llmlab.pretrain.evaluate`` for the loss, ``llmlab.infer.score`` and ``llmlab.data.check_answer`` for
exact match, ``llmlab.llamacpp`` for GGUF models, ``llmlab.data.gold_reward`` for preferences):

* ``perplexity`` / ``sequence_nll`` / ``bits_per_byte`` - how well a model predicts held-out text, per token and per
  byte (tokenizer-independent);
* ``exact_match`` - generate an answer to each course task and check it; the model may be a Hugging Face model, a
  ``llama_cpp.Llama`` or any function ``prompts -> completions``;
* ``loglikelihood`` / ``multiple_choice`` - score choices by the log-probability of each continuation, the way
  lm-evaluation-harness does (``acc``: the largest sum; ``acc_norm``: the largest sum per byte of the choice,
  where the harness divides by characters: the same for ASCII text);
* ``wilson_interval`` / ``bootstrap_interval`` - how noisy a score on a small evaluation set is, and
  ``compare_proportions`` - whether two scores differ beyond that noise (``"higher"``, ``"lower"`` or ``"tie"``);
* ``ngram_overlap`` - contamination: how much of each test item already appears in a training corpus;
* ``run`` - a table with one row per metric: value, 95 % interval and the number of examples.

Each is checked in the tests against a reference: perplexity against transformers' own loss and
``llmlab.pretrain.evaluate``, choice log-likelihoods against a plain forward pass per choice, exact match against
``llmlab.infer.score``, the Wilson interval against scipy.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from numbers import Real

import torch

from llmlab.infer import _count

SUITES = ("perplexity", "exact_match", "multiple_choice")


# ------------------------------------------------------------------ checks --


def _confidence(confidence):
    if isinstance(confidence, bool) or not isinstance(confidence, Real):
        raise TypeError(f"confidence must be a number, got {type(confidence).__name__}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


def _is_hf(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config")


def _is_llama_cpp(model) -> bool:
    try:
        from llama_cpp import Llama
    except ImportError:
        return False
    return isinstance(model, Llama)


def _texts(texts, name="texts"):
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must be a list of strings")
    if not texts:
        raise ValueError(f"{name} is empty")
    if not all(t for t in texts):
        raise ValueError(f"{name} holds an empty string")
    return list(texts)


# --------------------------------------------------------- confidence intervals --

def _z(confidence):
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927): the values of p that a score test
    would not reject. Unlike the normal "p +- z*sqrt(p(1-p)/n)" interval it stays inside [0, 1] and is not empty
    at 0 or n successes, which matters for the small evaluation sets of this course."""
    _count(n, "n")
    _count(successes, "successes", minimum=0)
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    z = _z(_confidence(confidence))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def compare_proportions(successes_a: int, n_a: int, successes_b: int, n_b: int,
                        confidence: float = 0.95) -> str:
    """``"higher"``, ``"lower"`` or ``"tie"``: how the rate ``successes_a / n_a`` compares with ``successes_b /
    n_b``, read from their Wilson intervals. Only intervals that do not overlap rank two scores; overlapping ones
    are a tie, however far apart the point estimates look (a conservative reading: it calls some real
    differences ties, and no noise a difference). Every chapter that ranks two accuracies asserts this."""
    lo_a, hi_a = wilson_interval(successes_a, n_a, confidence)
    lo_b, hi_b = wilson_interval(successes_b, n_b, confidence)
    if lo_a > hi_b:
        return "higher"
    if hi_a < lo_b:
        return "lower"
    return "tie"


def bootstrap_interval(values, statistic: Callable | None = None, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron 1979) of ``statistic`` (default: the mean) over ``values``: resample
    the examples with replacement, recompute, take the middle ``confidence`` of the results. ``values`` may be
    numbers or any items ``statistic`` understands (e.g. per-document (nats, tokens) pairs)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"values must be a sequence, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError("values is empty")
    _confidence(confidence)
    _count(resamples, "resamples")
    if statistic is None:
        if not all(isinstance(v, Real) for v in values):
            raise TypeError("values must be numbers when no statistic is given")
        statistic = lambda xs: sum(xs) / len(xs)  # noqa: E731
    if not callable(statistic):
        raise TypeError(f"statistic must be callable, got {type(statistic).__name__}")
    rng = random.Random(seed)
    stats = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    lo = stats[int(math.floor(tail * (resamples - 1)))]
    hi = stats[int(math.ceil((1 - tail) * (resamples - 1)))]
    return float(lo), float(hi)


# ------------------------------------------------------------------ perplexity --

def _encode_texts(tokenizer, texts):
    """Each text between two end-of-text tokens, as the pretraining stream separates documents: every token of the
    text, and the end of the document, is predicted from what came before."""
    eos = tokenizer.eos_token_id
    return [[eos, *tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in texts]


@torch.no_grad()
def sequence_nll(model, rows_or_texts, tokenizer=None, batch_size: int = 16) -> list[dict]:
    """Next-token negative log-likelihood of each sequence: ``{"nats", "tokens"}`` (plus ``"bytes"`` for texts).

    ``rows_or_texts`` is a (rows, seq_len) tensor of token ids (``llmlab.pretrain.validation_rows``) or a list of
    strings (then ``tokenizer`` is needed; see ``_encode_texts``). ``model`` is a Hugging Face causal LM or a
    ``llama_cpp.Llama``."""
    _count(batch_size, "batch_size")
    if isinstance(rows_or_texts, torch.Tensor):
        if rows_or_texts.dim() != 2 or rows_or_texts.shape[1] < 2 or rows_or_texts.is_floating_point():
            raise ValueError(f"rows must be a (rows, seq_len >= 2) tensor of token ids, got "
                             f"{rows_or_texts.dtype} {tuple(rows_or_texts.shape)}")
        seqs, n_bytes = rows_or_texts.tolist(), None
    else:
        texts = _texts(rows_or_texts, "rows_or_texts")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("texts need a Hugging Face tokenizer: pass tokenizer=")
        seqs, n_bytes = _encode_texts(tokenizer, texts), [len(t.encode("utf-8")) for t in texts]
    if _is_llama_cpp(model):
        from llmlab import llamacpp

        out = []
        for seq in seqs:
            lg = torch.from_numpy(llamacpp.logits(model, seq))[:-1].float()
            out.append({"nats": torch.nn.functional.cross_entropy(lg, torch.tensor(seq[1:]), reduction="sum").item(),
                        "tokens": len(seq) - 1})
    elif _is_hf(model):
        model.eval()
        out = []
        pad = getattr(model.config, "pad_token_id", None) or 0
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll = (nll * mask[:, 1:]).sum(1)
            out += [{"nats": n.item(), "tokens": len(s) - 1} for n, s in zip(nll, chunk)]
    else:
        raise TypeError(f"model must be a Hugging Face causal LM or a llama_cpp.Llama, got {type(model).__name__}")
    if n_bytes is not None:
        for row, b in zip(out, n_bytes):
            row["bytes"] = b
    return out


def perplexity(model, rows_or_texts, tokenizer=None, batch_size: int = 16) -> float:
    """exp(mean next-token loss in nats), every token weighted equally: ``exp(llmlab.pretrain.evaluate(...))`` for
    rows; for a list of texts, each text is scored on its own (see ``sequence_nll``)."""
    nll = sequence_nll(model, rows_or_texts, tokenizer, batch_size)
    return math.exp(sum(r["nats"] for r in nll) / sum(r["tokens"] for r in nll))


def bits_per_byte(model, tokenizer, texts, batch_size: int = 16) -> float:
    """Total next-token loss in bits divided by the UTF-8 bytes of the texts: a per-token perplexity depends on how
    many tokens the tokenizer cuts a text into, bits per byte does not (the end-of-text token is counted too)."""
    nll = sequence_nll(model, _texts(texts), tokenizer, batch_size)
    return sum(r["nats"] for r in nll) / math.log(2) / sum(r["bytes"] for r in nll)


# ------------------------------------------------------------------ exact match --

def exact_match(model, tokenizer, tasks, style: str = "qa", max_new_tokens: int = 32, batch_size: int = 16,
                progress: bool = False) -> list[dict]:
    """Greedy answers to the course tasks, checked by ``llmlab.data.check_answer`` and rewarded by
    ``llmlab.data.gold_reward`` (``llmlab.infer.score_completions``): one dict per task.

    ``model`` is a Hugging Face model (``llmlab.infer.generate``), a ``llama_cpp.Llama``
    (``llmlab.llamacpp.generate``) or any function that maps a list of formatted prompts to their completions."""
    from llmlab import infer
    from llmlab.data import Task

    if isinstance(tasks, Task) or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, Task) for t in tasks):
        raise TypeError("tasks must be a list of llmlab.data.Task")
    if not tasks:
        raise ValueError("tasks is empty")
    _count(max_new_tokens, "max_new_tokens")
    prompts = [infer.format_prompt(tokenizer, t.prompt, style) for t in tasks]
    if _is_hf(model):
        completions = infer.generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    elif _is_llama_cpp(model):
        from llmlab import llamacpp

        completions = llamacpp.generate(model, tokenizer, prompts, max_new_tokens)
    elif callable(model):
        completions = model(prompts)
    else:
        raise TypeError(f"model must be a Hugging Face causal LM, a llama_cpp.Llama or a function prompts -> "
                        f"completions, got {type(model).__name__}")
    if isinstance(completions, str) or not isinstance(completions, (list, tuple)) or len(completions) != len(tasks) \
            or not all(isinstance(c, str) for c in completions):
        raise ValueError("the generation function must return one string per prompt")
    return infer.score_completions(list(tasks), list(completions))


def accuracy(rows, confidence: float = 0.95) -> dict:
    """Accuracy over the rows that have an exact answer (``correct`` not None), with its Wilson interval:
    ``{"value", "ci_low", "ci_high", "n"}``."""
    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) and "correct" in r
                                                                                 for r in rows):
        raise TypeError("rows must be a list of dicts with a 'correct' entry (llmlab.evaluate.exact_match)")
    exact = [bool(r["correct"]) for r in rows if r["correct"] is not None]
    if not exact:
        raise ValueError("no row has an exact answer")
    lo, hi = wilson_interval(sum(exact), len(exact), confidence)
    return {"value": sum(exact) / len(exact), "ci_low": lo, "ci_high": hi, "n": len(exact)}


# ------------------------------------------------------------- multiple choice --

def _encode_pair(tokenizer, context: str, continuation: str):
    """Token ids of context and continuation as lm-evaluation-harness makes them: spaces at the end of the context
    move to the continuation; the pair is tokenized together and split where the context's own tokens end."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model, tokenizer, contexts, continuations, batch_size: int = 16) -> list[dict]:
    """log P(continuation | context) under ``model``, one ``{"logprob", "tokens", "greedy"}`` per pair: the sum of
    the continuation tokens' log-probabilities, how many there are, and whether each is the argmax (the model would
    have generated exactly this continuation greedily)."""
    if not _is_hf(model):
        raise TypeError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
    contexts, continuations = _texts(contexts, "contexts"), _texts(continuations, "continuations")
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    _count(batch_size, "batch_size")
    pairs = [_encode_pair(tokenizer, c, x) for c, x in zip(contexts, continuations)]
    if any(not ctx or not cont for ctx, cont in pairs):
        raise ValueError("every context and continuation must give at least one token")
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = [ctx + cont for ctx, cont in pairs[i : i + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=model.device)
        logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for j, (ctx, cont) in enumerate(pairs[i : i + batch_size]):
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=model.device)  # predict cont[k]
            target = torch.tensor(cont, device=model.device)
            lp = logprobs[j, pos]
            out.append({"logprob": lp.gather(-1, target[:, None]).sum().item(), "tokens": len(cont),
                        "greedy": bool((lp.argmax(-1) == target).all())})
    return out


def multiple_choice(model, tokenizer, questions, batch_size: int = 16) -> list[dict]:
    """Score multiple-choice ``questions`` (dicts with ``context``, ``choices``, ``label``) by log-likelihood:
    ``acc`` picks the choice with the largest log-probability, ``acc_norm`` the largest log-probability per byte of
    the choice's text (lm-evaluation-harness's two metrics). One dict per question."""
    if isinstance(questions, dict) or not isinstance(questions, (list, tuple)) or not questions:
        raise TypeError("questions must be a non-empty list of dicts with context, choices and label")
    for q in questions:
        if not isinstance(q, dict) or not {"context", "choices", "label"} <= q.keys():
            raise TypeError("each question must be a dict with context, choices and label")
        if not isinstance(q["choices"], (list, tuple)) or len(q["choices"]) < 2:
            raise ValueError(f"a question needs at least two choices, got {q['choices']!r}")
        if isinstance(q["label"], bool) or not isinstance(q["label"], int) or not 0 <= q["label"] < len(q["choices"]):
            raise ValueError(f"label must index the choices, got {q['label']!r}")
    contexts = [q["context"] for q in questions for _ in q["choices"]]
    continuations = [c for q in questions for c in q["choices"]]
    scored = iter(loglikelihood(model, tokenizer, contexts, continuations, batch_size))
    rows = []
    for q in questions:
        lls = [next(scored)["logprob"] for _ in q["choices"]]
        per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, q["choices"])]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=per_byte.__getitem__)
        rows.append({"kind": q.get("kind"), "logprobs": lls, "pred": pred, "pred_norm": pred_norm,
                     "label": q["label"], "acc": pred == q["label"], "acc_norm": pred_norm == q["label"]})
    return rows


def _swap_answer(task, choice: str) -> str:
    """The task's canonical response with its answer replaced by ``choice`` (the last mention of the answer)."""
    a = re.escape(task.answer)
    return re.sub(rf"\b{a}\b(?!.*\b{a}\b)", choice, task.response)


def _distractors(task, rng: random.Random, k: int) -> list[str]:
    from llmlab.data import COLORS, PLACES

    if task.answer.isdigit():
        n = int(task.answer)
        pool = [str(v) for v in range(max(0, n - 4), n + 5) if v != n]
    elif task.kind == "reverse":
        letters = task.answer.split()
        pool = {" ".join(letters[::-1])}  # the word itself, not reversed
        for _ in range(50):
            pool.add(" ".join(rng.sample(letters, len(letters))))
        pool = sorted(pool - {task.answer})
    else:
        pool = [w for w in (COLORS if task.kind == "color_qa" else PLACES) if w != task.answer]
    if len(pool) < k:  # a word of repeated letters can have few distinct shuffles
        pool = pool + [task.answer + " " + c for c in "xyz"][: k - len(pool)]
    return rng.sample(pool, k)


def multiple_choice_tasks(tokenizer, n: int, seed: int = 0, style: str = "qa", n_choices: int = 4,
                          kinds=None, answer_only: bool = False) -> list[dict]:
    """A multiple-choice suite from the course tasks (``llmlab.data.instruction_tasks``): the context is the
    task's prompt, the choices its canonical response with the right answer or a distractor (nearby numbers,
    other colors or places, other orders of the letters), in random order; with ``answer_only`` the choices are
    the bare answers (" 12", " purple"), as many benchmarks phrase them."""
    from llmlab import data, infer

    _count(n, "n")
    _count(n_choices, "n_choices", minimum=2)
    if not isinstance(answer_only, bool):
        raise TypeError(f"answer_only must be a bool, got {type(answer_only).__name__}")
    kinds = data.EXACT_TASKS if kinds is None else kinds
    rng = random.Random(f"multiple-choice-{seed}")
    questions = []
    for t in data.instruction_tasks(n, seed=seed, kinds=kinds):
        choices = [t.answer] + _distractors(t, rng, n_choices - 1)
        rng.shuffle(choices)
        questions.append({"kind": t.kind, "context": infer.format_prompt(tokenizer, t.prompt, style),
                          "choices": [" " + (c if answer_only else _swap_answer(t, c)) for c in choices],
                          "label": choices.index(t.answer)})
    return questions


# --------------------------------------------------------------- contamination --

def _ngrams(text: str, n: int) -> set:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(test_texts, corpus_texts, n: int = 8) -> list[float]:
    """For each test text, the fraction of its word n-grams (lower-cased, punctuation dropped) that occur anywhere
    in ``corpus_texts``: 1.0 means every n-gram was seen in training. GPT-3 (Brown et al. 2020) flagged a test item
    sharing any 13-gram with the training data; a text shorter than ``n`` words has no n-grams and gets 0.0."""
    test_texts, corpus_texts = _texts(test_texts, "test_texts"), _texts(corpus_texts, "corpus_texts")
    _count(n, "n")
    seen = set()
    for doc in corpus_texts:
        seen |= _ngrams(doc, n)
    out = []
    for t in test_texts:
        grams = _ngrams(t, n)
        out.append(len(grams & seen) / len(grams) if grams else 0.0)
    return out


# ------------------------------------------------------------------------- run --

def run(model, tokenizer, suite=None, n: int = 64, seed: int = 11, style: str | None = None, texts=None,
        max_new_tokens: int = 32, confidence: float = 0.95, kinds=None):
    """Evaluate ``model`` on the course suites; a pandas DataFrame with one row per metric: ``value``, ``ci_low``,
    ``ci_high`` (a ``confidence`` interval: Wilson for accuracies, bootstrap over examples otherwise) and ``n``.

    ``suite``: names from ``SUITES`` (default: every suite the model supports). ``perplexity`` scores ``texts``
    (default: ``n`` documents of the course's validation split), ``exact_match`` ``n`` course tasks
    (``kinds``, default the exact ones, plus gold reward), ``multiple_choice`` ``n`` questions from
    ``multiple_choice_tasks``. A llama.cpp model runs perplexity and exact match; a generation function only exact
    match (the other suites need log-probabilities)."""
    import pandas as pd

    from llmlab import data, infer

    hf, gguf = _is_hf(model), _is_llama_cpp(model)  # a llama.cpp model: perplexity and exact match
    if not (hf or gguf or callable(model)):
        raise TypeError(f"model must be a Hugging Face causal LM, a llama_cpp.Llama or a function prompts -> "
                        f"completions, got {type(model).__name__}")
    supported = SUITES if hf else ("perplexity", "exact_match") if gguf else ("exact_match",)
    suite = supported if suite is None else (suite,) if isinstance(suite, str) else tuple(suite)
    unknown = [s for s in suite if s not in SUITES]
    if unknown or not suite:
        raise ValueError(f"suite must name some of {SUITES}, got {suite!r}")
    unsupported = [s for s in suite if s not in supported]
    if unsupported:
        raise ValueError(f"{type(model).__name__} cannot run {unsupported}: they need token log-probabilities")
    _count(n, "n")
    _confidence(confidence)
    if style is None:
        style = infer.prompt_style(model, tokenizer) if hf else "qa"
    rows = []

    def add(metric, value, interval, count):
        rows.append({"metric": metric, "value": value, "ci_low": interval[0], "ci_high": interval[1], "n": count})

    if "perplexity" in suite:
        docs = data.corpus_split("validation", n) if texts is None else _texts(texts)
        nll = sequence_nll(model, docs, tokenizer)

        def ppl(rs):
            return math.exp(sum(r["nats"] for r in rs) / sum(r["tokens"] for r in rs))

        def bpb(rs):
            return sum(r["nats"] for r in rs) / math.log(2) / sum(r["bytes"] for r in rs)

        add("perplexity", ppl(nll), bootstrap_interval(nll, ppl, confidence, seed=seed), len(nll))
        add("bits per byte", bpb(nll), bootstrap_interval(nll, bpb, confidence, seed=seed), len(nll))
    if "exact_match" in suite:
        tasks = data.instruction_tasks(n, seed=seed, kinds=data.EXACT_TASKS if kinds is None else kinds)
        scored = exact_match(model, tokenizer, tasks, style, max_new_tokens)
        if any(r["correct"] is not None for r in scored):
            acc = accuracy(scored, confidence)
            add(f"exact match ({style})", acc["value"], (acc["ci_low"], acc["ci_high"]), acc["n"])
        rewards = [r["reward"] for r in scored]
        add(f"gold reward ({style})", sum(rewards) / len(rewards),
            bootstrap_interval(rewards, confidence=confidence, seed=seed), len(rewards))
    if "multiple_choice" in suite:
        mc = multiple_choice(model, tokenizer, multiple_choice_tasks(tokenizer, n, seed=seed, style=style))
        for metric in ("acc", "acc_norm"):
            hits = sum(r[metric] for r in mc)
            add(f"multiple choice {metric}", hits / len(mc), wilson_interval(hits, len(mc), confidence), len(mc))
    return pd.DataFrame(rows).set_index("metric")


# ------------------------------------------------------------ model-card scores --

_PINNED = re.compile(r"^https://github\.com/[^/\s]+/[^/\s]+/blob/[0-9a-f]{40}/\S+$")


def load_model_card_scores(path) -> dict:
    """Read the benchmark scores that developers report in their own model cards
    (``book/evaluation/model_card_scores.json``) and check their provenance.

    Every score needs a ``model``, a ``benchmark`` listed under ``benchmarks``, a
    percentage ``value`` in [0, 100], a ``source`` that is a GitHub file pinned to a
    40-hex commit, and the ``quote`` (the table row it was read from) must print the
    value. A benchmark's ``n`` is a positive int with an ``n_source`` URL, or null.
    Raises ``ValueError`` listing every problem. Chapter: Evaluation.
    """
    import json
    from pathlib import Path

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no model-card scores at {path}")
    data = json.loads(path.read_text())
    check_model_card_scores(data)
    return data


def check_model_card_scores(data: dict) -> int:
    """The provenance rules of ``load_model_card_scores`` on a loaded dict; returns how
    many scores passed. Chapter: Evaluation."""
    if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
        raise TypeError("expected a dict with a 'scores' list and a 'benchmarks' dict")
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, dict):
        raise TypeError("expected a dict with a 'scores' list and a 'benchmarks' dict")
    problems = []
    for name, b in benchmarks.items():
        n = b.get("n") if isinstance(b, dict) else "?"
        sourced = isinstance(b, dict) and str(b.get("n_source")).startswith("https://")
        if n is not None and not (isinstance(n, int) and n > 0 and sourced):
            problems.append(f"benchmark {name!r}: n needs a positive int, n_source")
    for i, s in enumerate(data["scores"]):
        where = f"scores[{i}]"
        if not isinstance(s, dict):
            problems.append(f"{where}: not a dict")
            continue
        v = s.get("value")
        if not s.get("model") or s.get("benchmark") not in benchmarks:
            problems.append(f"{where}: needs a model and a listed benchmark")
        if isinstance(v, bool) or not isinstance(v, Real) or not 0 <= v <= 100:
            problems.append(f"{where}: value {v!r} is not a percentage")
        elif f"{v:.1f}" not in str(s.get("quote", "")):
            problems.append(f"{where}: the quoted row does not print {v:.1f}")
        if not _PINNED.match(str(s.get("source", ""))):
            problems.append(f"{where}: source must be a GitHub file pinned to a commit")
    if problems:
        listed = "\n  ".join(problems)
        raise ValueError(f"model-card scores break the provenance rules:\n  {listed}")
    return len(data["scores"])
