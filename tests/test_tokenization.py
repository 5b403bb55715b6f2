import pytest
from tokenizers import Tokenizer

from llmlab import data, tokenization


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
