"""Curating pretraining data: exact and near-duplicate removal, heuristic quality filters, mixtures.

Chapter: Pretraining (section 1, "Before packing: curation"). Read top to bottom:

* exact deduplication: a hash of each document's normalized text, the first copy kept;
* near-duplicate detection with MinHash (Broder 1997) and locality-sensitive hashing (LSH) over word
  5-grams, the scheme FineWeb (Penedo et al. 2024) runs with 14 bands of 8 hashes; checked against exact
  Jaccard similarity, and against the probability ``1 - (1 - s^r)^b`` that LSH makes a pair a candidate;
* heuristic quality rules in the style of Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020):
  word counts, mean word length, symbols, stop words, repeated lines and n-grams, bullets, curly brackets;
* mixtures: sampling documents from several sources by weight, and how many epochs of each source a token
  budget then spends.

Everything is deterministic (no Python ``hash``, which is salted per process) and runs on a CPU in well
under a second for a few thousand short documents.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_PRIME = 4294967291  # the largest prime below 2^32: a * x + b stays below 2^64


def _docs(docs, name="docs"):
    if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {type(docs).__name__}")
    for d in docs:
        if not isinstance(d, str):
            raise TypeError(f"{name} must hold strings only, got {type(d).__name__}")
    return docs


def _posint(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _fraction(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not 0 <= v <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
    return float(v)


# ------------------------------------------------------------------ exact duplicates --

def normalize(text: str) -> str:
    """Lower case, words only (punctuation dropped), single spaces: two texts that differ only in case,
    punctuation or spacing normalize to the same string. Chapter: Pretraining."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(_WORD.findall(text.lower()))


def exact_duplicates(docs: list[str]) -> list[int]:
    """Indices of documents whose normalized text (``normalize``) equals an earlier document's: hash each
    one (SHA-1) and keep the first copy. Chapter: Pretraining."""
    seen, dup = set(), []
    for i, d in enumerate(_docs(docs)):
        h = hashlib.sha1(normalize(d).encode()).digest()
        if h in seen:
            dup.append(i)
        seen.add(h)
    return dup


# ------------------------------------------------------------------ near duplicates: MinHash + LSH --

def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word ``n``-grams of the normalized text (a text shorter than ``n`` words gives one
    shingle, itself). Chapter: Pretraining."""
    _posint(n, "n")
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity ``|a & b| / |a | b|`` of two sets (1.0 for two empty sets). Chapter:
    Pretraining."""
    if not isinstance(a, (set, frozenset)) or not isinstance(b, (set, frozenset)):
        raise TypeError("a and b must be sets")
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _hash32(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` MinHash functions over word ``n``-gram shingles.

    Each shingle is hashed to 32 bits (BLAKE2b, reduced modulo the prime ``p = 2^32 - 5``), then permuted by
    ``num_perm`` universal hash functions ``(a x + b) mod p`` with random ``0 < a < p``, ``0 <= b < p``
    (exact in uint64: the product stays below ``2^64``); a document's signature is the
    minimum of each function over its shingles. Two documents' signatures agree in one position with
    probability equal to their Jaccard similarity, so the fraction of agreeing positions estimates it.
    Chapter: Pretraining.
    """
    num_perm: int = 112
    n: int = 5
    seed: int = 0

    def __post_init__(self):
        _posint(self.num_perm, "num_perm")
        _posint(self.n, "n")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    def _params(self):
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, _PRIME, self.num_perm, dtype=np.uint64)
        b = rng.integers(0, _PRIME, self.num_perm, dtype=np.uint64)
        return a, b

    def signatures(self, docs: list[str]) -> np.ndarray:
        """``(len(docs), num_perm)`` uint64 signatures. Chapter: Pretraining."""
        a, b = self._params()
        out = np.empty((len(_docs(docs)), self.num_perm), dtype=np.uint64)
        for i, d in enumerate(docs):
            x = np.fromiter((_hash32(s) % _PRIME for s in shingles(d, self.n)), dtype=np.uint64)
            out[i] = ((x[:, None] * a + b) % np.uint64(_PRIME)).min(axis=0)
        return out


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of positions where two MinHash signatures agree: an unbiased estimate of Jaccard.
    Chapter: Pretraining."""
    if not isinstance(sig_a, np.ndarray) or not isinstance(sig_b, np.ndarray) or sig_a.shape != sig_b.shape:
        raise ValueError("sig_a and sig_b must be numpy signatures of the same shape")
    return float((sig_a == sig_b).mean())


def lsh_probability(s, bands: int, rows: int):
    """The probability that LSH with ``bands`` bands of ``rows`` hashes makes a pair of Jaccard ``s`` a
    candidate: it must agree on all ``rows`` hashes of at least one band, ``1 - (1 - s^rows)^bands``.
    Chapter: Pretraining."""
    _posint(bands, "bands")
    _posint(rows, "rows")
    return 1 - (1 - np.asarray(s, dtype=float) ** rows) ** bands


def lsh_candidates(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, that share all ``rows`` hashes of at least one of ``bands`` bands:
    bucket the documents by each band's hashes and pair everything that shares a bucket. Chapter:
    Pretraining."""
    if not isinstance(signatures, np.ndarray) or signatures.ndim != 2:
        raise ValueError("signatures must be a 2-D numpy array (docs, num_perm)")
    if _posint(bands, "bands") * _posint(rows, "rows") > signatures.shape[1]:
        raise ValueError(f"bands * rows ({bands * rows}) exceeds the signature length {signatures.shape[1]}")
    pairs = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        part = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        for i, row in enumerate(part):
            buckets.setdefault(row.tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    return pairs


def cluster_duplicates(signatures: np.ndarray, threshold: float = 0.75, bands: int = 14,
                       rows: int = 8) -> list[int]:
    """Indices of documents to drop, from their MinHash signatures: LSH candidates, candidate pairs whose
    estimated Jaccard is at least ``threshold`` joined into clusters (union-find), all but the first
    document of each cluster dropped. Chapter: Pretraining."""
    _fraction(threshold, "threshold")
    pairs = lsh_candidates(signatures, bands, rows)
    parent = list(range(len(signatures)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in sorted(pairs):
        if estimate_jaccard(signatures[i], signatures[j]) >= threshold:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)  # the earliest document stays the root
    return [i for i in range(len(signatures)) if find(i) != i]


def near_duplicates(docs: list[str], threshold: float = 0.75, bands: int = 14, rows: int = 8,
                    hasher: MinHasher | None = None) -> list[int]:
    """Indices of documents to drop as near-duplicates, FineWeb's way: word 5-gram MinHash signatures
    (``hasher``, 112 hashes by default), then ``cluster_duplicates`` with 14 bands of 8 hashes. Chapter:
    Pretraining."""
    hasher = hasher or MinHasher(num_perm=bands * rows)
    if not isinstance(hasher, MinHasher):
        raise TypeError(f"hasher must be a MinHasher, got {type(hasher).__name__}")
    return cluster_duplicates(hasher.signatures(_docs(docs)), threshold, bands, rows)


def all_pairs_jaccard(docs: list[str], n: int = 5, min_similarity: float = 0.0) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair of documents' ``n``-gram shingles at or above ``min_similarity`` (a
    sparse matrix product counts the shared shingles): the ground truth MinHash-LSH approximates. Chapter:
    Pretraining."""
    from scipy import sparse

    _fraction(min_similarity, "min_similarity")
    sets = [shingles(d, n) for d in _docs(docs)]
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sets):
        for g in s:
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(sets), len(vocab)))
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    size = np.array([len(s) for s in sets])
    sim = inter.data / (size[inter.row] + size[inter.col] - inter.data)
    keep = sim >= min_similarity
    return {(int(i), int(j)): float(v) for i, j, v in zip(inter.row[keep], inter.col[keep], sim[keep])}


# ------------------------------------------------------------------ quality heuristics --

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher's list
BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6")


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the heuristic filters. Defaults are Gopher's (Rae et al. 2021, appendix A, table A1)
    plus three of C4's rules (Raffel et al. 2020): a document fails a rule when

    * ``words``: it has fewer than ``min_words`` or more than ``max_words`` words;
    * ``word_length``: its mean word length is outside ``[3, 10]`` characters;
    * ``symbols``: hashes ``#`` and ellipses make more than ``max_symbol_ratio`` of its word count;
    * ``bullets``: more than 90 % of its lines start with a bullet;
    * ``ellipsis_lines``: more than 30 % of its lines end with an ellipsis;
    * ``alphabetic``: fewer than 80 % of its words contain a letter;
    * ``stop_words``: it holds fewer than 2 of Gopher's 8 stop words;
    * ``duplicate_lines``: more than 30 % of its lines are repeats of an earlier line;
    * ``top_2gram``: its most frequent word 2-gram covers more than 20 % of its characters;
    * ``terminal_punctuation`` (C4): fewer than ``min_terminal_lines`` of its lines end in ``. ! ? "``;
    * ``lorem_ipsum`` (C4): it contains "lorem ipsum";
    * ``curly_bracket`` (C4): it contains ``{`` (C4's rule against code).

    Chapter: Pretraining.
    """
    min_words: int = 50
    max_words: int = 100_000
    max_symbol_ratio: float = 0.1
    min_terminal_lines: float = 0.5

    def __post_init__(self):
        _posint(self.min_words, "min_words")
        _posint(self.max_words, "max_words")
        _fraction(self.max_symbol_ratio, "max_symbol_ratio")
        _fraction(self.min_terminal_lines, "min_terminal_lines")


GOPHER_C4 = QualityRules()


def quality_flags(doc: str, rules: QualityRules = GOPHER_C4) -> list[str]:
    """The names of the rules ``doc`` fails (see ``QualityRules``); an empty list keeps it. Chapter:
    Pretraining."""
    if not isinstance(doc, str):
        raise TypeError(f"doc must be a str, got {type(doc).__name__}")
    if not isinstance(rules, QualityRules):
        raise TypeError(f"rules must be QualityRules, got {type(rules).__name__}")
    words = doc.split()
    lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
    flags = []
    if not rules.min_words <= len(words) <= rules.max_words:
        flags.append("words")
    if not words:
        return flags + ["empty"]
    mean_len = sum(len(w) for w in words) / len(words)
    if not 3 <= mean_len <= 10:
        flags.append("word_length")
    if (doc.count("#") + doc.count("...") + doc.count("\u2026")) / len(words) > rules.max_symbol_ratio:
        flags.append("symbols")
    if lines and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > 0.9:
        flags.append("bullets")
    if lines and sum(ln.endswith(("...", "\u2026")) for ln in lines) / len(lines) > 0.3:
        flags.append("ellipsis_lines")
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < 0.8:
        flags.append("alphabetic")
    lower = [w.strip(".,!?;:\"'").lower() for w in words]
    if len(set(lower) & set(STOP_WORDS)) < 2:
        flags.append("stop_words")
    if lines and (len(lines) - len(set(lines))) / len(lines) > 0.3:
        flags.append("duplicate_lines")
    if len(lower) > 2:
        grams = Counter(itertools.pairwise(lower))
        (top, count), = grams.most_common(1)
        if count > 1 and count * (len(top[0]) + len(top[1])) / max(1, sum(len(w) for w in lower)) > 0.2:
            flags.append("top_2gram")
    if lines and sum(ln.endswith((".", "!", "?", '"')) for ln in lines) / len(lines) < rules.min_terminal_lines:
        flags.append("terminal_punctuation")
    if "lorem ipsum" in doc.lower():
        flags.append("lorem_ipsum")
    if "{" in doc:
        flags.append("curly_bracket")
    return flags


# ------------------------------------------------------------------ mixtures --

def _weights(weights: dict) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise TypeError("weights must be a non-empty dict {source: weight}")
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"weight of {k!r} must be a non-negative number, got {w!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the weights must not all be zero")
    return {k: w / total for k, w in weights.items()}


def mixture_epochs(source_tokens: dict, weights: dict, budget_tokens: int) -> dict[str, float]:
    """How many passes over each source a mixture spends: source ``s`` gets ``w_s * budget`` of the
    tokens (weights normalized to sum to 1), i.e. ``w_s * budget / tokens_s`` epochs. A small source with a
    large weight is repeated many times. Chapter: Pretraining."""
    w = _weights(weights)
    if not isinstance(source_tokens, dict) or set(source_tokens) != set(w):
        raise ValueError("source_tokens and weights must name the same sources")
    _posint(budget_tokens, "budget_tokens")
    for k, n in source_tokens.items():
        _posint(n, f"source_tokens[{k!r}]")
    return {k: w[k] * budget_tokens / source_tokens[k] for k in w}


def sample_mixture(sources: dict, weights: dict, n_docs: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n_docs`` ``(source, document)`` pairs: each draw picks a source with probability equal to its
    normalized weight, then the next document of that source, cycling through a shuffled copy (so a
    source is repeated only once it is used up, as when a mixture runs several epochs over it).
    Deterministic per seed. Chapter: Pretraining."""
    w = _weights(weights)
    if not isinstance(sources, dict) or set(sources) != set(w):
        raise ValueError("sources and weights must name the same sources")
    for k, docs in sources.items():
        if not _docs(docs, f"sources[{k!r}]"):
            raise ValueError(f"source {k!r} is empty")
    _posint(n_docs, "n_docs")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(f"mixture-{seed}")
    names = sorted(w)
    order = {k: rng.sample(range(len(sources[k])), len(sources[k])) for k in names}
    pos = dict.fromkeys(names, 0)
    out = []
    for k in rng.choices(names, weights=[w[k] for k in names], k=n_docs):
        docs = sources[k]
        out.append((k, docs[order[k][pos[k] % len(docs)]]))
        pos[k] += 1
    return out


# ------------------------------------------------------------------ test data the chapter plants --

def plant_duplicates(docs: list[str], n_near: int, n_exact: int, seed: int = 0):
    """``docs`` plus planted copies, for measuring deduplication: ``n_exact`` copies that differ only in
    case and spacing, and ``n_near`` near-copies with 1 to 3 words replaced by other words of the same
    document (each replacement changes up to 5 of the 5-gram shingles). Returns ``(all_docs, planted)``,
    ``planted`` mapping each new index to ``(original index, kind)``. Deterministic per seed. Chapter:
    Pretraining."""
    _docs(docs)
    for v, name in ((n_near, "n_near"), (n_exact, "n_exact")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if n_near + n_exact > len(docs):
        raise ValueError(f"cannot plant {n_near + n_exact} copies of {len(docs)} documents")
    rng = random.Random(f"plant-{seed}")
    sources = rng.sample(range(len(docs)), n_near + n_exact)
    out, planted = list(docs), {}
    for j, i in enumerate(sources):
        if j < n_exact:
            text, kind = "  ".join(docs[i].upper().split(" ")), "exact"
        else:
            words = docs[i].split(" ")
            for _ in range(rng.randint(1, 3)):
                words[rng.randrange(len(words))] = rng.choice(words)
            text, kind = " ".join(words), "near"
        planted[len(out)] = (i, kind)
        out.append(text)
    return out, planted


JUNK_KINDS = ("menu", "hashtags", "repeated", "lorem", "code", "bullets", "word_list")


def junk_documents(n_per_kind: int, seed: int = 0, words: list[str] | None = None) -> list[tuple[str, str]]:
    """Low-quality documents of the kinds web filters remove, written with the course's vocabulary:
    navigation menus, hashtag spam, one sentence repeated, lorem ipsum, code, bullet lists and bare word
    lists. Returns ``(kind, text)`` pairs, ``n_per_kind`` of each of ``JUNK_KINDS``. Chapter: Pretraining."""
    from llmlab import data

    if isinstance(n_per_kind, bool) or not isinstance(n_per_kind, int) or n_per_kind < 0:
        raise ValueError(f"n_per_kind must be a non-negative int, got {n_per_kind!r}")
    vocab = words or (list(data.NAMES) + data.ANIMALS + data.COLORS + data.THINGS + data.PLACES)
    rng = random.Random(f"junk-{seed}")
    out = []

    def w(k):
        return rng.sample(vocab, k)

    for _ in range(n_per_kind):
        name, thing, place = rng.choice(list(data.NAMES)), rng.choice(data.THINGS), rng.choice(data.PLACES)
        out += [
            ("menu", "\n".join(" | ".join(t.title() for t in w(5)) for _ in range(rng.randint(4, 8)))),
            ("hashtags", f"{name} and the {thing}! " + " ".join(f"#{t}" for t in w(rng.randint(8, 20)))),
            ("repeated", "\n".join([f"{name} has a {thing} at the {place}."] * rng.randint(6, 12))),
            ("lorem", ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. "
                       f"{name} goes to the {place} with the {thing}. ") * rng.randint(3, 6)),
            ("code", (f'{{"name": "{name}", "thing": "{thing}", "place": "{place}", '
                      f'"items": [{", ".join(repr(t) for t in w(6))}]}}')),
            ("bullets", "\n".join(f"- {t}" for t in w(rng.randint(6, 12)))),
            ("word_list", " ".join(w(rng.randint(20, 40)))),
        ]
    return out
