"""tokenization.training_chat_template on SmolLM2's real tokenizer (issue 15): trl
1.16's SFTTrainer(assistant_only_loss=True) rejects SmolLM2's own ChatML template;
the training template renders the same text and masks exactly the assistant's
tokens."""
import copy
import sys
from unittest import mock

import pytest

from llmlab import models, tokenization

NAME = "smollm2-135m-instruct"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Spain?"},
     {"role": "assistant", "content": "Madrid."}],
    [{"role": "user", "content": "Count to two."},
     {"role": "assistant", "content": "One,\ntwo."},
     {"role": "user", "content": "Now in French, with 'quotes' and {braces}."},
     {"role": "assistant", "content": " Un, deux. "},
     {"role": "user", "content": "Thanks!"}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Say bye."},
     {"role": "assistant", "content": "Bye."}],
]


@pytest.fixture(scope="module")
def smollm2():
    if not models.is_cached(NAME):
        pytest.skip(f"{NAME} is not cached here: `make smollm2` fetches it")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.offline_model_dir(NAME))


@pytest.fixture(scope="module")
def template(smollm2):
    return tokenization.training_chat_template(smollm2)


def with_template(tok, chat_template):
    """A shallow copy of ``tok`` with another template (the fixture is shared)."""
    other = copy.copy(tok)
    other.chat_template = chat_template
    return other


def test_renders_the_same_text_as_smollm2s_template(smollm2, template):
    assert "{% generation %}" in template and template != smollm2.chat_template
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            want = smollm2.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=prompt)
            got = smollm2.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=prompt,
                                              chat_template=template)
            assert got == want
    # SmolLM2 injects its default system prompt when there is none; kept, exactly
    text = smollm2.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                       chat_template=template)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named "
                           "SmolLM, trained by Hugging Face<|im_end|>\n")


def test_mask_covers_exactly_each_assistant_message_and_its_end(smollm2, template):
    for messages in CONVERSATIONS:
        out = smollm2.apply_chat_template(messages, chat_template=template,
                                          return_assistant_tokens_mask=True,
                                          return_dict=True, tokenize=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        spans, start = [], None
        for i, m in enumerate([*mask, 0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append(smollm2.decode(ids[start:i]))
                start = None
        want = [m["content"] + "<|im_end|>" for m in messages
                if m["role"] == "assistant"]
        assert spans == want
        # the original template gives no mask at all: what lab 2's own loop would get
        plain = smollm2.apply_chat_template(messages, return_assistant_tokens_mask=True,
                                            return_dict=True, tokenize=True)
        assert plain["input_ids"] == ids and not any(plain["assistant_masks"])


def test_trl_accepts_it_and_rejected_the_original(smollm2, template, tmp_path):
    """trl 1.16's own checks, then its SFTTrainer on a tiny random Llama with
    SmolLM2's vocabulary: the labels are the assistant's tokens and <|im_end|>."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(smollm2)
    assert not has_generation_markers(smollm2.chat_template)
    patched = with_template(smollm2, template)
    assert has_generation_markers(template)
    assert get_training_chat_template(patched) is None  # nothing left to patch
    assert is_chat_template_stop_token_trained(smollm2, chat_template=template)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(smollm2), hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    data = Dataset.from_list([{"messages": CONVERSATIONS[1]}])
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_steps=1,
                     report_to="none", use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="not training-compatible"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=smollm2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=patched)
    labels = [t for t in trainer.train_dataset[0]["labels"] if t != -100]
    assert smollm2.decode(labels) == "Madrid.<|im_end|>"


def test_course_template_and_templates_trl_knows(smollm2):
    course = with_template(smollm2, tokenization.CHAT_TEMPLATE)
    assert tokenization.training_chat_template(course) == tokenization.CHAT_TEMPLATE
    from trl import chat_template_utils as ctu

    llama3 = with_template(smollm2, ctu.llama3_chat_template)
    assert (tokenization.training_chat_template(llama3)
            == ctu.llama3_training_chat_template)


def test_a_base_tokenizer_without_a_template_gets_plain_chatml(smollm2):
    base = with_template(smollm2, None)  # as a base model's tokenizer may ship
    template = tokenization.training_chat_template(base)
    messages = CONVERSATIONS[1]
    text = smollm2.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=True,
                                       chat_template=template)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in messages) + "<|im_start|>assistant\n"
    assert "{% generation %}" in template


def test_chatml_without_trl(smollm2, template):
    with mock.patch.dict(sys.modules, {"trl.chat_template_utils": None}):
        assert tokenization.training_chat_template(smollm2) == template


def test_templates_it_cannot_rewrite_raise_one_clear_error(smollm2):
    llama = with_template(smollm2, (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"))
    with pytest.raises(ValueError, match="Llama 3"):
        tokenization.training_chat_template(llama)
    trims = with_template(smollm2, smollm2.chat_template.replace(
        "message['content']", "message['content'] | trim"))
    with pytest.raises(ValueError, match="ChatML .* but not plain ChatML"):
        tokenization.training_chat_template(trims)
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    bare = tokenization.wrap(Tokenizer(BPE()))  # no ChatML tokens in its vocabulary
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template .* no <\\|im_start\\|>"):
        tokenization.training_chat_template(bare)
    with pytest.raises(TypeError, match="tokenizer must be"):
        tokenization.training_chat_template("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_the_turn_end_the_labs_stop_at_closes_smollm2s_assistant_turn(smollm2):
    """Preference optimisation and lab 3 stop generation at the first of ``infer.END_OF_TURN`` in the vocabulary:
    on SmolLM2 that must be the token its template closes the assistant's turn with (``<|end|>`` is not in its
    vocabulary: looked up, it gives id 0, another token)."""
    from llmlab import infer

    end = next(t for t in infer.END_OF_TURN if t in smollm2.get_vocab())
    text = smollm2.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert text.rstrip("\n").endswith("Hello." + end)
    assert smollm2.convert_tokens_to_ids(end) != smollm2.convert_tokens_to_ids("<|end|>")
