import pytest
import torch

from llmlab import pretrain
from llmlab.pretrain import Recipe


@pytest.mark.slow
def test_a_short_run_of_the_recipe_lowers_the_loss():
    r = Recipe(steps=30, batch_size=8, seq_len=128, train_docs=3000, tokenizer_docs=3000, val_docs=100,
               warmup=5, threads=2)
    model, tok, hist = pretrain.train(r, eval_every=10, progress=False)
    assert hist["val_loss"][-1] < hist["val_loss"][0] - 0.5
    assert hist["train_loss"][-1] < hist["train_loss"][0] - 1.0
    assert hist["tokens_seen"] == 30 * 8 * 128
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_evaluate_equals_the_transformers_loss(course_model):
    """Our token-weighted validation loss is the same cross-entropy transformers computes from labels."""
    model, tok = course_model
    rows = pretrain.validation_rows(tok, Recipe(val_docs=40))
    with torch.no_grad():
        hf = torch.stack([model(input_ids=rows[i:i + 4], labels=rows[i:i + 4]).loss
                          for i in range(0, len(rows) - len(rows) % 4, 4)]).mean().item()
    ours = pretrain.evaluate(model, rows[: len(rows) - len(rows) % 4], batch_size=4)
    assert ours == pytest.approx(hf, rel=1e-5)


def test_pack_puts_eos_between_documents():
    class Tok:
        eos_token_id = 0

        def __call__(self, docs, add_special_tokens=False):
            return {"input_ids": [[len(d)] * len(d) for d in docs]}

    rows = pretrain.pack(["ab", "cde", "f"], Tok(), seq_len=3)
    assert rows.tolist() == [[2, 2, 0], [3, 3, 3], [0, 1, 0]]  # 2 2 EOS 3 3 3 EOS 1 EOS
    with pytest.raises(ValueError):
        pretrain.pack(["a"], Tok(), seq_len=10)


def test_learning_rate_schedule():
    r = Recipe(steps=100, warmup=10, lr=1e-3)
    assert pretrain.lr_at(0, r) == pytest.approx(1e-4)
    assert pretrain.lr_at(10, r) == pytest.approx(1e-3)
    assert pretrain.lr_at(99, r) == pytest.approx(1e-4, rel=0.01)


def test_bad_recipe():
    with pytest.raises(ValueError):
        pretrain.train(Recipe(steps=0))
