"""Knowledge distillation: a small student learns from a large teacher's whole next-token distribution.

A hard label says only which token came next; the teacher's distribution also says how plausible every other
token was (Hinton et al., 2015, call this the "dark knowledge"). Read top to bottom: the divergences between
two next-token distributions given as logits (``forward_kl``, ``reverse_kl`` and the generalized Jensen-Shannon
divergence of GKD, Agarwal et al., 2024, checked in the tests against ``torch.nn.functional.kl_div`` and trl's
``GKDTrainer.generalized_jsd_loss``), the classic distillation loss that mixes the soft and the hard term,
``student_config`` (a smaller Llama with the teacher's tokenizer), the training loop ``distill``, and
``compare_students``, the chapter's experiment: a student trained on hard labels against the same student
distilled, for the same number of steps. ``python -m llmlab.distill --out FILE`` runs the long version once and
writes its numbers with their provenance; the chapter re-runs a short prefix live.

Chapter: Distillation and pruning.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from numbers import Real

import torch
import torch.nn.functional as F

from llmlab.transformer import _int  # the argument checks the from-scratch Llama uses

REDUCTIONS = ("batchmean", "sum", "mean", "none")
LOSSES = ("forward_kl", "reverse_kl", "jsd")


# ------------------------------------------------------------------ checks --

def _logits_pair(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be floating-point logits (..., vocab), got {x.dtype} {tuple(x.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)} (same tokenizer, same inputs?)")


def _real(v, name, low, high, low_open=False):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (low < v if low_open else low <= v) or v > high or math.isnan(v):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {v}")
    return float(v)


def _reduce(per_token, labels, reduction):
    """``per_token`` is (..., vocab) pointwise terms; reduce the way trl's GKD loss does."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != per_token.shape[:-1]:
            raise ValueError("labels must be a tensor shaped like the logits without the vocab axis")
        mask = labels != -100
        per_token = per_token[mask]
    if reduction == "batchmean":  # per sequence position summed over the vocab, averaged over batch (or tokens)
        denom = mask.sum().clamp_min(1) if labels is not None else max(per_token.size(0), 1)
        return per_token.sum() / denom
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":  # over every element, vocab included: torch's (surprising) "mean"
        return per_token.mean()
    return per_token


# ------------------------------------------------------------- divergences --
#
# KL(p || q) = sum_v p_v (log p_v - log q_v). Forward KL, KL(teacher || student), is "mean-seeking": the student
# is punished wherever the teacher has mass it lacks. Reverse KL, KL(student || teacher), is "mode-seeking": the
# student is punished for mass where the teacher has none. Both are computed from log-probabilities at the
# same temperature, pointwise over the vocab, then reduced.

def _log_probs(logits, temperature):
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logits, teacher_logits, labels=None, temperature: float = 1.0, reduction="batchmean"):
    """KL(teacher_T || student_T), the divergence of classic distillation (``beta=0`` in GKD)."""
    _logits_pair(student_logits, teacher_logits)
    temperature = _real(temperature, "temperature", 0, math.inf, low_open=True)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return _reduce(t.exp() * (t - s), labels, reduction)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature: float = 1.0, reduction="batchmean"):
    """KL(student_T || teacher_T) (``beta=1`` in GKD), used by on-policy distillation (MiniLLM, GKD)."""
    _logits_pair(student_logits, teacher_logits)
    temperature = _real(temperature, "temperature", 0, math.inf, low_open=True)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return _reduce(s.exp() * (s - t), labels, reduction)


def generalized_jsd(student_logits, teacher_logits, labels=None, beta: float = 0.5, temperature: float = 1.0,
                    reduction="batchmean"):
    """GKD's generalized Jensen-Shannon divergence with the mixture M = beta*teacher + (1-beta)*student:

    JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M),

    with trl's convention at the ends: ``beta=0`` is the forward KL, ``beta=1`` the reverse KL (the formula
    itself goes to zero there; divided by beta or 1-beta it tends to those two KLs)."""
    beta = _real(beta, "beta", 0.0, 1.0)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, labels, temperature, reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, labels, temperature, reduction)
    _logits_pair(student_logits, teacher_logits)
    temperature = _real(temperature, "temperature", 0, math.inf, low_open=True)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
    per_token = beta * t.exp() * (t - m) + (1 - beta) * s.exp() * (s - m)
    return _reduce(per_token, labels, reduction)


# -------------------------------------------------------- distillation loss --

def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 2.0, alpha: float = 0.5,
                      loss: str = "forward_kl", beta: float = 0.5) -> dict:
    """Hinton et al. (2015): ``alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, hard labels)``.

    ``labels`` are the next tokens, aligned with the logits (-100 where ignored). The soft term is averaged over
    tokens; the T^2 keeps its gradients the same size as the hard term's when T changes (the soft gradients
    scale as 1/T^2). ``alpha=0`` is ordinary training on hard labels. ``loss`` picks D: ``forward_kl`` (classic),
    ``reverse_kl`` or ``jsd`` (GKD, with ``beta``). Returns ``{"loss", "soft", "hard"}``."""
    _logits_pair(student_logits, teacher_logits)
    temperature = _real(temperature, "temperature", 0, math.inf, low_open=True)
    alpha = _real(alpha, "alpha", 0.0, 1.0)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]:
        raise ValueError("labels must be a tensor shaped like the logits without the vocab axis")
    hard = F.cross_entropy(student_logits.reshape(-1, student_logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=-100)
    if loss == "jsd":
        soft = generalized_jsd(student_logits, teacher_logits, labels, beta, temperature)
    else:
        soft = (forward_kl if loss == "forward_kl" else reverse_kl)(student_logits, teacher_logits, labels,
                                                                    temperature)
    total = alpha * temperature**2 * soft + (1 - alpha) * hard
    return {"loss": total, "soft": soft, "hard": hard}


# ------------------------------------------------------------------ student --

def student_config(teacher_config, num_hidden_layers: int | None = None, hidden_size: int | None = None,
                   intermediate_size: int | None = None, num_attention_heads: int | None = None,
                   num_key_value_heads: int | None = None, head_dim: int | None = None):
    """A copy of the teacher's Llama config with fewer layers and/or narrower widths; the vocabulary (and so the
    tokenizer) stays, which logit distillation needs: both models must score the same tokens."""
    from transformers import PretrainedConfig

    if not isinstance(teacher_config, PretrainedConfig):
        raise TypeError(f"teacher_config must be a transformers config, got {type(teacher_config).__name__}")
    cfg = copy.deepcopy(teacher_config)
    changes = {"num_hidden_layers": num_hidden_layers, "hidden_size": hidden_size,
               "intermediate_size": intermediate_size, "num_attention_heads": num_attention_heads,
               "num_key_value_heads": num_key_value_heads, "head_dim": head_dim}
    for k, v in changes.items():
        if v is not None:
            setattr(cfg, k, _int(v, k))
    if head_dim is None and (hidden_size is not None or num_attention_heads is not None):
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads; "
                             "pass head_dim")
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{cfg.num_attention_heads} query heads cannot be shared by {cfg.num_key_value_heads} "
                         "key/value heads (must divide)")
    return cfg


# ---------------------------------------------------------------- training --

def distill(teacher, student, rows: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 2e-3,
            temperature: float = 2.0, alpha: float = 0.5, loss: str = "forward_kl", beta: float = 0.5,
            warmup: int = 10, seed: int = 0, val_rows: torch.Tensor | None = None, eval_every: int = 0,
            schedule_steps: int | None = None, progress: bool = True) -> dict:
    """Train ``student`` in place for ``steps`` steps on random batches of ``rows`` (packed token ids) with
    ``distillation_loss`` against the frozen ``teacher``. ``teacher=None`` or ``alpha=0`` trains on hard labels
    only (the teacher is then never run). AdamW, linear warmup then cosine decay (``llmlab.pretrain.lr_at``).
    ``schedule_steps`` (default ``steps``) is the length the learning-rate schedule is laid out for: a run of
    ``steps < schedule_steps`` is then exactly the first ``steps`` steps of the longer run.
    Returns the history: steps, losses, validation loss every ``eval_every`` steps, wall time."""
    from llmlab.pretrain import Recipe, evaluate, lr_at

    if not isinstance(student, torch.nn.Module) or (teacher is not None and not isinstance(teacher, torch.nn.Module)):
        raise TypeError("teacher (or None) and student must be torch models")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.is_floating_point():
        raise ValueError("rows must be a 2-D tensor of token ids (llmlab.pretrain.pack)")
    _int(steps, "steps")
    _int(batch_size, "batch_size")
    _int(warmup, "warmup", minimum=0)
    _int(eval_every, "eval_every", minimum=0)
    alpha = _real(alpha, "alpha", 0.0, 1.0)
    use_teacher = teacher is not None and alpha > 0
    if use_teacher and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError("teacher and student must share the vocabulary (same tokenizer)")
    schedule_steps = steps if schedule_steps is None else _int(schedule_steps, "schedule_steps")
    if schedule_steps < steps:
        raise ValueError(f"schedule_steps ({schedule_steps}) must be at least steps ({steps})")
    schedule = Recipe(steps=schedule_steps, lr=lr, warmup=min(warmup, schedule_steps - 1))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    if use_teacher:
        teacher.eval()
    hist = {"step": [], "loss": [], "soft": [], "hard": [], "val_step": [], "val_loss": []}
    bar = range(steps)
    if progress:
        from tqdm import tqdm  # plain bars: widget bars render blank on the static site
        bar = tqdm(bar, desc="distill" if use_teacher else "hard labels", mininterval=2)
    t0 = time.perf_counter()
    for step in bar:
        student.train()
        x = rows[torch.randint(len(rows), (batch_size,), generator=gen)].to(student.device)
        labels = x[:, 1:]
        logits = student(input_ids=x).logits[:, :-1]
        if use_teacher:
            with torch.no_grad():
                t_logits = teacher(input_ids=x.to(teacher.device)).logits[:, :-1].to(student.device)
            out = distillation_loss(logits, t_logits, labels, temperature, alpha, loss, beta)
        else:
            hard = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            out = {"loss": hard, "soft": None, "hard": hard}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        hist["step"].append(step)
        for k in ("loss", "soft", "hard"):
            hist[k].append(None if out[k] is None else out[k].item())
        if val_rows is not None and eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(evaluate(student, val_rows))
    hist["wall_time_s"] = time.perf_counter() - t0
    student.eval()
    return hist


# -------------------------------------------------------------- experiment --

STUDENT = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
           "num_key_value_heads": 2}  # the chapter's student: about a sixth of the course model


def compare_students(steps: int, seq_len: int = 128, batch_size: int = 8, temperature: float = 2.0,
                     alpha: float = 0.5, lr: float = 2e-3, eval_every: int = 0, eval_examples: int = 64,
                     train_docs: int = 3000, val_docs: int = 200, seed: int = 0, progress: bool = True,
                     student: dict | None = None, schedule_steps: int | None = None) -> dict:
    """The chapter's experiment: the same student architecture (``STUDENT``) from the same initialization,
    trained ``steps`` steps on the same batches, once on hard labels and once distilled from the course model.
    Returns both students and, per student, the history, validation loss and perplexity, and the course tasks'
    exact-match accuracy (``llmlab.infer.score``)."""
    from transformers import LlamaForCausalLM

    from llmlab import data, infer, models, pretrain
    from llmlab.env import COURSE_MODEL

    _int(steps, "steps")
    teacher, tok = models.load(COURSE_MODEL)
    rows = pretrain.pack(data.corpus_split("train", train_docs), tok, seq_len)
    val = pretrain.validation_rows(tok, pretrain.Recipe(val_docs=val_docs))
    tasks = data.instruction_tasks(eval_examples, seed=7)
    cfg = student_config(teacher.config, **(student or STUDENT))
    torch.manual_seed(seed)
    init = LlamaForCausalLM(cfg).state_dict()
    out = {"student_config": {k: getattr(cfg, k) for k in (*STUDENT, "head_dim")}, "steps": steps,
           "schedule_steps": schedule_steps or steps,
           "seq_len": seq_len, "batch_size": batch_size, "temperature": temperature, "alpha": alpha, "lr": lr,
           "runs": {}, "models": {}}
    for name, a in (("hard labels", 0.0), ("distilled", alpha)):
        s = LlamaForCausalLM(cfg)
        s.load_state_dict(init)
        s.to(teacher.device)
        hist = distill(teacher if a > 0 else None, s, rows, steps, batch_size, lr, temperature, a, seed=seed,
                       val_rows=val, eval_every=eval_every, schedule_steps=schedule_steps, progress=progress)
        vl = pretrain.evaluate(s, val)
        acc = sum(r["correct"] for r in infer.score(s, tok, tasks, max_new_tokens=12)) / len(tasks)
        out["runs"][name] = {"history": hist, "val_loss": vl, "perplexity": math.exp(vl), "accuracy": acc,
                             "params": models.count_parameters(s)}
        out["models"][name] = s
    out["teacher"] = teacher
    out["tokenizer"] = tok
    return out


def main(argv=None):
    """Run ``compare_students`` once at length and write its numbers (not the models) with provenance."""
    import datetime
    import platform

    import transformers

    from llmlab.env import set_seed
    from llmlab.pretrain import cpu_name

    ap = argparse.ArgumentParser(description="Hard labels vs distillation for the chapter's student.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=20)
    a = ap.parse_args(argv)
    set_seed(0, threads=1)
    res = compare_students(a.steps, eval_every=a.eval_every, progress=True)
    record = {k: v for k, v in res.items() if k not in ("models", "teacher", "tokenizer")}
    record["provenance"] = {
        "command": f"python -m llmlab.distill --out {a.out} --steps {a.steps} --eval-every {a.eval_every}",
        "hardware": f"{cpu_name()}, {torch.get_num_threads()} CPU thread, no GPU", "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat()}
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    for name, r in record["runs"].items():
        print(name, {k: r[k] for k in ("val_loss", "perplexity", "accuracy", "params")},
              f"{r['history']['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
