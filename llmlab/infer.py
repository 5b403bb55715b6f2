"""Generating text and scoring it: batched greedy generation and the course tasks' accuracy and reward.

Used by the course-loop lab and by every lab that compares models (quantization, fine-tuning, alignment).
Two prompt styles: ``qa`` is how the base course model saw tasks in pretraining ("Question: ... Answer:");
``chat`` applies the tokenizer's chat template (instruction-tuned models). ``prompt_style`` picks one.
"""
from __future__ import annotations

from pathlib import Path

PROMPT_STYLES = ("qa", "chat")
END_OF_TURN = ("<|end|>",)  # the course chat template closes each turn with it


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
