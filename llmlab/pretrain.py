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

    opt = make_optimizer(model, r)
    gen = torch.Generator().manual_seed(r.seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=r.steps, desc="pretrain", mininterval=2)
    t0 = time.perf_counter()
    running = None
    for step in range(r.steps):
        loss = train_step(model, opt, rows, step, r, gen)
        running = loss if running is None else 0.9 * running + 0.1 * loss
        if step % log_every == 0 or step == r.steps - 1:
            history["step"].append(step)
            history["train_loss"].append(loss)
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


# ------------------------------------------------------------------------------------------------------------
# The pretraining chapter's pieces, one at a time: the loss by hand, the training step that ``train`` runs, a
# checkpoint that resumes exactly, gradient clipping, dynamic loss scaling for fp16 and an FP8 round trip. The
# tests check each against the library it explains (transformers' loss, torch's clip_grad_norm_, GradScaler).

def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_recipe(r):
    if not isinstance(r, Recipe):
        raise TypeError(f"r must be a llmlab.pretrain.Recipe, got {type(r).__name__}")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits against the *next* token: -log softmax(logits[t])[ids[t+1]],
    averaged (or summed) over positions whose target is not ``ignore_index``. Chapter: Pretraining."""
    if not isinstance(logits, torch.Tensor) or not isinstance(input_ids, torch.Tensor):
        raise TypeError("logits and input_ids must be tensors")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (batch, seq, vocab) and input_ids (batch, seq); got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logp = logits[:, :-1].float().log_softmax(-1)
    targets = input_ids[:, 1:]
    keep = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    total = -(picked * keep).sum()
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)


def init_model(r: Recipe, tokenizer):
    """The freshly initialised Llama ``train`` starts from (seeded the same way). Chapter: Pretraining."""
    from transformers import LlamaForCausalLM

    from llmlab.env import set_seed

    _check_recipe(r)
    set_seed(r.seed, threads=r.threads)
    return LlamaForCausalLM(llama_config(r, tokenizer))


def make_optimizer(model, r: Recipe):
    """AdamW as in ``train``: weight decay on matrices only, betas (0.9, 0.95). Chapter: Pretraining."""
    _check_model(model)
    _check_recipe(r)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))


def train_step(model, optimizer, rows: torch.Tensor, step: int, r: Recipe, generator: torch.Generator) -> float:
    """One step of ``train``'s loop (``train`` calls it): draw a batch with ``generator``, set
    the learning rate to ``lr_at(step)``, forward, backward, clip to norm 1, AdamW. Returns the loss.
    Chapter: Pretraining."""
    _check_model(model)
    _check_recipe(r)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    model.train()
    x = rows[torch.randint(len(rows), (r.batch_size,), generator=generator)]
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, r)
    loss = model(input_ids=x, labels=x).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def save_checkpoint(path, model, optimizer, step: int, generator: torch.Generator) -> Path:
    """Everything a run needs to continue as if never stopped: weights, optimizer moments, the step (the
    learning-rate schedule is a function of it), the data sampler's generator and torch's global RNG state.
    Chapter: Pretraining."""
    _check_model(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    path = Path(path)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": int(step),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, path)
    return path


def load_checkpoint(path, model, optimizer, generator: torch.Generator) -> int:
    """Restore what ``save_checkpoint`` wrote into ``model``, ``optimizer`` and ``generator``; return the step.
    Chapter: Pretraining."""
    _check_model(model)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (total_norm + 1e-6)), total_norm the L2 norm of all of them
    together; return total_norm. What ``torch.nn.utils.clip_grad_norm_`` does. Chapter: Pretraining."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        raise ValueError("no parameter has a gradient")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


class LossScaler:
    """Dynamic loss scaling for fp16, from scratch (what ``torch.amp.GradScaler`` does). Multiply the loss by
    ``scale`` so small gradients do not underflow fp16; divide the gradients by it before the step; if any is
    inf or nan, skip the step and halve the scale; after ``growth_interval`` good steps in a row, double it.
    Chapter: Pretraining."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        for name, v in (("init_scale", init_scale), ("growth_factor", growth_factor)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be positive, got {v!r}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0
        self.found_inf = False
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer) -> bool:
        """Divide every gradient by the scale (in fp32, exact for powers of two); record whether any is inf/nan."""
        inv = torch.tensor(self.scale_value, dtype=torch.float64).reciprocal().float()
        self.found_inf = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if not torch.isfinite(p.grad).all():
                        self.found_inf = True
                    p.grad.mul_(inv)
        return self.found_inf

    def step(self, optimizer) -> bool:
        """Unscale and step; skip the step if a gradient overflowed. Returns whether the step was taken."""
        self.unscale_(optimizer)
        if self.found_inf:
            self.skipped += 1
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.good_steps = 0


FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_roundtrip(x: torch.Tensor, fmt: str = "e4m3", scaled: bool = True) -> torch.Tensor:
    """``x`` cast to FP8 and back to its dtype. With ``scaled``, per-tensor scaling as FP8 training recipes do:
    multiply by (largest FP8 value / max |x|) before the cast, divide after, so the tensor uses the format's whole
    range. Values beyond the range saturate to its largest value rather than overflow. Chapter: Pretraining."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    dtype = FP8_FORMATS[fmt]
    fmax = torch.finfo(dtype).max
    xf = x.float()
    scale = fmax / xf.abs().max().clamp(min=1e-12) if scaled else torch.tensor(1.0)
    q = (xf * scale).clamp(-fmax, fmax).to(dtype)
    return (q.float() / scale).to(x.dtype)
