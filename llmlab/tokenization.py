"""Tokenizers: the course model's byte-level BPE, its chat template, and a byte-level BPE from scratch.

Used by the pretraining recipe (``llmlab.pretrain``), the fine-tuning and alignment labs (chat template with
``{% generation %}`` markers, so trainers can compute an assistant-only loss) and the tokenization chapter, which
builds ``BPE`` (training, encoding by merge rank, decoding, special tokens) and checks it against the
`tokenizers` library: ``BPE.from_tokenizers`` gives the course tokenizer's ids exactly.
"""
from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]

# Each turn is "<|role|>\n{content}<|end|>\n". The assistant's content and its closing <|end|> sit inside
# {% generation %}: `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly those tokens,
# which is what an assistant-only SFT loss trains on (the model must learn to stop, so <|end|> is included).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) on ``texts``; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok):
    """Wrap a ``tokenizers.Tokenizer`` as the course's ``PreTrainedTokenizerFast`` (specials, chat template)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------- training chat templates --
#
# trl's `SFTTrainer(assistant_only_loss=True)` trains on the tokens that a template's
# {% generation %} markers enclose. Hub templates rarely have them: SmolLM2's ChatML
# template has none, and trl 1.16 (trl/trainer/sft_trainer.py, where it swaps in
# `get_training_chat_template`) then raises "The chat template is not
# training-compatible". `training_chat_template` returns a template that renders the
# same text with the markers added, so only the assistant's own tokens are trained.

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Markers that name a template family in the error for templates we cannot rewrite.
_TEMPLATE_FAMILIES = (
    (IM_START, "ChatML (<|im_start|>role ... <|im_end|>)"),
    ("<|start_header_id|>", "Llama 3 (<|start_header_id|>role<|end_header_id|>)"),
    ("<start_of_turn>", "Gemma (<start_of_turn>role ... <end_of_turn>)"),
    ("[INST]", "Llama 2 / Mistral ([INST] ... [/INST])"),
    ("<|START_OF_TURN_TOKEN|>", "Cohere (<|START_OF_TURN_TOKEN|>)"),
    ("<|user|>", "Zephyr / Phi-3 (<|user|> ... <|end|>)"),
)

# Conversations on which a rewritten template must render exactly what the original
# renders, with and without a generation prompt: no system message (SmolLM2 then
# injects its default one), a system message, several turns, and content with
# quotes, braces, a newline and surrounding spaces (a template that trims or escapes
# content is not plain ChatML).
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "You count."},
     {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "Two."},
     {"role": "user", "content": " It's {x}\n and \"y\" "},
     {"role": "assistant", "content": " {% no %} 'z'\n"}],
)


def _template_family(template: str) -> str:
    for marker, family in _TEMPLATE_FAMILIES:
        if marker in template:
            return family
    return "an unrecognised family"


def _chatml_block(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _chatml_training_template(default_system: str) -> str:
    """ChatML with {% generation %} around each assistant message's content and its
    <|im_end|> (the model must learn to stop), and ``default_system`` (already a
    rendered system block, or "") injected when the first message is not a system one.
    """
    inject = ""
    if default_system:
        inject = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ " + repr(default_system) + " }}{% endif %}")
    return (
        "{% for message in messages %}" + inject
        + "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
        "{{ '<|im_end|>\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def _render(tokenizer, template: str, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt,
        chat_template=template)


def _chatml_rewrite(tokenizer, template: str) -> str:
    """The ChatML training template for ``template``, checked to render the same text
    on every probe conversation; ValueError when it cannot be."""
    family = _template_family(template)
    if IM_START not in template or IM_END not in template:
        raise ValueError(
            f"cannot make a training chat template: the tokenizer's template is "
            f"{family}, which neither trl nor llmlab can add {{% generation %}} "
            f"markers to; write one by hand (see llmlab.tokenization.CHAT_TEMPLATE)")
    user_only = _PROBE_CONVERSATIONS[0]
    try:
        rendered = _render(tokenizer, template, user_only, False)
        tail = _chatml_block("user", user_only[0]["content"])
        if not rendered.endswith(tail):
            raise ValueError(f"a user message renders as {rendered!r}")
        candidate = _chatml_training_template(rendered[: -len(tail)])
        for messages in _PROBE_CONVERSATIONS:
            for prompt in (False, True):
                want = _render(tokenizer, template, messages, prompt)
                got = _render(tokenizer, candidate, messages, prompt)
                if got != want:
                    raise ValueError(
                        f"{len(messages)} messages, add_generation_prompt={prompt}: "
                        f"the template renders {want!r}, plain ChatML {got!r}")
    except Exception as e:  # a template error or a mismatch: not plain ChatML
        raise ValueError(
            f"cannot make a training chat template: the tokenizer's template is "
            f"{family} but not plain ChatML ({e}); write one by hand") from e
    return candidate


def training_chat_template(tokenizer) -> str:
    """A chat template for ``tokenizer`` with ``{% generation %}`` markers, so that
    trl's ``SFTTrainer(assistant_only_loss=True)`` and
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` mark exactly the
    assistant's tokens. Use it as ``tok.chat_template = training_chat_template(tok)``.

    - the course tokenizer's template (``CHAT_TEMPLATE``) already has them: returned
      unchanged, as is any template trl finds training-compatible;
    - a template trl knows (Llama 3, Qwen, Gemma, Phi, ...): trl's own patched one,
      from ``trl.chat_template_utils.get_training_chat_template``;
    - a ChatML template (SmolLM2, ``<|im_start|>role\\n...<|im_end|>\\n``): the same
      ChatML with each assistant message's content and its ``<|im_end|>`` inside the
      markers, and the template's default system prompt (SmolLM2 injects one when the
      conversation has none) kept; it is checked to render the same text as the
      original on several conversations, with and without a generation prompt;
    - no template at all, but ChatML's tokens in the vocabulary (a base model such as
      SmolLM2-360M): plain ChatML with the markers;
    - anything else raises one ``ValueError`` naming the template's family.

    A template shipped as named variants (a dict) is read through its ``default``
    variant. Used by the fine-tuning and alignment labs and the chapter
    *Preference optimisation with trl's trainers* (gpu profile, SmolLM2).
    """
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer or processor, got "
                        f"{type(tokenizer).__name__}")
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template is None:
        # a base model's tokenizer may ship without a template (SmolLM2's base models
        # have ChatML's tokens in their vocabulary all the same): plain ChatML then
        vocab = getattr(tokenizer, "tokenizer", tokenizer).get_added_vocab()
        if IM_START in vocab and IM_END in vocab:
            return _chatml_training_template("")
        raise ValueError("the tokenizer has no chat template (nor a 'default' variant) "
                         "and no <|im_start|>/<|im_end|> tokens for ChatML")
    if not isinstance(template, str):
        raise TypeError(f"tokenizer.chat_template must be a str or a dict of str, got "
                        f"{type(template).__name__}")
    if template == CHAT_TEMPLATE:
        return template
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:  # trl is in the labs extra; without it, ChatML is still handled
        get_training_chat_template = None
    if get_training_chat_template is not None:
        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:  # "not training-compatible and patching is not supported"
            pass
        else:
            return template if patched is None else patched
    return _chatml_rewrite(tokenizer, template)


# ------------------------------------------------------------ BPE from scratch --
#
# The rest of this module is a byte-level BPE written out in full (in the spirit of Karpathy's minbpe), for the
# tokenization chapter. It is checked in the tests against the `tokenizers` library that `train_tokenizer` uses:
# built from the course tokenizer's vocabulary and merges, it gives the same ids.

# GPT-2's pre-tokenizer (also the `tokenizers` ByteLevel pre-tokenizer's and tiktoken's "gpt2"): text is cut into
# chunks (a word with its leading space, a number, a run of punctuation, whitespace) and BPE never merges across
# chunks. \p{L} (any letter) and \p{N} (any digit) need the `regex` package: the standard `re` has no Unicode
# classes. `regex` is a dependency of transformers, so it is installed wherever llmlab is.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each of the 256 bytes as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (control bytes, the space, ...) are shifted to
    chr(256 + n). That is why a `tokenizers` vocabulary writes " the" as "Ġthe" and a newline as "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _count_pairs(ids: list[int], counts: dict, weight: int = 1) -> dict:
    """Add the adjacent pairs of ``ids`` to ``counts``, each ``weight`` times."""
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _check_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be an iterable of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be an iterable of strings; found a " +
                        next(type(t).__name__ for t in texts if not isinstance(t, str)))
    return texts


class BPE:
    """A byte-level BPE tokenizer: GPT-2's pre-tokenizer, then merges applied by rank, like GPT-2 and tiktoken.

    State, in plain dicts and a list: ``vocab`` maps every id to its bytes; ``merges`` maps a pair of ids to the
    id they merge into, in rank order (first learned = applied first); ``special_tokens`` maps a string such as
    ``"<|endoftext|>"`` to its id; ``byte_ids[b]`` is the id of the single byte ``b`` (``b`` itself after
    ``train``, another number in a vocabulary built by ``from_tokenizers``). A fresh ``BPE()`` knows the 256
    bytes only, so it encodes text as its UTF-8 bytes. Every string has an encoding: no unknown token, ever.
    With ``cache`` (default) each distinct chunk is merged once and its ids remembered, as GPT-2's encoder and
    `tokenizers` do; ``BPE(cache=False)`` (or setting ``.cache = False``) runs the merge loop every time.
    """

    def __init__(self, cache: bool = True):
        import regex

        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        self.cache = cache  # remember each chunk's ids (" the" is merged once, not every time it occurs)
        self._split = regex.compile(GPT2_SPLIT_PATTERN)
        self._clear()

    def _clear(self):
        """Back to the 256 bytes alone."""
        self.byte_ids = list(range(256))
        self.vocab = {b: bytes([b]) for b in range(256)}
        self.merges: dict[tuple[int, int], int] = {}
        self.special_tokens: dict[str, int] = {}
        self._reset()

    def _reset(self):
        """After the merges change: their ranks, and an empty cache."""
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    def __repr__(self):
        return (f"BPE(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens."""
        return len(self.vocab)

    # ---------------------------------------------------------------- training --

    def train(self, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> BPE:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` ids (bytes, merges, specials).

        Each text is cut around the special tokens, then into GPT-2 chunks; identical chunks are counted once
        with their frequency. Each step merges the most frequent adjacent pair (ties: the pair of smallest
        ids), as the `tokenizers` trainer does; training stops early when no pair is left, that is when every
        chunk seen is a single token. Special tokens get the last ids. Replaces any earlier state; returns self.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        texts = _check_texts(texts)
        specials = self._check_specials(special_tokens)
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be at least {256 + len(specials)} (256 bytes + "
                             f"{len(specials)} special tokens), got {vocab_size}")

        chunks: dict[str, int] = {}
        for text in texts:
            for part in self._split_specials(text, specials)[::2]:  # even parts: ordinary text
                for chunk in self._split.findall(part):
                    chunks[chunk] = chunks.get(chunk, 0) + 1
        words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunks.items()]

        self._clear()
        for new_id in range(256, vocab_size - len(specials)):
            counts: dict[tuple[int, int], int] = {}
            for ids, n in words:
                _count_pairs(ids, counts, n)
            if not counts:
                break  # every chunk is one token: nothing left to merge
            pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
            words = [(_merge(ids, pair, new_id) if len(ids) > 1 else ids, n) for ids, n in words]
            self.merges[pair] = new_id
            self.vocab[new_id] = self.vocab[pair[0]] + self.vocab[pair[1]]
        for s in specials:
            self.special_tokens[s] = len(self.vocab)
            self.vocab[len(self.vocab)] = s.encode("utf-8")
        self._reset()
        return self

    @staticmethod
    def _check_specials(special_tokens) -> list[str]:
        if isinstance(special_tokens, (str, bytes)) or not isinstance(special_tokens, Iterable):
            raise TypeError(f"special_tokens must be an iterable of strings, got {type(special_tokens).__name__}")
        specials = list(special_tokens)
        if not all(isinstance(s, str) and s for s in specials) or len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got {specials!r}")
        return specials

    @staticmethod
    def _split_specials(text: str, specials) -> list[str]:
        """``[text, special, text, special, ..., text]``: the longest special wins where two start at one place."""
        if not specials:
            return [text]
        import regex

        alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        return regex.split(f"({alternatives})", text)

    # ------------------------------------------------------ encoding, decoding --

    def _encode_chunk(self, chunk: str) -> list[int]:
        """One pre-tokenized chunk: its bytes, then the lowest-rank merge present, again and again."""
        if chunk in self._cache:
            return self._cache[chunk]
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
            if pair not in self._ranks:
                break  # no merge applies any more
            ids = _merge(ids, pair, self.merges[pair])
        if self.cache and len(self._cache) < 100_000:  # a bound, so that memory stays bounded
            self._cache[chunk] = ids
        return ids

    def encode(self, text: str, allowed_special="none") -> list[int]:
        """Token ids of ``text``.

        ``allowed_special`` says which special-token strings in ``text`` become their special id: ``"none"``
        (the default: they are encoded as ordinary text, so user text cannot forge a control token), ``"all"``,
        or a collection of special-token strings.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(allowed_special, str) and allowed_special in ("all", "none"):
            allowed = list(self.special_tokens) if allowed_special == "all" else []
        elif isinstance(allowed_special, (set, frozenset, list, tuple)):
            allowed = list(allowed_special)
            unknown = [s for s in allowed if s not in self.special_tokens]
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {unknown!r}; "
                                 f"it has {list(self.special_tokens)}")
        else:
            raise TypeError(f'allowed_special must be "all", "none" or a collection of special tokens, '
                            f"got {allowed_special!r}")
        ids = []
        for i, part in enumerate(self._split_specials(text, allowed)):
            if i % 2:
                ids.append(self.special_tokens[part])
            else:
                for chunk in self._split.findall(part):
                    ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: their bytes joined, then read as UTF-8 (a cut-off character becomes U+FFFD, "�")."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an iterable of ints, got {type(ids).__name__}")
        pieces = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ids must be ints, got a {type(i).__name__}")
            if i not in self.vocab:
                raise ValueError(f"id {i} is not in the vocabulary (0..{self.vocab_size - 1})")
            pieces.append(self.vocab[i])
        return b"".join(pieces).decode("utf-8", errors="replace")

    # -------------------------------------------------- from the `tokenizers` library --

    @classmethod
    def from_tokenizers(cls, tok) -> BPE:
        """The same tokenizer as ``tok``, a `tokenizers` byte-level BPE (a ``tokenizers.Tokenizer`` or a
        transformers fast tokenizer such as the course model's): same ids, same merges, same special tokens.

        The vocabulary is written in GPT-2's byte alphabet ("Ġthe"); ``bytes_to_unicode`` maps it back to bytes.
        Only GPT-2-style tokenizers are accepted: a ByteLevel pre-tokenizer with GPT-2's regex and no prefix
        space, no normalizer, and plain merges (no dropout, no ``ignore_merges``, no subword prefix or suffix).
        """
        import json

        from tokenizers import Tokenizer

        backend = getattr(tok, "backend_tokenizer", tok)
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"tok must be a tokenizers.Tokenizer or a fast tokenizer, got {type(tok).__name__}")
        spec = json.loads(backend.to_str())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        problems = [
            model.get("type") != "BPE" and f"model type {model.get('type')}",
            pre.get("type") != "ByteLevel" and f"pre-tokenizer {pre.get('type')} (not ByteLevel)",
            pre.get("add_prefix_space") and "add_prefix_space=True",
            pre.get("use_regex") is False and "use_regex=False",
            spec.get("normalizer") and "a normalizer",
            model.get("dropout") and "BPE dropout",
            model.get("ignore_merges") and "ignore_merges=True",
            (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")) and "a subword affix",
            any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in spec["added_tokens"])
            and "an added token that strips spaces or matches single words",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"not a GPT-2-style byte-level BPE: {', '.join(problems)}")

        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        vocab = model["vocab"]
        missing = [b for b, c in bytes_to_unicode().items() if c not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 bytes (e.g. byte {missing[0]})")
        bpe = cls()
        bpe.vocab = {i: bytes(to_byte[c] for c in s) for s, i in vocab.items()}
        bpe.byte_ids = [vocab[c] for c in bytes_to_unicode().values()]
        for merge in model["merges"]:  # [a, b] pairs, or "a b" strings in older files
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            bpe.merges[(vocab[a], vocab[b])] = vocab[a + b]
        for t in spec["added_tokens"]:
            bpe.special_tokens[t["content"]] = t["id"]
            bpe.vocab[t["id"]] = t["content"].encode("utf-8")
        bpe._reset()
        return bpe


# ------------------------------------------------------------- other subword algorithms --

SUBWORD_ALGORITHMS = ("bpe", "wordpiece", "unigram")


def train_subword(texts: Iterable[str], vocab_size: int, algorithm: str):
    """Train a small tokenizer of one of three subword families with the `tokenizers` library; return the
    ``tokenizers.Tokenizer``. Chapter: Tokenization (WordPiece and Unigram beside byte-level BPE).

    - ``"bpe"``: byte-level BPE as GPT-2 (the course tokenizer's recipe, no special tokens): spaces are part of
      the tokens, every byte is in the vocabulary, so nothing is unknown.
    - ``"wordpiece"``: BERT's WordPiece: text is cut at whitespace and punctuation (the spaces are dropped), a
      word is spelled greedily with the longest vocabulary entry first, pieces inside a word start with ``##``;
      characters never seen in training become ``[UNK]``.
    - ``"unigram"``: SentencePiece's Unigram language model: a space becomes ``▁`` at the start of the next
      word, a word is cut into its most probable pieces (Viterbi); unseen characters become ``<unk>``.

    ``vocab_size`` is an upper bound: on a small corpus a trainer may stop with fewer ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a string, got {type(algorithm).__name__}")
    if algorithm not in SUBWORD_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {SUBWORD_ALGORITHMS}, got {algorithm!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (a byte alphabet and a few merges), got {vocab_size}")
    texts = _check_texts(texts)
    if not texts:
        raise ValueError("texts is empty")
    if algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], unk_token="<unk>",
                                          show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# Vocabulary sizes of released models: ids the tokenizer defines, and how the number is made up, from each
# model's own paper or code (the tokenization chapter prints this table; its references give the sources).
VOCAB_SIZES = {
    "GPT-2": {"ids": 50_257, "made of": "byte-level BPE: 256 bytes, merges, <|endoftext|>",
              "source": "Radford et al. 2019: 'The vocabulary is expanded to 50,257'"},
    "Llama 2": {"ids": 32_000, "made of": "SentencePiece BPE, digits split, byte fallback",
                "source": "Touvron et al. 2023 (Llama 2), Tokenizer: 'total vocabulary size is 32k tokens'"},
    "Llama 3": {"ids": 128_000 + 256, "made of": "128K BPE tokens (tiktoken) + 256 reserved special tokens",
                "source": "Llama 3 paper (128K tokens); meta-llama/llama3 llama/tokenizer.py "
                          "(num_reserved_special_tokens = 256)"},
    "Gemma (1 and 2)": {"ids": 256_000, "made of": "SentencePiece (gemma/tokenizer.py)",
                        "source": "google/gemma_pytorch gemma/config.py (vocab_size: int = 256000)"},
    "Qwen2.5": {"ids": 151_643 + 22, "made of": "151,643 byte-level BPE tokens + 22 control tokens",
                "source": "Qwen2.5 technical report: 151,643 regular tokens, control tokens from 3 to 22"},
    "SmolLM2": {"ids": 49_152, "made of": "the cosmo2 tokenizer (HuggingFaceTB/cosmo2-tokenizer)",
                "source": "huggingface/smollm text/pretraining/smollm2/config_smollm2_135M.yaml "
                          "(vocab_size: 49152)"},
}
