import random
from collections import Counter

import pytest
import regex
from tokenizers import Tokenizer

from llmlab import data, models, tokenization
from llmlab.env import COURSE_MODEL
from llmlab.tokenization import BPE


@pytest.fixture(scope="module")
def tok():
    return tokenization.train_tokenizer(data.pretraining_corpus(2000, seed=0), vocab_size=512)


def test_round_trip_and_specials(tok):
    for doc in data.pretraining_corpus(50, seed=9):
        assert tok.decode(tok(doc)["input_ids"]) == doc
    for s in tokenization.SPECIAL_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == tokenization.EOS and tok.pad_token == tokenization.PAD


def test_wrapper_matches_the_tokenizers_library(tok, tmp_path):
    """The PreTrainedTokenizerFast gives the same ids as the raw `tokenizers` model it wraps, after a save."""
    tok.save_pretrained(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for doc in data.pretraining_corpus(30, seed=11):
        assert raw.encode(doc).ids == tok(doc, add_special_tokens=False)["input_ids"]


def test_training_equals_a_plain_tokenizers_bpe():
    """train_tokenizer is the `tokenizers` library's byte-level BPE and nothing more: the same trainer on the same
    text gives the same vocabulary and the same ids."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    docs = data.pretraining_corpus(1500, seed=4)
    ours = tokenization.train_tokenizer(docs, vocab_size=400)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, special_tokens=tokenization.SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert ours.get_vocab() == raw.get_vocab()
    for doc in data.pretraining_corpus(20, seed=5):
        assert ours(doc, add_special_tokens=False)["input_ids"] == raw.encode(doc).ids


def test_chat_template_marks_only_assistant_tokens(tok):
    msgs = [{"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 plus 3 is 5."}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "2 plus 3 is 5.<|end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"


def test_bad_inputs():
    with pytest.raises(ValueError):
        tokenization.train_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(TypeError):
        tokenization.train_tokenizer("one string", vocab_size=512)
    with pytest.raises(TypeError):
        tokenization.train_tokenizer(["a"], vocab_size=512.0)


# ----------------------------------------------------------------- BPE from scratch --

TRICKY = [
    "", " ", "  ", "\n", "\n\n", "a  b", "a\n\n b", "Hello   world\t\n", "   leading and trailing   ",
    "12 123 1234 2026 3.14159 1,000,000 -7", "don't you'll I'M it's", "!!!??? ... --- ((x))",
    "naïve café über Ñandú", "😀👍🏽 👨‍👩‍👧", "你好，世界", "Привет, мир", "مرحبا", "\r\n\u00a0\u2003\u200b\t",
    "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n", "<|endoftext|><|end|><|end", "x<|pad|>y<|system|>",
    "<|end|>" * 3, "<|unknown|> <| end |>",
]


@pytest.fixture(scope="module")
def course_tok():
    return models.load(COURSE_MODEL)[1]


@pytest.fixture(scope="module")
def course_bpe(course_tok):
    return BPE.from_tokenizers(course_tok)


def _texts(n):
    """Course-corpus documents, chat-formatted tasks and the tricky strings."""
    docs = data.corpus_split("validation", n) + data.corpus_split("test", n // 4)
    docs += [t.prompt + "\n" + t.response for t in data.instruction_tasks(n // 4, seed=3)]
    return docs + TRICKY


def test_byte_alphabet_is_the_one_tokenizers_uses():
    from tokenizers import pre_tokenizers

    table = tokenization.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_split_pattern_is_the_tokenizers_byte_level_pre_tokenizer():
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    table = tokenization.bytes_to_unicode()
    for text in _texts(40):
        ours = ["".join(table[b] for b in chunk.encode()) for chunk in
                regex.findall(tokenization.GPT2_SPLIT_PATTERN, text)]
        assert ours == [piece for piece, _ in pre.pre_tokenize_str(text)], text


def test_from_tokenizers_gives_the_course_tokenizers_ids(course_tok, course_bpe):
    backend = course_tok.backend_tokenizer
    assert course_bpe.vocab_size == backend.get_vocab_size() == len(course_tok)
    assert course_bpe.special_tokens == {s: course_tok.convert_tokens_to_ids(s) for s in tokenization.SPECIAL_TOKENS}
    texts = _texts(400)
    for text in texts:
        ids = course_bpe.encode(text, allowed_special="all")  # transformers always matches special tokens
        assert ids == backend.encode(text).ids == course_tok(text, add_special_tokens=False)["input_ids"], text
        assert course_bpe.decode(ids) == backend.decode(ids, skip_special_tokens=False) == text
    # the same again with the merge loop run for every chunk, not read back from the cache
    fresh = BPE.from_tokenizers(course_tok.backend_tokenizer)
    fresh.cache = False
    assert all(fresh.encode(t, allowed_special="all") == backend.encode(t).ids for t in texts[:100] + TRICKY)
    assert fresh._cache == {}


def test_from_tokenizers_on_a_multilingual_vocabulary():
    """Merges of multi-byte characters (accents, CJK, emoji) are mapped back from GPT-2's alphabet correctly."""
    extra = ["naïve café über straße", "你好，世界。你好吗？", "Привет, как дела?", "😀😀 👍🏽👍🏽 🎉"] * 50
    hf = tokenization.train_tokenizer(data.pretraining_corpus(300, seed=6) + extra, vocab_size=600)
    bpe = BPE.from_tokenizers(hf)
    assert any(len(b) > 1 and max(b) >= 0x80 for b in bpe.vocab.values())  # some merged non-ASCII bytes
    for text in extra[:4] + TRICKY + data.pretraining_corpus(50, seed=7):
        assert bpe.encode(text, allowed_special="all") == hf.backend_tokenizer.encode(text).ids, text


def test_decode_round_trips_any_unicode_and_matches_tokenizers_on_broken_bytes(course_tok, course_bpe):
    rng = random.Random(0)
    trained = BPE().train(data.pretraining_corpus(300, seed=1), 400)
    planes = [(0x20, 0x7F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0, 0x10FFFF)]
    for _ in range(300):
        text = "".join(chr(c) for c in (rng.randint(*rng.choice(planes)) for _ in range(rng.randint(0, 12)))
                       if not 0xD800 <= c <= 0xDFFF)  # surrogates are not characters
        for bpe in (course_bpe, trained, BPE()):
            assert bpe.decode(bpe.encode(text)) == text
    # ids whose bytes are not valid UTF-8 on their own: the same U+FFFD replacements as `tokenizers`
    backend = course_tok.backend_tokenizer
    for _ in range(500):
        ids = [rng.randrange(len(tokenization.SPECIAL_TOKENS), course_bpe.vocab_size) for _ in range(rng.randint(1, 6))]
        assert course_bpe.decode(ids) == backend.decode(ids)
    assert course_bpe.decode(course_bpe.encode("é")[:1]) == "\ufffd"
    assert BPE().encode("é") == list("é".encode()) == [0xC3, 0xA9]


def test_special_tokens_only_where_allowed(course_bpe):
    eos, end = course_bpe.special_tokens["<|endoftext|>"], course_bpe.special_tokens["<|end|>"]
    text = "hi<|end|>there<|endoftext|>"
    everything = course_bpe.encode(text, allowed_special="all")
    assert everything.count(end) == 1 and everything.count(eos) == 1
    plain = course_bpe.encode(text)  # default "none": the markers are ordinary text
    assert end not in plain and eos not in plain and course_bpe.decode(plain) == text
    only_eos = course_bpe.encode(text, allowed_special={"<|endoftext|>"})
    assert end not in only_eos and only_eos[-1] == eos
    assert course_bpe.encode("<|endoftext|>", allowed_special="all") == [eos]
    nested = BPE().train(["x y"], 300, special_tokens=["<a>", "<a>b"])
    assert nested.encode("<a>b<a>", allowed_special="all") == [nested.special_tokens["<a>b"],
                                                                 nested.special_tokens["<a>"]]  # longest match


def test_encode_applies_merges_by_rank_not_longest_match():
    bpe = BPE()
    a, b, c = ord("a"), ord("b"), ord("c")
    bpe.merges = {(b, c): 256, (a, b): 257}  # "bc" ranks first, so "abc" is a + bc even though "ab" exists
    bpe.vocab.update({256: b"bc", 257: b"ab"})
    bpe._reset()
    assert bpe.encode("abc") == [a, 256]
    assert bpe.encode("abab") == [257, 257] and bpe.encode("aab") == [a, 257]
    assert bpe.decode([a, 256]) == "abc"
    bpe.merges[(a, ord(" "))] = 258  # a merge that spans two GPT-2 chunks ("a", " b") never applies
    bpe.vocab[258] = b"a "
    bpe._reset()
    assert bpe.encode("a b") == [a, ord(" "), b] and bpe.encode("a ") == [a, ord(" ")]


def test_training_merges_the_most_frequent_pair_first():
    docs = data.pretraining_corpus(500, seed=2)
    bpe = BPE().train(docs, 300, special_tokens=["<|endoftext|>"])
    pairs = Counter()
    for doc in docs:
        for chunk in regex.findall(tokenization.GPT2_SPLIT_PATTERN, doc):
            pairs.update(zip(chunk.encode(), chunk.encode()[1:]))
    top = max(pairs.values())
    assert next(iter(bpe.merges)) == min(p for p, n in pairs.items() if n == top)  # ties: smallest ids
    assert list(bpe.merges.values()) == list(range(256, 299))
    assert bpe.special_tokens == {"<|endoftext|>": 299} and bpe.vocab_size == 300
    assert all(bpe.vocab[i] == bpe.vocab[p[0]] + bpe.vocab[p[1]] for p, i in bpe.merges.items())
    again = BPE().train(docs, 300, special_tokens=["<|endoftext|>"])
    assert again.merges == bpe.merges  # deterministic
    assert BPE().train(["ab", "cd"], 257).merges == {(ord("a"), ord("b")): 256}  # a tie: smallest ids win


def test_training_stops_when_every_chunk_is_one_token():
    docs = data.pretraining_corpus(300, seed=8)
    bpe = BPE().train(docs, 5000)
    chunks = {c for d in docs for c in regex.findall(tokenization.GPT2_SPLIT_PATTERN, d)}
    assert bpe.vocab_size < 5000
    assert all(len(bpe.encode(c)) == 1 for c in chunks)


def test_training_compresses_like_tokenizers():
    """Same corpus, same vocabulary size (including the 6 special tokens): the same compression to within 1%.

    Measured: identical tokens per character (0.3552 on 1000 validation documents at 512 ids, trained on
    2000 documents), and all but one of the 512 vocabulary entries the same bytes (a tie broken the other way)."""
    train, held_out = data.corpus_split("train", 2000), data.corpus_split("validation", 1000)
    ours = BPE().train(train, 512, tokenization.SPECIAL_TOKENS)
    theirs = tokenization.train_tokenizer(train, vocab_size=512)
    assert ours.vocab_size == len(theirs) == 512
    chars = sum(map(len, held_out))
    ours_tpc = sum(len(ours.encode(d)) for d in held_out) / chars
    theirs_tpc = sum(len(ids) for ids in theirs(held_out, add_special_tokens=False)["input_ids"]) / chars
    assert ours_tpc < 0.5 * len(" ".join(held_out).encode()) / chars  # it compresses at all: < half the bytes
    assert abs(ours_tpc / theirs_tpc - 1) < 0.01
    shared = set(ours.vocab.values()) & set(BPE.from_tokenizers(theirs).vocab.values())
    assert len(shared) >= 0.97 * 512


def test_bpe_bad_inputs(course_bpe):
    with pytest.raises(TypeError):
        BPE().train("one string", 300)
    with pytest.raises(TypeError):
        BPE().train(["ok", 3], 300)
    with pytest.raises(TypeError):
        BPE().train(["ok"], 300.0)
    with pytest.raises(ValueError):
        BPE().train(["ok"], 258, special_tokens=["<a>", "<b>", "<c>"])
    with pytest.raises(ValueError):
        BPE().train(["ok"], 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(TypeError):
        BPE().train(["ok"], 300, special_tokens="<a>")
    with pytest.raises(TypeError):
        BPE(cache=1)
    with pytest.raises(TypeError):
        course_bpe.encode(b"bytes")
    with pytest.raises(TypeError):
        course_bpe.encode("x", allowed_special="some")
    with pytest.raises(ValueError):
        course_bpe.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError):
        course_bpe.encode("\ud800")  # a lone surrogate has no UTF-8 bytes
    with pytest.raises(TypeError):
        course_bpe.decode("abc")
    with pytest.raises(TypeError):
        course_bpe.decode([1.0])
    with pytest.raises(ValueError):
        course_bpe.decode([course_bpe.vocab_size])
    with pytest.raises(TypeError):
        BPE.from_tokenizers("gpt2")


def test_from_tokenizers_rejects_other_kinds_of_tokenizer():
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers, trainers

    wordpiece = Tokenizer(tk_models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(["a b c"], trainers.WordPieceTrainer(vocab_size=50, show_progress=False))
    with pytest.raises(ValueError, match="not a GPT-2-style"):
        BPE.from_tokenizers(wordpiece)
    spaced = Tokenizer(tk_models.BPE())
    spaced.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    spaced.train_from_iterator(["a b c"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    with pytest.raises(ValueError, match="add_prefix_space"):
        BPE.from_tokenizers(spaced)
    no_bytes = Tokenizer(tk_models.BPE())
    no_bytes.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    no_bytes.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    with pytest.raises(ValueError, match="lacks"):
        BPE.from_tokenizers(no_bytes)


def test_train_subword_three_families_on_the_course_corpus(tok):
    docs = data.corpus_split("train", 100)
    wp = tokenization.train_subword(docs, 300, "wordpiece")
    uni = tokenization.train_subword(docs, 300, "unigram")
    text = "Mia has a red ball. Zoe reads a book."
    # "bpe" is the course recipe (the fixture) without its special tokens: the same merges, the same pieces
    bpe = tokenization.train_subword(data.pretraining_corpus(2000, seed=0), 512 - 6, "bpe")
    assert bpe.encode(text).tokens == tok.backend_tokenizer.encode(text).tokens
    assert bpe.decode(bpe.encode(text).ids) == text
    # WordPiece drops the spaces and marks pieces inside a word with ##
    pieces = wp.encode(" unhappily").tokens
    assert len(pieces) > 1 and pieces[0] == "u" and all(p.startswith("##") for p in pieces[1:])
    assert all(" " not in p for p in wp.encode(text).tokens)
    # Unigram keeps a space as the start of the next piece
    assert uni.encode(" ball").tokens[0].startswith("\u2581")
    assert uni.decode(uni.encode(text).ids) == text
    # only byte-level BPE has no unknown characters
    emoji = "a \U0001F642"
    assert wp.token_to_id("[UNK]") in wp.encode(emoji).ids
    assert uni.token_to_id("<unk>") in uni.encode(emoji).ids
    assert bpe.decode(bpe.encode(emoji).ids) == emoji


def test_train_subword_bad_inputs():
    with pytest.raises(ValueError):
        tokenization.train_subword(["a b"], 300, "sentencepiece")
    with pytest.raises(TypeError):
        tokenization.train_subword(["a b"], 300, 1)
    with pytest.raises(TypeError):
        tokenization.train_subword(["a b"], 300.0, "bpe")
    with pytest.raises(ValueError):
        tokenization.train_subword(["a b"], 100, "bpe")
    with pytest.raises(TypeError):
        tokenization.train_subword("a b", 300, "bpe")
    with pytest.raises(ValueError):
        tokenization.train_subword([], 300, "bpe")


def test_vocab_sizes_add_up():
    sizes = {name: row["ids"] for name, row in tokenization.VOCAB_SIZES.items()}
    assert sizes["GPT-2"] == 50_257 and sizes["Llama 2"] == 32_000 and sizes["Llama 3"] == 128_256
    assert sizes["Gemma (1 and 2)"] == 256_000 and sizes["Qwen2.5"] == 151_665 and sizes["SmolLM2"] == 49_152
    assert all(row["source"] and row["made of"] for row in tokenization.VOCAB_SIZES.values())
