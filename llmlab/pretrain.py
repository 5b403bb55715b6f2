"""The course model's pretraining recipe: corpus -> tokenizer -> Llama -> training loop -> model card.

Run once to make the shipped checkpoint (``python -m llmlab.pretrain --out llmlab/assets/course-model``); the
tests run a few steps of the same recipe and re-measure the shipped card's validation loss. The pretraining
chapter reads this file top to bottom.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Recipe:
    """Everything that decides the course model. Widths are multiples of 256 (k-quant and int4 group sizes)."""
    vocab_size: int = 768          # the BPE stops near 730 merges on this small world; padded to 3*256
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2   # grouped-query attention: 4 query heads share each K/V head
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    train_docs: int = 150_000
    tokenizer_docs: int = 20_000
    val_docs: int = 1_000
    threads: int = 2


def llama_config(r: Recipe, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=r.vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_hidden_layers, num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_key_value_heads, max_position_embeddings=r.max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pack(docs, tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of ``seq_len`` tokens."""
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"too little text for one row of {seq_len} tokens")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over ``rows``, every token weighted equally."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size].to(model.device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def validation_rows(tokenizer, r: Recipe = Recipe()) -> torch.Tensor:
    from llmlab.data import corpus_split

    return pack(corpus_split("validation", r.val_docs), tokenizer, r.seq_len)


def lr_at(step: int, r: Recipe) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(r: Recipe = Recipe(), tokenizer=None, log_every: int = 50, eval_every: int = 250, progress=True):
    """Run the recipe; return ``(model, tokenizer, history)``. ``history`` holds train and validation losses."""
    from transformers import LlamaForCausalLM

    from llmlab.data import corpus_split
    from llmlab.env import set_seed
    from llmlab.tokenization import train_tokenizer

    if r.steps < 1 or r.batch_size < 1 or r.seq_len < 2:
        raise ValueError("steps, batch_size must be >= 1 and seq_len >= 2")
    set_seed(r.seed, threads=r.threads)
    train_docs = corpus_split("train", r.train_docs)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs[: r.tokenizer_docs], vocab_size=r.vocab_size)
    if len(tokenizer) > r.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={r.vocab_size}")
    rows = pack(train_docs, tokenizer, r.seq_len)
    val = validation_rows(tokenizer, r)
    model = LlamaForCausalLM(llama_config(r, tokenizer))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(r.seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=r.steps, desc="pretrain", mininterval=2)
    t0 = time.perf_counter()
    running = None
    for step in range(r.steps):
        model.train()
        idx = torch.randint(len(rows), (r.batch_size,), generator=gen)
        x = rows[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % log_every == 0 or step == r.steps - 1:
            history["step"].append(step)
            history["train_loss"].append(loss.item())
        if (step + 1) % eval_every == 0 or step == r.steps - 1:
            history["val_step"].append(step + 1)
            history["val_loss"].append(evaluate(model, val))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
    if bar is not None:
        bar.close()
    history["wall_time_s"] = time.perf_counter() - t0
    history["tokens_seen"] = r.steps * r.batch_size * r.seq_len
    history["train_rows"] = len(rows)
    model.eval()
    return model, tokenizer, history


CARD_TEMPLATE = """---
license: mit
language: en
library_name: transformers
pipeline_tag: text-generation
---
# llmlab course model

A {n_params:,}-parameter Llama (grouped-query attention) pretrained from scratch on the course's synthetic
world (`llmlab.data`): short stories, arithmetic up to 20, letter puzzles and question/answer lines. It is
the model every CPU lab uses; it knows nothing outside that world.

| | |
|---|---|
| architecture | Llama, {num_hidden_layers} layers, hidden {hidden_size}, MLP {intermediate_size}, {num_attention_heads} query / {num_key_value_heads} key-value heads, vocab {vocab_size} |
| tokenizer | byte-level BPE trained with `tokenizers` on {tokenizer_docs:,} corpus documents ({n_tokens} tokens in use) |
| recipe | `llmlab.pretrain.Recipe` (below); AdamW, peak lr {lr}, cosine, {warmup} warmup steps |
| steps | {steps:,} x {batch_size} x {seq_len} tokens |
| tokens seen | {tokens_seen:,} |
| validation loss | {val_loss:.4f} nats/token ({val_docs:,} validation documents, seed 1) |
| wall time | {wall_time_min:.1f} min |
| hardware | {hardware} |
| software | torch {torch}, transformers {transformers} |
| date | {date} |

Recipe: `{recipe}`

Reproduce: `python -m llmlab.pretrain --out DIR`. The tests reload this checkpoint and re-measure the validation
loss (`card.json` holds the numbers above).

## Samples (greedy, from the first words)
{samples}
"""


def sample(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    x = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


SAMPLE_PROMPTS = ["Mia has a", "One day, Leo goes to the", "7 plus 5 is", "Question: Which is bigger, 3 or 9? Answer:"]


def cpu_name() -> str:
    """The CPU model for the model card (``/proc/cpuinfo`` on Linux, else the platform's machine type)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_checkpoint(model, tokenizer, history, r: Recipe, out: Path):
    import datetime

    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    samples = {p: sample(model, tokenizer, p) for p in SAMPLE_PROMPTS}
    card = {
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_tokens": len(tokenizer),
        "val_loss": history["val_loss"][-1],
        "wall_time_min": history["wall_time_s"] / 60,
        "tokens_seen": history["tokens_seen"],
        "hardware": f"{cpu_name()}, {torch.get_num_threads()} CPU threads, no GPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "recipe": asdict(r),
        "history": {k: v for k, v in history.items() if isinstance(v, list)},
        "samples": samples,
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    fields = {**asdict(r), **{k: v for k, v in card.items() if k not in ("recipe", "samples", "history")}}
    fields["recipe"] = json.dumps(asdict(r))
    fields["samples"] = "\n".join(f"- `{p}` -> {s!r}" for p, s in samples.items())
    (out / "README.md").write_text(CARD_TEMPLATE.format(**fields))
    return card


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain the llmlab course model.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--threads", type=int, default=Recipe.threads)
    a = ap.parse_args(argv)
    r = Recipe(steps=a.steps, threads=a.threads)
    model, tok, hist = train(r)
    card = write_checkpoint(model, tok, hist, r, Path(a.out))
    print(json.dumps({k: card[k] for k in ("n_params", "val_loss", "wall_time_min", "tokens_seen")}))
    for p, s in card["samples"].items():
        print(repr(s))


if __name__ == "__main__":
    main()
