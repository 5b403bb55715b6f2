import pytest
import torch

from llmlab import pretrain
from llmlab.pretrain import Recipe


@pytest.mark.slow
def test_a_short_run_of_the_recipe_lowers_the_loss():
    r = Recipe(steps=30, batch_size=8, seq_len=128, train_docs=3000, tokenizer_docs=3000, val_docs=100,
               warmup=5, threads=1)  # one thread: the other pytest worker keeps the second core
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


# ---------------------------------------------------------------- chapter: Pretraining --

def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def test_next_token_loss_equals_the_model_loss():
    model = _tiny_llama()
    x = torch.randint(96, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, 5:] = -100  # a padded row: its tail is not scored
    out = model(input_ids=x, labels=labels)
    assert pretrain.next_token_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-6)
    n = (labels[:, 1:] != -100).sum()
    assert (pretrain.next_token_loss(out.logits, labels, reduction="sum") / n).item() == \
        pytest.approx(out.loss.item(), rel=1e-6)
    with pytest.raises(ValueError):
        pretrain.next_token_loss(out.logits[0], labels)
    with pytest.raises(ValueError):
        pretrain.next_token_loss(out.logits, labels, reduction="max")
    with pytest.raises(TypeError):
        pretrain.next_token_loss(out.logits.tolist(), labels)


def test_gradient_accumulation_by_token_count_equals_one_big_batch():
    """Sum of token losses over all micro-batches / all tokens == the big batch's mean; averaging per micro-batch
    differs when the micro-batches hold different numbers of scored tokens."""
    model = _tiny_llama()
    x = torch.randint(96, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[:2, 4:] = -100  # the first micro-batch has far fewer scored tokens
    grads = lambda: torch.cat([p.grad.flatten() for p in model.parameters()])  # noqa: E731
    model.zero_grad()
    pretrain.next_token_loss(model(input_ids=x).logits, labels).backward()
    big = grads()
    micro = [(x[:2], labels[:2]), (x[2:], labels[2:])]
    total = sum(int((lab[:, 1:] != -100).sum()) for _, lab in micro)
    model.zero_grad()
    for xi, li in micro:
        (pretrain.next_token_loss(model(input_ids=xi).logits, li, reduction="sum") / total).backward()
    assert torch.allclose(grads(), big, atol=1e-6)
    model.zero_grad()
    for xi, li in micro:
        (pretrain.next_token_loss(model(input_ids=xi).logits, li) / len(micro)).backward()
    assert (grads() - big).abs().max() > 1e-3


def test_clip_grad_norm_equals_torch():
    for max_norm in (0.01, 1.0, 1e6):  # clipped and not clipped
        a, b = _tiny_llama(), _tiny_llama()
        x = torch.randint(96, (2, 12), generator=torch.Generator().manual_seed(2))
        for m in (a, b):
            m(input_ids=x, labels=x).loss.backward()
        ours = pretrain.clip_grad_norm(a.parameters(), max_norm)
        theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError):
        pretrain.clip_grad_norm(_tiny_llama().parameters(), 1.0)  # no gradients
    with pytest.raises(ValueError):
        pretrain.clip_grad_norm(a.parameters(), 0)


def test_loss_scaler_equals_grad_scaler():
    """fp16 autocast on CPU from a scale so large the first steps overflow: the same skipped steps, the same
    scale after every step, the same weights at the end as torch.amp.GradScaler."""
    import copy

    a = _tiny_llama()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22, growth_interval=3)
    ours = pretrain.LossScaler(init_scale=2.0 ** 22, growth_interval=3)
    gen = torch.Generator().manual_seed(0)
    scales = []
    for _ in range(10):
        x = torch.randint(96, (2, 16), generator=gen)
        for m, o, s in ((a, oa, theirs), (b, ob, ours)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = m(input_ids=x, labels=x).loss
            o.zero_grad()
            s.scale(loss).backward()
            s.step(o)
            s.update()
        scales.append((theirs.get_scale(), ours.scale_value))
    assert all(t == o for t, o in scales)
    assert ours.skipped >= 2 and scales[-1][0] < 2.0 ** 22
    assert any(later > earlier for (earlier, _), (later, _) in zip(scales, scales[1:]))  # it grew back too
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError):
        pretrain.LossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError):
        pretrain.LossScaler(growth_interval=0)


def test_fp8_roundtrip():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-3
    rel = lambda y: ((y - x).norm() / x.norm()).item()  # noqa: E731
    assert rel(pretrain.fp8_roundtrip(x, "e4m3")) < 0.05
    assert rel(pretrain.fp8_roundtrip(x, "e4m3", scaled=False)) > rel(pretrain.fp8_roundtrip(x, "e4m3"))
    assert rel(pretrain.fp8_roundtrip(x, "e5m2")) > rel(pretrain.fp8_roundtrip(x, "e4m3"))  # fewer mantissa bits
    exact = torch.tensor([0.5, -1.0, 2.0, 448.0])  # representable in e4m3: unchanged without scaling
    assert torch.equal(pretrain.fp8_roundtrip(exact, "e4m3", scaled=False), exact)
    assert torch.equal(pretrain.fp8_roundtrip(x, "e4m3"), (x * (448 / x.abs().max())).to(torch.float8_e4m3fn)
                       .float() / (448 / x.abs().max()))
    with pytest.raises(ValueError):
        pretrain.fp8_roundtrip(x, "e3m4")
    with pytest.raises(TypeError):
        pretrain.fp8_roundtrip(torch.arange(4), "e4m3")


def _tiny_recipe(steps=6):
    return Recipe(vocab_size=768, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, seq_len=32, batch_size=4, steps=steps, warmup=2, train_docs=300,
                  val_docs=20, threads=1)


def test_train_step_is_the_recipe_and_a_checkpoint_resumes_exactly(course_model, tmp_path):
    from llmlab.data import corpus_split

    _, tok = course_model
    r = _tiny_recipe()
    _, _, hist = pretrain.train(r, tokenizer=tok, log_every=1, eval_every=100, progress=False)
    rows = pretrain.pack(corpus_split("train", r.train_docs), tok, r.seq_len)

    def run(start, stop, model, opt, gen):
        return [pretrain.train_step(model, opt, rows, s, r, gen) for s in range(start, stop)]

    straight_model = pretrain.init_model(r, tok)
    opt, gen = pretrain.make_optimizer(straight_model, r), torch.Generator().manual_seed(r.seed)
    straight = run(0, r.steps, straight_model, opt, gen)
    assert straight == hist["train_loss"]  # the same losses as pretrain.train, bit for bit

    model = pretrain.init_model(r, tok)
    opt, gen = pretrain.make_optimizer(model, r), torch.Generator().manual_seed(r.seed)
    first = run(0, 3, model, opt, gen)
    pretrain.save_checkpoint(tmp_path / "ck.pt", model, opt, 3, gen)
    model2 = pretrain.init_model(Recipe(**{**r.__dict__, "seed": 5}), tok)  # different weights until loaded
    opt2, gen2 = pretrain.make_optimizer(model2, r), torch.Generator().manual_seed(99)
    step = pretrain.load_checkpoint(tmp_path / "ck.pt", model2, opt2, gen2)
    assert first + run(step, r.steps, model2, opt2, gen2) == straight
    assert all(torch.equal(p, q) for p, q in zip(straight_model.parameters(), model2.parameters()))
    with pytest.raises(ValueError):
        pretrain.load_checkpoint(tmp_path / "missing.pt", model2, opt2, gen2)
    with pytest.raises(TypeError):
        pretrain.save_checkpoint(tmp_path / "x.pt", model2, opt2, 3, None)
    with pytest.raises(TypeError):
        pretrain.train_step("model", opt2, rows, 0, r, gen2)
    with pytest.raises(TypeError):
        pretrain.train_step(model2, opt2, rows, 0, {"steps": 6}, gen2)
    with pytest.raises(TypeError):
        pretrain.init_model({"hidden_size": 64}, tok)
    with pytest.raises(TypeError):
        pretrain.make_optimizer(model2, None)
