"""llmlab.curation: deduplication checked against exact Jaccard (Python sets), LSH against its formula,
the quality rules on hand-made documents, mixtures against their definition."""
import itertools
import random

import numpy as np
import pytest

from llmlab import curation as C
from llmlab.data import corpus_split

DOCS = corpus_split("train", 120)


def test_normalize_and_exact_duplicates():
    assert C.normalize("  Mia HAS a cup!\n") == C.normalize("mia has a cup") == "mia has a cup"
    docs = ["Mia has a cup.", "Leo has a hat.", "MIA  has a cup", "Leo has a hat.", "Leo has a cat."]
    assert C.exact_duplicates(docs) == [2, 3]


def test_shingles_and_jaccard():
    assert C.shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}
    assert C.shingles("a b", 5) == {"a b"}
    assert C.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5 and C.jaccard(set(), set()) == 1.0


def test_all_pairs_jaccard_equals_python_sets():
    docs, _ = C.plant_duplicates(DOCS[:25], n_near=5, n_exact=2, seed=1)
    got = C.all_pairs_jaccard(docs, min_similarity=0.0)
    sets = [C.shingles(d) for d in docs]
    for i, j in itertools.combinations(range(len(docs)), 2):
        ref = C.jaccard(sets[i], sets[j])
        assert got.get((i, j), 0.0) == pytest.approx(ref, abs=1e-12)


def test_minhash_estimates_jaccard_without_bias():
    """Over many pairs the estimate's error averages out, and each error is within binomial noise."""
    docs, planted = C.plant_duplicates(DOCS, n_near=60, n_exact=0, seed=2)
    hasher = C.MinHasher(num_perm=256)
    sig = hasher.signatures(docs)
    errs = []
    for new, (orig, _) in planted.items():
        exact = C.jaccard(C.shingles(docs[new]), C.shingles(docs[orig]))
        est = C.estimate_jaccard(sig[new], sig[orig])
        sd = np.sqrt(max(exact * (1 - exact), 0.01) / 256)
        assert abs(est - exact) < 4.5 * sd
        errs.append(est - exact)
    assert abs(np.mean(errs)) < 0.02
    # identical shingle sets give identical signatures; the signature is deterministic
    assert np.array_equal(hasher.signatures(["a b c d e f"]), hasher.signatures(["A b c d e F!"]))
    assert np.array_equal(sig, hasher.signatures(docs))


def test_lsh_candidates_follow_the_s_curve():
    """Pairs with set similarity s built by hand: the share made candidates matches 1 - (1 - s^r)^b."""
    rng = random.Random(0)
    hasher = C.MinHasher(num_perm=40, n=1)
    for s_target, n_pairs in ((0.3, 100), (0.6, 100), (0.9, 100)):
        docs = []
        for p in range(n_pairs):
            shared = [f"w{p}_{i}" for i in range(int(50 * s_target / (1 + s_target) * 2))]
            rest = (100 - 2 * len(shared)) // 2
            a = shared + [f"a{p}_{i}" for i in range(rest)]
            b = shared + [f"b{p}_{i}" for i in range(rest)]
            rng.shuffle(a)
            docs += [" ".join(a), " ".join(b)]
        s = C.jaccard(C.shingles(docs[0], 1), C.shingles(docs[1], 1))
        cands = C.lsh_candidates(hasher.signatures(docs), 10, 4)
        found = np.mean([(2 * p, 2 * p + 1) in cands for p in range(n_pairs)])
        expected = C.lsh_probability(s, 10, 4)
        assert abs(found - expected) < 4 * np.sqrt(expected * (1 - expected) / n_pairs) + 0.02, (s, found)


def test_near_duplicates_find_the_planted_copies():
    docs, planted = C.plant_duplicates(DOCS, n_near=30, n_exact=10, seed=3)
    drop = C.near_duplicates(docs, threshold=0.75)
    assert all(i >= len(DOCS) for i in drop)  # no original document is dropped
    exact = {i for i, (_, k) in planted.items() if k == "exact"}
    assert exact <= set(drop) and exact <= set(C.exact_duplicates(docs))
    sig = C.MinHasher().signatures(docs)
    assert C.cluster_duplicates(sig, 0.75) == drop


def test_quality_flags_on_hand_made_documents():
    rules = C.QualityRules(min_words=5)
    good = "The cat and the dog play in the park with a red ball. They have fun."
    assert C.quality_flags(good, rules) == []
    assert "words" in C.quality_flags(good)  # Gopher's 50-word minimum
    assert "stop_words" in C.quality_flags("Mia cat red ball park kite sock hill lake.", rules)
    assert "alphabetic" in C.quality_flags("1 2 3 4 5 and the cat 6 7.", rules)
    assert "symbols" in C.quality_flags("The cat and the dog #a #b #c #d.", rules)
    assert "bullets" in C.quality_flags("- the cat\n- and dog\n- the owl\n- and fox", rules)
    assert "duplicate_lines" in C.quality_flags("The cat and the dog.\n" * 5, rules)
    assert "lorem_ipsum" in C.quality_flags("Lorem ipsum dolor and the sit amet.", rules)
    assert "curly_bracket" in C.quality_flags('{"the": "cat", "and": "dog", "to": 1}', rules)
    assert "terminal_punctuation" in C.quality_flags("the cat and\nthe dog to\nthe owl of", rules)
    for kind, doc in C.junk_documents(3, seed=1):
        assert C.quality_flags(doc, rules), kind


def test_mixtures():
    epochs = C.mixture_epochs({"a": 1000, "b": 100}, {"a": 3, "b": 1}, 2000)
    assert epochs == {"a": 1.5, "b": 5.0}
    sources = {"a": [f"a{i}" for i in range(50)], "b": ["b0", "b1"]}
    drawn = C.sample_mixture(sources, {"a": 0.75, "b": 0.25}, 4000, seed=0)
    share_b = sum(k == "b" for k, _ in drawn) / 4000
    assert abs(share_b - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    a_docs = [d for k, d in drawn if k == "a"]
    assert set(a_docs[:50]) == set(sources["a"])  # a source is used up before it repeats
    assert drawn == C.sample_mixture(sources, {"a": 0.75, "b": 0.25}, 4000, seed=0)


@pytest.mark.parametrize("call, err", [
    (lambda: C.normalize(3), TypeError),
    (lambda: C.exact_duplicates("one doc"), TypeError),
    (lambda: C.exact_duplicates(["a", 2]), TypeError),
    (lambda: C.shingles("a b", 0), ValueError),
    (lambda: C.jaccard([1], {1}), TypeError),
    (lambda: C.MinHasher(num_perm=0), ValueError),
    (lambda: C.MinHasher(seed="0"), TypeError),
    (lambda: C.estimate_jaccard(np.zeros(3), np.zeros(4)), ValueError),
    (lambda: C.lsh_candidates(np.zeros((3, 8), dtype=np.uint64), 3, 3), ValueError),
    (lambda: C.lsh_candidates([[1, 2]], 1, 1), ValueError),
    (lambda: C.lsh_probability(0.5, 0, 8), ValueError),
    (lambda: C.near_duplicates(["a b"], threshold=1.5), ValueError),
    (lambda: C.near_duplicates(["a b"], hasher="minhash"), TypeError),
    (lambda: C.all_pairs_jaccard(["a"], min_similarity=-0.1), ValueError),
    (lambda: C.QualityRules(min_words=0), ValueError),
    (lambda: C.quality_flags(None), TypeError),
    (lambda: C.quality_flags("the cat", rules={}), TypeError),
    (lambda: C.mixture_epochs({"a": 10}, {"b": 1}, 10), ValueError),
    (lambda: C.mixture_epochs({"a": 10}, {"a": -1}, 10), ValueError),
    (lambda: C.mixture_epochs({"a": 10}, {"a": 0}, 10), ValueError),
    (lambda: C.mixture_epochs({"a": 10}, [1], 10), TypeError),
    (lambda: C.sample_mixture({"a": []}, {"a": 1}, 3), ValueError),
    (lambda: C.sample_mixture({"a": ["x"]}, {"a": 1}, 0), ValueError),
    (lambda: C.plant_duplicates(["a"], 2, 0), ValueError),
    (lambda: C.junk_documents(-1), ValueError),
])
def test_bad_input(call, err):
    with pytest.raises(err):
        call()
