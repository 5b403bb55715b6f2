"""How much memory a model needs: a common rule of thumb, a better breakdown, and measurements to check both.

Chapter: Memory and compute. Everything is in decimal gigabytes (1 GB = 10^9 bytes), which is what the rule of
thumb's examples use; GPU specs and ``nvidia-smi`` report GiB (2^30 bytes), 7.4 % more per unit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real

GB = 1e9
KNOWN_BITS = (2, 3, 4, 5, 6, 8, 16, 32)
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor", "sgd")

GIB = 2**30
# What CUDA reports on Colab's T4: torch.cuda.get_device_properties(0).total_memory is 15,828,320,256 bytes
# (printed as 15095MB, that is MiB: 14.74 GiB); nvidia-smi shows 15360MiB (15 GiB) and the card is sold as 16 GB.
T4_TOTAL_BYTES = 15_828_320_256
# Memory of common GPUs in decimal GB: for the T4 what CUDA reports (above); for the others their nominal GiB,
# which CUDA reports a little below (by about 1-4 %), as it does for the T4.
GPUS = {"T4": T4_TOTAL_BYTES / GB,
        **{name: gib * GIB / GB for name, gib in
           {"L4": 24, "A10G": 24, "RTX 4090": 24, "A100-40GB": 40, "A100-80GB": 80, "H100": 80}.items()}}
# The CUDA context (driver, loaded kernels, cuBLAS workspace) takes GPU memory before the first tensor: about
# 0.3-0.4 GB with the lazy kernel loading of CUDA >= 11.7 (PyTorch's maintainers, pytorch/pytorch#107667 and
# #109888), more before. ``fits`` keeps this much of a named GPU for it.
CUDA_CONTEXT_GB = 0.5


def _number(x, name, positive=True):
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {x}")
    return x


def _bits(bits, name="bits"):
    if isinstance(bits, bool) or not isinstance(bits, Real):
        raise TypeError(f"{name} must be a number, got {type(bits).__name__}")
    if bits not in KNOWN_BITS:
        raise ValueError(f"{name} must be one of {KNOWN_BITS}, got {bits}")
    return bits


def estimate_inference_memory(n_params, bits, overhead=0.2) -> float:
    """A common rule of thumb, in GB: ``M = (P * 4 bytes) / (32 / Q) * (1 + overhead)``.

    ``(P * 4) / (32 / Q)`` is just ``P * Q / 8`` bytes: the weights at Q bits each. Its 1.2 lumps
    everything else (KV cache, activations, CUDA context, allocator) into 20 %.
    >>> round(estimate_inference_memory(7e9, 16), 2)
    16.8
    """
    _number(n_params, "n_params")
    _bits(bits)
    _number(overhead, "overhead", positive=False)
    return n_params * 4 / (32 / bits) * (1 + overhead) / GB


def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch_size=1, bits=16) -> int:
    """Bytes of the KV cache: a key and a value vector per layer, KV head and token."""
    for v, n in ((n_layers, "n_layers"), (n_kv_heads, "n_kv_heads"), (head_dim, "head_dim"),
                 (seq_len, "seq_len"), (batch_size, "batch_size")):
        _number(v, n)
    _bits(bits)
    return int(2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bits // 8)


@dataclass(frozen=True)
class Shape:
    """The sizes that decide activation and KV-cache memory, read from a Hugging Face config."""
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int

    @property
    def head_dim(self):
        return self.hidden // self.n_heads

    @classmethod
    def of(cls, config):
        config = getattr(config, "config", config)  # a model or its config
        try:
            return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                       config.num_attention_heads,
                       getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                       config.vocab_size)
        except AttributeError as e:
            raise TypeError(f"expected a Llama-style model or config, got {type(config).__name__}: {e}") from e


def activation_bytes(shape: Shape, batch_size, seq_len, bits=32, checkpointing=False) -> int:
    """Bytes autograd saves for the backward pass of one Llama training step (SDPA attention).

    Per layer and token a Llama block saves about ``8h + 4i + 2kv`` numbers (h hidden, i MLP width, kv the
    key/value width): the norms' inputs, the attention's q, k, v and output, the MLP's gate, up, their product
    and the inputs of the projections. The head saves the logits twice (``2V``: logits and log-softmax).
    With gradient checkpointing only each layer's input (``h``) is kept; during backward one layer at a time is
    recomputed, adding ``per_layer`` numbers per token for a moment (not counted here). Checked against ``measure_training_step`` in tests (within a few percent).
    """
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be a Shape (Shape.of(model.config)), got {type(shape).__name__}")
    _number(batch_size, "batch_size")
    _number(seq_len, "seq_len")
    _bits(bits)
    kv = shape.n_kv_heads * shape.head_dim
    per_layer = 8 * shape.hidden + 4 * shape.intermediate + 2 * kv
    head = 2 * shape.vocab
    if checkpointing:
        per_token = shape.n_layers * shape.hidden + head
    else:
        per_token = shape.n_layers * per_layer + head
    return int(per_token * batch_size * seq_len * bits // 8)


def optimizer_bytes_per_param(optimizer: str, hidden: int = 4096) -> float:
    """Optimizer state per trainable parameter. AdamW: two fp32 moments (8 B). 8-bit AdamW: two 8-bit moments
    (2 B, plus small block-wise scales). Adafactor (no momentum): a row and a column second moment per matrix,
    about ``4 * 2 / hidden`` B per parameter. SGD without momentum: none."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    _number(hidden, "hidden")
    return {"adamw": 8.0, "adamw_8bit": 2.0, "adafactor": 8.0 / hidden, "sgd": 0.0}[optimizer]


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per component of one training step."""
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    def gb(self) -> dict:
        return {k: v / GB for k, v in {**asdict(self), "total": self.total}.items()}


def estimate_training_memory(n_params, shape: Shape | None = None, batch_size=1, seq_len=512,
                             optimizer="adamw", weight_bits=32, act_bits=None, trainable_params=None,
                             checkpointing=False) -> TrainingMemory:
    """Memory of a training step: weights + gradients (trainable only, in fp32 for mixed precision masters
    and full fine-tuning) + optimizer states + saved activations.

    ``trainable_params`` defaults to all parameters; pass the LoRA parameter count for LoRA/QLoRA (then
    ``weight_bits`` is the frozen base's: 16, 8 or 4). ``shape`` (``Shape.of(config)``) is needed for activations;
    without it they count as 0. A lower bound for quantized bases: every base weight is priced at ``weight_bits``,
    though embeddings, the output head, norms and quantization scales stay in higher precision.
    """
    _number(n_params, "n_params")
    _number(batch_size, "batch_size")
    _number(seq_len, "seq_len")
    _bits(weight_bits, "weight_bits")
    if act_bits is not None:
        _bits(act_bits, "act_bits")
    trainable = n_params if trainable_params is None else _number(trainable_params, "trainable_params", False)
    if trainable > n_params:
        raise ValueError(f"trainable_params ({trainable}) exceeds n_params ({n_params})")
    if shape is not None and not isinstance(shape, Shape):
        raise TypeError(f"shape must be a Shape, got {type(shape).__name__}")
    if trainable == n_params and weight_bits < 16:
        raise ValueError(f"full training needs weights of at least 16 bits, got weight_bits={weight_bits}; "
                         "for a quantized base, train adapters (trainable_params)")
    grad_bits = 32 if weight_bits >= 32 or trainable < n_params else weight_bits
    if act_bits is None:  # activations run in the compute dtype: fp32, else 16-bit (bf16/fp16, also for k-bit bases)
        act_bits = 32 if weight_bits == 32 else 16
    acts = 0 if shape is None else activation_bytes(shape, batch_size, seq_len, act_bits, checkpointing)
    hidden = shape.hidden if shape is not None else 4096
    return TrainingMemory(
        weights=int(n_params * weight_bits / 8),
        gradients=int(trainable * grad_bits / 8),
        optimizer=int(trainable * optimizer_bytes_per_param(optimizer, hidden)),
        activations=acts,
    )


RL_METHODS = ("sft", "dpo", "ppo", "grpo")


def rl_training_memory(method: str, n_params, bits=16, optimizer="adamw", *,
                       beta=None, reward_params=None, value_params=None,
                       shape: Shape | None = None, batch_size=1, seq_len=512,
                       checkpointing=False) -> dict:
    """GB held by the models a fine-tuning method keeps in memory, per model and total.

    Chapter: Reasoning (test-time compute and RL with verifiable rewards); it builds on
    Memory and compute. Each trained model is priced by ``estimate_training_memory``
    (weights at ``bits``, gradients, ``optimizer`` states, activations when ``shape``
    is given), each frozen one by ``estimate_inference_memory`` with no overhead (its
    weights). Per method:

    * "sft" - the policy, trained;
    * "dpo" - the policy and a frozen reference; a chosen and a rejected sequence per
      pair, so activations for ``2 * batch_size`` sequences;
    * "ppo" - the policy, a frozen reference (for the KL penalty; dropped at
      ``beta=0``), a frozen reward model (``reward_params``, default ``n_params``) and
      a trained value model (``value_params``, default ``n_params``, priced with
      ``shape``: same architecture) - four models, two of them with optimizer states;
    * "grpo" - the policy and, while ``beta > 0`` (DeepSeekMath used 0.04; trl 1.16's
      default is 0), the reference; no value model (the group mean is the baseline)
      and a verifier for reward (0 GB unless ``reward_params`` names a reward model).
      ``batch_size`` counts completions: prompts times the group size.

    ``beta=None`` keeps the reference where the method has one. A lower bound: the
    frozen models' activations, the KV cache of generation and the CUDA context are
    left out. Returns ``{"policy", "reference", "reward_model", "value_model",
    "total"}`` in GB.
    """
    if method not in RL_METHODS:
        raise ValueError(f"method must be one of {RL_METHODS}, got {method!r}")
    if beta is not None:
        _number(beta, "beta", positive=False)
        if method == "sft":
            raise ValueError("sft has no reference model: leave beta as None")
        if method == "dpo" and beta == 0:
            raise ValueError("dpo needs beta > 0: its loss is relative to the "
                             "reference")
    if reward_params is not None and method not in ("ppo", "grpo"):
        raise ValueError(f"{method} uses no reward model: leave reward_params as None")
    if value_params is not None and method != "ppo":
        raise ValueError(f"only ppo has a value model, not {method}")
    sequences = 2 * batch_size if method == "dpo" else batch_size
    policy = estimate_training_memory(n_params, shape, sequences, seq_len, optimizer,
                                      weight_bits=bits, checkpointing=checkpointing)
    gb = {"policy": policy.total / GB, "reference": 0.0, "reward_model": 0.0,
          "value_model": 0.0}
    if method != "sft" and beta != 0:
        gb["reference"] = estimate_inference_memory(n_params, bits, overhead=0)
    if method == "ppo" or reward_params is not None:
        reward = n_params if reward_params is None else reward_params
        gb["reward_model"] = estimate_inference_memory(reward, bits, overhead=0)
    if method == "ppo":
        value = n_params if value_params is None else value_params
        gb["value_model"] = estimate_training_memory(
            value, shape, batch_size, seq_len, optimizer, weight_bits=bits,
            checkpointing=checkpointing).total / GB
    gb["total"] = sum(gb.values())
    return gb


@dataclass(frozen=True)
class Fit:
    """The answer of ``fits``: usable as a bool, with the numbers and a one-line reason."""
    ok: bool
    needed_gb: float
    available_gb: float
    reason: str

    def __bool__(self):
        return self.ok


def usable_gb(gpu: str) -> float:
    """GB that tensors can use on a named GPU (a key of ``GPUS``): its memory less ``CUDA_CONTEXT_GB``.
    Chapter: Memory and compute.

    >>> round(usable_gb("T4"), 2)
    15.33
    """
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a GPU name (a key of GPUS), got {type(gpu).__name__}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    return GPUS[gpu] - CUDA_CONTEXT_GB


def fits(needed_gb, gpu="T4") -> Fit:
    """Will ``needed_gb`` (an estimate above, in GB) fit on ``gpu``? Chapter: Memory and compute.

    ``gpu`` is a name in ``GPUS`` (then ``CUDA_CONTEXT_GB`` of it is kept for the CUDA context, see
    ``usable_gb``) or the GB available to tensors, taken as given."""
    _number(needed_gb, "needed_gb")
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)} (or pass its memory in GB)")
        name, avail = gpu, usable_gb(gpu)
        note = f"{avail:.1f} GB usable after {CUDA_CONTEXT_GB:g} GB for the CUDA context"
    else:
        avail = _number(gpu, "gpu")
        name = f"a {avail:g} GB GPU"
        note = f"{avail:.1f} GB usable"
    ok = needed_gb <= avail
    verb = "fits on" if ok else "does not fit on"
    return Fit(ok, needed_gb, avail, f"{needed_gb:.1f} GB {verb} {name} ({note}): "
               + (f"{avail - needed_gb:.1f} GB to spare" if ok else f"{needed_gb - avail:.1f} GB short"))


# ------------------------------------------------------------------ measuring --

def tensor_bytes(tensors) -> int:
    """Bytes held by distinct tensor storages (shared storage counted once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _device(device) -> str:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return device


def _live_cpu_tensors():
    """Every CPU tensor with a readable storage that the garbage collector reaches."""
    import gc

    import torch

    for obj in gc.get_objects():
        try:
            # type(), not isinstance: isinstance asks deprecated proxies for __class__ (a warning)
            if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                obj.untyped_storage()
                yield obj
        except (RuntimeError, NotImplementedError, ReferenceError):  # storage-less subclasses
            continue


def held_bytes(device: str = "cpu") -> int:
    """Bytes of the tensors alive now on ``device`` ("cpu" or "cuda"). On CUDA this is
    ``torch.cuda.memory_allocated()``; on the CPU, ``tensor_bytes`` of every tensor the garbage
    collector reaches (models, gradients, optimizer state), each storage counted once.
    Chapter: Lab 3 (what each stage leaves behind once it is freed)."""
    import torch

    if _device(device) == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is visible")
        return int(torch.cuda.memory_allocated())
    return tensor_bytes(_live_cpu_tensors())


def release(device: str = "cpu") -> int:
    """Free what nothing refers to any more (``del`` the names first): collect garbage, hand
    CUDA's cached blocks back, and return ``held_bytes(device)``. Chapter: Lab 3."""
    import gc

    import torch

    gc.collect()
    if _device(device) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return held_bytes(device)


class StageMemory:
    """What each stage of a long run holds (Lab 3: SFT, reward model, DPO, PPO). Call ``end(stage)`` when a
    stage finishes, ``del`` what later stages do not need, then ``freed()``. Each row of ``rows``: the MB of
    tensors alive at the stage's end (``held_bytes``), once freed, and on CUDA the peak allocated during the
    stage, activations included (``torch.cuda.max_memory_allocated``). On a CPU the end-of-stage figure is
    a lower bound of the peak: it misses the activations of the stage's last step."""

    def __init__(self, device: str = "cpu"):
        self.device, self.rows = _device(device), []
        self._reset_peak()

    def _reset_peak(self):
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def end(self, stage: str) -> dict:
        """Record what is alive at the end of ``stage`` (a name for the table); returns the row."""
        if not isinstance(stage, str) or not stage.strip():
            raise ValueError(f"stage must be a non-empty name, got {stage!r}")
        if self.rows and self.rows[-1]["held once freed MB"] is None:
            raise RuntimeError(f"stage {self.rows[-1]['stage']!r} was not freed(): call freed() after its del")
        row = {"stage": stage, "held at the end MB": round(held_bytes(self.device) / 1e6, 1),
               "held once freed MB": None}
        if self.device == "cuda":
            import torch

            row["CUDA peak MB"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
        self.rows.append(row)
        return row

    def freed(self) -> dict:
        """After ``del`` of what the last stage no longer needs: collect, and record what is still held."""
        if not self.rows or self.rows[-1]["held once freed MB"] is not None:
            raise RuntimeError("call end(stage) before freed()")
        self.rows[-1]["held once freed MB"] = round(release(self.device) / 1e6, 1)
        self._reset_peak()
        return self.rows[-1]


def model_bytes(model) -> int:
    """Bytes that hold a model: parameters, buffers, and what its ``state_dict`` adds (bitsandbytes keeps
    8-bit row scales and 4-bit block scales beside the weights, not as parameters)."""
    if not hasattr(model, "parameters") or not hasattr(model, "state_dict"):
        raise TypeError(f"expected a torch model, got {type(model).__name__}")
    try:
        return tensor_bytes([*model.parameters(), *model.buffers(), *model.state_dict().values()])
    except RuntimeError as e:  # tensor subclasses (torchao, quantize_dynamic's packed params) hide their storage
        raise TypeError(f"cannot read this model's tensor storage ({e}); use serialized_bytes(model)") from None


def serialized_bytes(model) -> int:
    """Bytes of ``torch.save(model.state_dict())``: a size that works for every quantization scheme, including
    those whose tensors are subclasses (torchao) or packed parameters (``torch.ao`` dynamic quantization), where
    ``model_bytes`` and transformers' ``get_memory_footprint`` cannot see the storage."""
    import io

    import torch

    if not hasattr(model, "state_dict"):
        raise TypeError(f"expected a torch model, got {type(model).__name__}")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def file_bytes(path) -> int:
    """Size on disk of a file, or of every file under a folder (a ``save_pretrained`` folder, a GGUF file)."""
    import os
    from pathlib import Path

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise ValueError(f"no file or folder at {path}")


def measure_training_step(model, input_ids, optimizer) -> TrainingMemory:
    """Run one forward/backward/step and measure, by component, the bytes it holds: parameters, gradients,
    optimizer states, and the activations autograd saved for backward (via ``saved_tensors_hooks``)."""
    import torch

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise TypeError("input_ids must be a 2-D tensor (batch, seq_len)")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    grads = tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
    states = tensor_bytes([v for st in optimizer.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0])
    optimizer.zero_grad(set_to_none=True)
    return TrainingMemory(model_bytes(model), grads, states, sum(saved.values()))


_SERVE_SCRIPT = r"""
import json, resource, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
path, batch, new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
def kib():
    # VmHWM (peak RSS of this address space) starts afresh at exec; ru_maxrss would inherit the parent's peak
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = kib()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
loaded = kib()
enc = tok(["Mia has a"] * batch, return_tensors="pt")
with torch.no_grad():
    model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"baseline": base, "after_load": loaded, "peak": kib()}))
"""


def measure_serving_peak(model_dir, batch_size: int = 8, new_tokens: int = 128, dtype: str = "float32") -> dict:
    """Peak resident memory (bytes) of a fresh process that loads ``model_dir`` and generates: after importing
    torch and transformers (``baseline``), after the load, and the peak over generation. A separate process,
    because a process's peak cannot be reset. CPU only: on a GPU, read ``torch.cuda.max_memory_allocated``."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path(model_dir).is_dir():
        raise ValueError(f"no model folder at {model_dir!r}")
    _number(batch_size, "batch_size")
    _number(new_tokens, "new_tokens")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = subprocess.run([sys.executable, "-c", _SERVE_SCRIPT, str(model_dir), str(int(batch_size)),
                          str(int(new_tokens)), dtype], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the serving process failed: {out.stderr.strip().splitlines()[-1:]}")
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])
