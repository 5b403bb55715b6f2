"""The Reasoning chapter's experiments: a model trained on step-by-step traces, sampled, and scored.

Chapter: Reasoning (test-time compute and RL with verifiable rewards), and Lab 5. Where
``llmlab.reasoning`` holds the estimators and GRPO, and ``llmlab.data`` the tasks, traces
and verifier, this module runs them on a model:

* ``sft_on_tasks`` fine-tunes a causal LM in full on chat turns whose answer is the trace
  (``traces=True``) or the bare answer line (``False``): loss on the answer's tokens only,
  AdamW with a cosine schedule, a plain loop (trl's ``SFTTrainer`` with an assistant-only
  loss computes the same loss);
* ``sample_tasks`` draws ``n`` completions per task (greedy when ``temperature=0``) and
  ``score_samples`` verifies them: the counts ``pass_at_k`` needs, the majority answer, the
  tokens spent;
* ``run`` is the stored long run (``python -m llmlab.scratchpad --out FILE``): both SFT
  variants at equal steps (the traces model is saved as the shipped checkpoint), GRPO
  from it with its health signals, more SFT for GRPO's wall time, and GRPO from an
  earlier checkpoint with and without a format reward; every evaluation on
  ``held_out_tasks()``, with provenance.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llmlab.data import (
    MARKER,
    REASONING_TASKS,
    Task,
    direct_answer,
    extract_final_answer,
    reasoning_tasks,
)


def _tasks(tasks, name="tasks") -> list[Task]:
    if isinstance(tasks, (str, Task)) or not isinstance(tasks, Sequence):
        raise TypeError(f"{name} must be a list of llmlab.data.Task, got {type(tasks).__name__}")
    if not tasks:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise TypeError(f"{name}[{i}] must be a llmlab.data.Task, got {type(t).__name__}")
    return list(tasks)


def _int(v, name, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _float(v, name, minimum=0.0, open_low=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < minimum or (open_low and v == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if open_low else '>='} "
                         f"{minimum}, got {v!r}")
    return float(v)


def _model(model):
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the first of ``llmlab.infer.END_OF_TURN``
    the vocabulary has (the course's ``<|end|>``, ChatML's ``<|im_end|>``), else EOS."""
    from llmlab.infer import END_OF_TURN

    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in vocab:
            return vocab[t]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an end-of-turn token nor an EOS")
    return tokenizer.eos_token_id


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn followed by the assistant's header (what the model continues)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_example(tokenizer, task: Task, traces: bool = True) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: the prompt turn's ids then the answer's (the trace, or
    ``direct_answer``) closed by the end-of-turn token; the loss covers ``ids[n_prompt:]``.
    The answer is tokenized on its own, as the model will produce it token by token."""
    prompt = tokenizer.encode(chat_prompt(tokenizer, task.prompt), add_special_tokens=False)
    answer = task.response if traces else direct_answer(task)
    return prompt + tokenizer.encode(answer, add_special_tokens=False) + \
        [end_of_turn_id(tokenizer)], len(prompt)


def _batch(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return ids, mask, labels


def sft_on_tasks(model, tokenizer, tasks, *, traces: bool = True, steps: int = 300,
                 batch_size: int = 16, lr: float = 1e-3, warmup: int = 10, seed: int = 0,
                 log_every: int = 10, stop_after: int | None = None) -> dict:
    """Fine-tune ``model`` in place on ``tasks`` as chat turns; return the history.

    Each step takes the next ``batch_size`` tasks (cycling; shuffled once with ``seed``);
    the loss is the mean cross-entropy over the answer tokens (trace or bare answer line,
    and the end-of-turn token). AdamW (weight decay 0), linear warmup over ``warmup``
    steps then cosine decay to 0 at ``steps``. Returns ``{"step": [...], "loss": [...],
    "seconds": wall time, "answer_tokens": tokens the loss saw}`` (loss logged every
    ``log_every`` steps and at the last). ``stop_after``: stop after that many steps of
    the ``steps``-long schedule (a run's first steps, to check them against a stored
    run). Chapter: Reasoning (SFT on traces vs answers).
    """
    _model(model)
    tasks = _tasks(tasks)
    steps, batch_size = _int(steps, "steps"), _int(batch_size, "batch_size")
    warmup, log_every = _int(warmup, "warmup", 0), _int(log_every, "log_every")
    lr = _float(lr, "lr", open_low=True)
    if not isinstance(traces, bool):
        raise TypeError(f"traces must be a bool, got {type(traces).__name__}")
    last = steps if stop_after is None else min(steps, _int(stop_after, "stop_after"))
    gen = torch.Generator().manual_seed(_int(seed, "seed", 0))
    order = torch.randperm(len(tasks), generator=gen).tolist()
    rows = [encode_example(tokenizer, tasks[i], traces) for i in order]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)

    def factor(step):  # LambdaLR: step 0 is the first update
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history = {"step": [], "loss": [], "answer_tokens": 0}
    model.train()
    start = time.perf_counter()
    for step in range(last):
        chunk = [rows[(step * batch_size + j) % len(rows)] for j in range(batch_size)]
        ids, mask, labels = (t.to(device) for t in _batch(chunk, pad))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history["answer_tokens"] += int((labels[:, 1:] != -100).sum())
        if (step + 1) % log_every == 0 or step == 0 or step == last - 1:
            history["step"].append(step + 1)
            history["loss"].append(loss.item())
    history["seconds"] = time.perf_counter() - start
    model.eval()
    return history


@torch.no_grad()
def sample_tasks(model, tokenizer, tasks, n: int = 1, *, temperature: float = 1.0,
                 max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """``n`` completions to each task's prompt (a chat turn): greedy when
    ``temperature == 0`` (then ``n`` must be 1), else sampled at ``temperature`` from the
    full distribution (no top-k or top-p), stopping at the end of the turn.

    Returns one dict per task: ``completions`` (``n`` strings) and ``tokens`` (the tokens
    each one cost, the closing token included). Seeded: ``torch.manual_seed(seed)`` (the
    global generator, which ``generate`` draws from) before the first batch, so the same
    machine and the same ``batch_size`` draw the same samples (``batch_size // n`` prompts
    go into one ``generate`` call, and the batching changes which draws each sample gets).
    Chapter: Reasoning (pass@k, majority vote, best-of-N).
    """
    _model(model)
    tasks = _tasks(tasks)
    n, max_new_tokens = _int(n, "n"), _int(max_new_tokens, "max_new_tokens")
    batch_size = _int(batch_size, "batch_size")
    temperature = _float(temperature, "temperature")
    if temperature == 0 and n > 1:
        raise ValueError("greedy decoding (temperature=0) gives one completion: use n=1")
    stop = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    torch.manual_seed(_int(seed, "seed", 0))
    side = tokenizer.padding_side
    prompts = [chat_prompt(tokenizer, t.prompt) for t in tasks]
    per_batch = max(1, batch_size // n)  # prompts per generate call
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    out = []
    try:
        tokenizer.padding_side = "left"
        for i in range(0, len(prompts), per_batch):
            enc = tokenizer(prompts[i : i + per_batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=pad, eos_token_id=stop, **sampling)
            new = ids[:, enc["input_ids"].shape[1]:]
            for j in range(0, len(new), n):
                rows = new[j : j + n]
                texts, tokens = [], []
                for row in rows:
                    ended = (row == stop).nonzero()
                    length = int(ended[0]) + 1 if len(ended) else len(row)
                    tokens.append(length)
                    texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
                out.append({"completions": texts, "tokens": tokens})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def score_samples(tasks, samples) -> list[dict]:
    """Verify ``sample_tasks``' output: one dict per task with ``kind``, ``answer``,
    ``answers`` (each completion's final answer or None), ``correct`` (bools), ``c`` (how
    many are right: pass@k's count), ``n``, ``majority`` (the most common answer,
    ``llmlab.reasoning.majority_vote``), ``majority_correct`` and ``tokens``."""
    from llmlab.reasoning import majority_vote

    tasks = _tasks(tasks)
    if isinstance(samples, (str, dict)) or len(samples) != len(tasks):
        raise ValueError("samples must be sample_tasks' list, one entry per task")
    rows = []
    for task, s in zip(tasks, samples, strict=True):
        answers = [extract_final_answer(c) for c in s["completions"]]
        correct = [a == task.answer for a in answers]
        vote = majority_vote(answers)
        rows.append({"kind": task.kind, "answer": task.answer, "answers": answers,
                     "correct": correct, "c": sum(correct), "n": len(correct),
                     "majority": vote, "majority_correct": vote == task.answer,
                     "tokens": list(s["tokens"])})
    return rows


def has_marker(completion: str) -> bool:
    """Whether ``completion`` states a final answer at all (``llmlab.data.MARKER``)."""
    return MARKER.lower() in completion.lower()


# ------------------------------------------------------- the shipped model --
#
# The course model after SFT on traces (``SFT_RECIPE``), shipped so that the chapter and
# Lab 5 sample from it without training it first: its weights in float16 (loaded as
# float32) and its provenance beside them. ``python -m llmlab.scratchpad`` remakes it.

ASSETS = Path(__file__).parent / "assets" / "reasoning"
SFT_RECIPE = {"kinds": list(REASONING_TASKS), "traces": True, "steps": 400, "batch_size": 16,
              "lr": 3e-3, "warmup": 10, "seed": 0, "train_seed": 1, "eval_seed": 11,
              "n_eval": 128}


def held_out_tasks(n: int | None = None) -> list[Task]:
    """The held-out reasoning tasks every result in the chapter and Lab 5 is measured on
    (``reasoning_tasks`` with ``eval_seed``; the first ``n`` of ``n_eval``, kinds
    alternating). Training tasks exclude all of them."""
    total = SFT_RECIPE["n_eval"]
    n = total if n is None else _int(n, "n")
    if n > total:
        raise ValueError(f"n must be <= {total}, the held-out set's size, got {n}")
    return reasoning_tasks(total, seed=SFT_RECIPE["eval_seed"])[:n]


def training_tasks(n: int, seed: int | None = None) -> list[Task]:
    """``n`` reasoning tasks disjoint from ``held_out_tasks()`` (seed: ``train_seed``)."""
    seed = SFT_RECIPE["train_seed"] if seed is None else seed
    return reasoning_tasks(_int(n, "n"), seed=seed, exclude=held_out_tasks())


def save_model(model, folder, provenance: dict, name: str = "sft-traces") -> Path:
    """Write ``model``'s weights as ``<name>.safetensors`` (float16) and ``provenance``
    as ``<name>.json`` in ``folder``."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous().cpu()
               for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return folder / f"{name}.safetensors"


def load_model(name: str = "sft-traces", folder=None):
    """``(model, tokenizer, provenance)``: the course model with the weights ``name``
    from ``folder`` (default: the shipped ``llmlab/assets/reasoning``), float32, eval
    mode, on the GPU when there is one. Chapter: Reasoning; Lab 5 (cpu profile)."""
    import json

    from safetensors.torch import load_file

    from llmlab.env import COURSE_MODEL
    from llmlab.models import load

    folder = Path(ASSETS if folder is None else folder)
    path = folder / f"{name}.safetensors"
    if not isinstance(name, str) or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.safetensors"))
        raise ValueError(f"no reasoning checkpoint {name!r} in {folder}; known: {known}")
    model, tok = load(COURSE_MODEL, dtype="float32")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, tok, json.loads((folder / f"{name}.json").read_text())


# ---------------------------------------------------------- the stored run --

def summarize(tasks, rows) -> dict:
    """Accuracy per kind and overall (``c``/``n`` of the first sample of each task, or
    of greedy rows), the mean tokens per completion: a JSON-able digest."""
    out = {"n": len(rows), "right": sum(r["correct"][0] for r in rows),
           "tokens_per_completion": sum(sum(r["tokens"]) for r in rows)
           / sum(len(r["tokens"]) for r in rows)}
    for kind in sorted({t.kind for t in tasks}):
        kr = [r for r in rows if r["kind"] == kind]
        out[kind] = {"n": len(kr), "right": sum(r["correct"][0] for r in kr)}
    return out


GRPO_RECIPE = {"steps": 120, "prompts_per_step": 8, "group_size": 8, "lr": 3e-5,
               "max_new_tokens": 64, "temperature": 1.0, "format_weight": 0.25,
               "loss_type": "dapo", "beta": 0.0, "seed": 0, "task_seed": 2, "eval_every": 60}
# the gamed run starts from an earlier SFT checkpoint (``sft_steps``), whose samples are
# rarely right: groups whose answers are all wrong then differ only in the format reward
GAMED_RECIPE = {"sft_steps": 300, "steps": 30, "prompts_per_step": 8, "group_size": 8,
                "lr": 1e-4, "max_new_tokens": 64, "temperature": 1.0, "format_weight": 0.25,
                "seed": 0, "task_seed": 3}
SAMPLES = 16  # completions per held-out task for pass@k and majority vote


def _verifier_for(tokenizer, tasks):
    from llmlab.data import format_reward, verify

    by_prompt = {chat_prompt(tokenizer, t.prompt): t for t in tasks}

    def correct(prompt, completion):
        return float(verify(by_prompt[prompt], completion))

    def formatted(prompt, completion):
        return format_reward(completion)

    return by_prompt, correct, formatted


def evaluate_model(model, tokenizer, tasks, samples: int = SAMPLES, seed: int = 0) -> dict:
    """Greedy rows and ``samples`` sampled rows (temperature 1) on ``tasks``, digested:
    greedy accuracy, per-task correct counts ``c`` for pass@k, majority-vote hits,
    tokens. What the stored run keeps for every model it evaluates."""
    greedy = score_samples(tasks, sample_tasks(model, tokenizer, tasks, 1, temperature=0))
    sampled = score_samples(tasks, sample_tasks(model, tokenizer, tasks, samples,
                                                temperature=1.0, seed=seed))
    return {"greedy": summarize(tasks, greedy),
            "greedy_correct": [r["correct"][0] for r in greedy],
            "c": [r["c"] for r in sampled], "n": samples,
            "majority_correct": [r["majority_correct"] for r in sampled],
            "tokens_per_sample": sum(sum(r["tokens"]) for r in sampled)
            / (samples * len(sampled))}


def _grpo(model, tokenizer, recipe, reward_fns, weights, tasks, log, extra=None):
    from llmlab.reasoning import GRPO

    grpo = GRPO(model, tokenizer, reward_fns, reward_weights=weights,
                group_size=recipe["group_size"], lr=recipe["lr"],
                max_new_tokens=recipe["max_new_tokens"],
                temperature=recipe["temperature"], seed=recipe["seed"],
                loss_type=recipe.get("loss_type", "dapo"), beta=recipe.get("beta", 0.0),
                eos_token_id=end_of_turn_id(tokenizer))
    prompts = [chat_prompt(tokenizer, t.prompt) for t in tasks]
    p = recipe["prompts_per_step"]
    start = time.perf_counter()
    for step in range(recipe["steps"]):
        metrics = grpo.step(prompts[step * p:(step + 1) * p])
        row = {"step": step + 1, **{k: v for k, v in metrics.items()
                                     if not k.startswith("clip_ratio/")}}
        if extra is not None:
            row.update(extra(grpo.last_batch))
        log(row)
    return time.perf_counter() - start


def early_checkpoint_grpo(train, held, format_weight: float) -> dict:
    """GRPO (``GAMED_RECIPE``) from the traces model after ``sft_steps`` SFT steps, with
    the verifier's reward plus ``format_weight`` x the format reward: per-step signals,
    and the held-out evaluation before and after. The stored run's gamed run and its
    control (``format_weight=0``)."""
    from llmlab.models import COURSE_MODEL_DIR, load

    r, gr = SFT_RECIPE, GAMED_RECIPE
    model, tok = load(str(COURSE_MODEL_DIR), dtype="float32")
    sft_on_tasks(model, tok, train[: gr["sft_steps"] * r["batch_size"]],
                 steps=gr["sft_steps"], batch_size=r["batch_size"], lr=r["lr"],
                 warmup=r["warmup"], seed=r["seed"])
    before = evaluate_model(model, tok, held)
    tasks = reasoning_tasks(gr["steps"] * gr["prompts_per_step"], seed=gr["task_seed"],
                            exclude=held)
    _, correct, formatted = _verifier_for(tok, tasks)
    fns, weights = ([correct, formatted], [1.0, format_weight]) if format_weight else \
        ([correct], [1.0])
    steps = []
    _grpo(model, tok, gr, fns, weights, tasks, steps.append)
    return {"format_weight": format_weight, "steps": steps, "before": before,
            "after": evaluate_model(model, tok, held)}


def run(out, assets=None, threads: int = 1, log=print) -> dict:
    """The stored run of the Reasoning chapter; writes JSON to ``out`` after each stage.

    1. SFT of the course model on traces and on bare answers (``SFT_RECIPE``, equal
       steps), greedy accuracy on ``held_out_tasks()``; the traces model is saved to
       ``assets`` (float16) and everything after starts from that saved file.
    2. Before RL: greedy and ``SAMPLES`` samples per held-out task.
    3. GRPO (``GRPO_RECIPE``): verifier correctness + ``format_weight`` x format reward;
       every step's health signals; evaluated every ``eval_every`` steps.
    4. Equal budget: SFT on more traces from the same start for GRPO's wall time.
    5. A format reward gamed (``GAMED_RECIPE``): the same rewards from an earlier SFT
       checkpoint, whose samples are rarely right; and its control without the format
       reward (``early_checkpoint_grpo``).
    """
    import json
    import platform

    import transformers

    from llmlab.env import set_seed
    from llmlab.models import COURSE_MODEL_DIR, load

    out = Path(out)
    set_seed(0, threads=threads)
    held = held_out_tasks()
    result = {"provenance": {
        "command": "python -m llmlab.scratchpad --out book/alignment/reasoning-run.json",
        "hardware": f"{platform.machine()}, {threads} CPU thread(s), shared machine",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d")},
        "sft_recipe": SFT_RECIPE, "grpo_recipe": GRPO_RECIPE, "gamed_recipe": GAMED_RECIPE,
        "samples": SAMPLES, "held_out": len(held)}

    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    r = SFT_RECIPE
    train = training_tasks(r["steps"] * r["batch_size"])
    result["sft"] = {}
    for traces in (True, False):
        model, tok = load(str(COURSE_MODEL_DIR), dtype="float32")
        hist = sft_on_tasks(model, tok, train, traces=traces, steps=r["steps"],
                            batch_size=r["batch_size"], lr=r["lr"], warmup=r["warmup"],
                            seed=r["seed"])
        name = "traces" if traces else "direct"
        if traces:
            save_model(model, ASSETS if assets is None else assets,
                       {"recipe": r, "base": "llmlab/course-model", "stored_dtype": "float16",
                        "train_loss_last": hist["loss"][-1], "wall_time_s": hist["seconds"],
                        **result["provenance"],
                        "reproduce": "python -m llmlab.scratchpad --out FILE"})
            model = load_model(folder=assets)[0]
        rows = score_samples(held, sample_tasks(model, tok, held, 1, temperature=0))
        result["sft"][name] = {"history": hist, "greedy": summarize(held, rows),
                               "greedy_correct": [x["correct"][0] for x in rows]}
        log(f"SFT {name}: {result['sft'][name]['greedy']}")
        save()

    model, tok, _ = load_model(folder=assets)
    result["before"] = evaluate_model(model, tok, held)
    log(f"before RL: greedy {result['before']['greedy']['right']}")
    save()

    g = GRPO_RECIPE
    rl_tasks = reasoning_tasks(g["steps"] * g["prompts_per_step"], seed=g["task_seed"],
                               exclude=held)
    _, correct, formatted = _verifier_for(tok, rl_tasks)
    steps_log, evals, eval_seconds = [], {}, []

    def grpo_log(row):
        steps_log.append(row)
        if row["step"] % g["eval_every"] == 0:
            start = time.perf_counter()
            evals[row["step"]] = evaluate_model(model, tok, held)
            eval_seconds.append(time.perf_counter() - start)
            log(f"GRPO step {row['step']}: greedy {evals[row['step']]['greedy']['right']}")
            result["grpo"] = {"steps": steps_log, "evals": evals}
            save()

    seconds = _grpo(model, tok, g, [correct, formatted], [1.0, g["format_weight"]],
                    rl_tasks, grpo_log) - sum(eval_seconds)  # training time only
    result["grpo"] = {"steps": steps_log, "evals": evals, "seconds": seconds}
    save()

    # equal budget: more SFT on traces from the same start, for GRPO's wall time
    model, tok, _ = load_model(folder=assets)
    probe = sft_on_tasks(model, tok, train[:16 * 20], steps=20, batch_size=16, lr=1e-4,
                         warmup=0)
    model, tok, _ = load_model(folder=assets)
    more_steps = max(1, round(seconds / (probe["seconds"] / 20)))
    result["sft_probe_seconds_per_step"] = probe["seconds"] / 20
    more = reasoning_tasks(more_steps * 16, seed=4, exclude=held)
    hist = sft_on_tasks(model, tok, more, steps=more_steps, batch_size=16, lr=3e-4,
                        warmup=0, seed=1)
    result["sft_more"] = {"steps": more_steps, "lr": 3e-4, "history": hist,
                          "eval": evaluate_model(model, tok, held)}
    log(f"SFT more ({more_steps} steps): {result['sft_more']['eval']['greedy']['right']}")
    save()

    # a format reward gamed: GRPO from an earlier SFT checkpoint with the same rewards, and
    # the control: the same run without the format reward
    for key, weight in (("gamed", GAMED_RECIPE["format_weight"]), ("gamed_control", 0.0)):
        result[key] = early_checkpoint_grpo(train, held, weight)
        log(f"{key}: greedy {sum(result[key]['before']['greedy_correct'])} -> "
            f"{sum(result[key]['after']['greedy_correct'])}")
        save()
    return result


if __name__ == "__main__":  # python -m llmlab.scratchpad --out FILE [--assets DIR]
    import argparse

    parser = argparse.ArgumentParser(description="The Reasoning chapter's stored run.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    run(a.out, a.assets, a.threads)
