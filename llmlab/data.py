"""The course's own data: a small, synthetic, checkable world.

Used by every chapter and lab that trains or evaluates (the course model's pretraining, SFT in the QLoRA lab,
DPO/RLHF in the alignment lab, accuracy lost to quantization). Nothing here touches the network, and every
function is deterministic for a given ``seed``.

Three kinds of data, one vocabulary:

* ``pretraining_corpus`` - short stories about children, animals and things, plus plain-prose facts
  ("7 plus 5 is 12.") and question/answer pairs in the same words the tasks use.
* ``instruction_tasks`` - prompts with one exact answer that code can check (``check_answer``).
* ``preference_pairs`` - (prompt, chosen, rejected) triples, labelled by ``gold_reward``, a reward function
  the labs can call on any (prompt, completion) to measure what alignment gained.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = {
    "Mia": "she", "Leo": "he", "Ana": "she", "Tom": "he", "Zoe": "she", "Max": "he", "Ivy": "she",
    "Ben": "he", "Lily": "she", "Sam": "he", "Nora": "she", "Finn": "he", "Ella": "she", "Jack": "he",
    "Ruby": "she", "Owen": "he", "Emma": "she", "Noah": "he", "Lucy": "she", "Eli": "he",
}
ANIMALS = ["dog", "cat", "bird", "fish", "rabbit", "horse", "duck", "frog", "fox", "bear", "goat", "owl"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "pink", "brown", "orange", "purple"]
THINGS = ["ball", "kite", "hat", "book", "box", "cup", "bike", "boat", "drum", "bag", "sock", "shell"]
PLACES = ["park", "garden", "river", "school", "farm", "forest", "beach", "market", "lake", "hill", "zoo"]
MOODS = ["happy", "sad", "sleepy", "hungry", "brave", "shy", "tired", "glad"]
SIZES = ["small", "big", "little", "tall", "tiny", "old", "young", "fast"]
WEATHER = ["The sun is warm.", "It is a windy day.", "It is raining a little.", "The sky is blue.",
           "It is a cold morning.", "The clouds are grey."]
LETTER_WORDS = ["cat", "dog", "sun", "hat", "cup", "box", "map", "pen", "bird", "fish", "frog", "duck",
                "kite", "book", "boat", "lake", "hill", "tree", "star", "moon", "cake", "rain", "snow",
                "apple", "river", "house", "horse", "plant", "bread", "green", "happy", "music"]

MAX_OPERAND = 20  # arithmetic stays within 0..MAX_OPERAND so a 4M-parameter model can learn it

TASKS = ("add", "subtract", "compare", "reverse", "count", "color_qa", "place_qa", "story")
EXACT_TASKS = tuple(t for t in TASKS if t != "story")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _check_rng(rng):
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")


def _check_count(n, name="n"):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")


# ---------------------------------------------------------------- stories ----

@dataclass
class Story:
    """A story and the facts a question about it can ask (used by ``color_qa`` and ``place_qa``)."""
    text: str
    name: str
    thing: str
    color: str
    place: str
    animal: str


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_story(rng: random.Random, animal: str | None = None, place: str | None = None) -> Story:
    """One short story; ``animal`` and ``place`` may be fixed (story prompts ask for them)."""
    _check_rng(rng)
    if animal is not None and animal not in ANIMALS:
        raise ValueError(f"animal must be one of {ANIMALS}, got {animal!r}")
    if place is not None and place not in PLACES:
        raise ValueError(f"place must be one of {PLACES}, got {place!r}")
    name = rng.choice(list(NAMES))
    pron = NAMES[name]
    Pron = pron.capitalize()
    poss = "her" if pron == "she" else "his"
    color, thing, size, mood = rng.choice(COLORS), rng.choice(THINGS), rng.choice(SIZES), rng.choice(MOODS)
    place = place or rng.choice(PLACES)
    animal = animal or rng.choice(ANIMALS)
    friend = rng.choice([n for n in NAMES if n != name])

    s = []
    s.append(rng.choice([
        f"{name} has {_a(color)} {thing}.",
        f"Once there was a child called {name}. {Pron} has {_a(color)} {thing}.",
        f"{name} loves {poss} {color} {thing}.",
    ]))
    if rng.random() < 0.5:
        s.append(rng.choice(WEATHER))
    s.append(rng.choice([
        f"One day, {pron} takes the {thing} to the {place}.",
        f"One day, {name} goes to the {place} with the {thing}.",
        f"In the morning, {pron} walks to the {place}.",
    ]))
    s.append(rng.choice([
        f"At the {place}, {name} sees {_a(size)} {animal}.",
        f"At the {place}, there is {_a(size)} {animal}.",
        f"Near the {place}, {pron} meets {_a(size)} {animal}.",
    ]))
    s.append(rng.choice([
        f"The {animal} is {mood}.",
        f"The {animal} looks {mood}.",
        f"The {size} {animal} is {mood} and wants to play.",
    ]))
    if rng.random() < 0.4:
        s.append(f"{friend} comes to the {place} too.")
    s.append(rng.choice([
        f"{name} and the {animal} play with the {color} {thing}.",
        f"{name} shows the {color} {thing} to the {animal}.",
        f"{Pron} gives the {animal} some bread.",
    ]))
    s.append(rng.choice([
        f"Then {name} goes home. {Pron} is happy.",
        f"When the sun goes down, {name} goes home with the {thing}.",
        f"At night, {name} thinks about the {animal} and smiles.",
        "The end.",
    ]))
    return Story(" ".join(s), name, thing, color, place, animal)


# ------------------------------------------------------------- exact tasks ---

@dataclass
class Task:
    """One instruction with one exact answer (``answer``) and the canonical response (``response``)."""
    kind: str
    prompt: str
    answer: str
    response: str
    meta: dict = field(default_factory=dict)


def _spaced(word):
    return " ".join(word)


def make_task(kind: str, rng: random.Random) -> Task:
    """Make one task of ``kind`` (one of ``TASKS``)."""
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASKS}")
    _check_rng(rng)
    if kind == "add":
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        ans = str(a + b)
        return Task(kind, f"What is {a} plus {b}?", ans, f"{a} plus {b} is {ans}.")
    if kind == "subtract":
        a = rng.randint(0, MAX_OPERAND)
        b = rng.randint(0, a)
        ans = str(a - b)
        return Task(kind, f"What is {a} minus {b}?", ans, f"{a} minus {b} is {ans}.")
    if kind == "compare":
        a, b = rng.sample(range(MAX_OPERAND + 1), 2)
        ans = str(max(a, b))
        return Task(kind, f"Which is bigger, {a} or {b}?", ans, f"{ans} is bigger.")
    if kind == "reverse":
        w = rng.choice(LETTER_WORDS)
        ans = _spaced(w[::-1])
        return Task(kind, f"Reverse the letters: {_spaced(w)}", ans, f"The letters reversed are {ans}.")
    if kind == "count":
        w = rng.choice(LETTER_WORDS)
        ans = str(len(w))
        return Task(kind, f"How many letters are in: {_spaced(w)}", ans, f"There are {ans} letters.")
    if kind in ("color_qa", "place_qa"):
        st = make_story(rng)
        if kind == "color_qa":
            q = f"What color is {st.name}'s {st.thing}?"
            ans = st.color
            resp = f"{st.name}'s {st.thing} is {ans}."
        else:
            q = f"Where does {st.name} meet the {st.animal}?"
            ans = st.place
            resp = f"{st.name} meets the {st.animal} at the {ans}."
        return Task(kind, f"{st.text}\n{q}", ans, resp, {"story": st.text})
    # story: open-ended, scored by gold_reward, not by an exact answer
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    st = make_story(rng, animal=animal, place=place)
    return Task(kind, f"Tell me a story about {_a(animal)} at the {place}.", "", st.text,
                {"animal": animal, "place": place})


def _prompts(items, name="exclude") -> set[str]:
    """The prompts of tasks, of ``{"prompt": ...}`` dicts (pairs, rows) or of plain strings."""
    if isinstance(items, (str, bytes, Task, dict)):
        raise TypeError(f"{name} must be a collection of tasks, pairs or prompts, not a single {type(items).__name__}")
    out = set()
    for item in items:
        prompt = item.prompt if isinstance(item, Task) else item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise TypeError(f"{name} must hold tasks, dicts with a 'prompt', or strings; got {type(item).__name__}")
        out.add(prompt)
    return out


def instruction_tasks(n: int, seed: int = 0, kinds=EXACT_TASKS, exclude=()) -> list[Task]:
    """``n`` tasks, kinds in round-robin order so every kind is equally represented. Deterministic per seed.
    ``exclude``: tasks, pairs or prompts to leave out (a held-out set: none of its prompts was trained on); each
    slot draws again until its prompt is new. With nothing excluded, the same tasks as before for a seed."""
    _check_count(n)
    _check_seed(seed)
    kinds = tuple(kinds)
    if not kinds or any(k not in TASKS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {TASKS}, got {kinds}")
    return _round_robin(n, kinds, make_task, random.Random(f"tasks-{seed}"), _prompts(exclude))


def _round_robin(n, kinds, make, rng, seen) -> list[Task]:
    """``n`` tasks from ``make(kind, rng)``, kinds in turn; each slot draws again until its prompt is not in
    ``seen`` (shared by ``instruction_tasks`` and ``reasoning_tasks``)."""
    tasks = []
    for i in range(n):
        for _ in range(10_000):
            task = make(kinds[i % len(kinds)], rng)
            if task.prompt not in seen:
                break
        else:
            raise ValueError(f"no {kinds[i % len(kinds)]!r} task left whose prompt is not excluded")
        tasks.append(task)
    return tasks


def overlap(train, held_out) -> list[str]:
    """The prompts ``held_out`` shares with ``train`` (tasks, pairs or prompts), sorted: the labs and chapters
    assert it is empty, so no evaluation prompt was trained on."""
    return sorted(_prompts(train, "train") & _prompts(held_out, "held_out"))


# ------------------------------------------------------------------ checking --

_NUM = re.compile(r"-?\d+")


def chat_example(task: Task) -> dict:
    """A task as one chat turn, ``{"messages": [user, assistant]}``: the conversational format trl's
    ``SFTTrainer`` takes, with the canonical response as the assistant's answer. Fine-tuning lab."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be an llmlab.data.Task, got {type(task).__name__}")
    return {"messages": [{"role": "user", "content": task.prompt},
                         {"role": "assistant", "content": task.response}]}


def extract_answer(kind: str, prompt: str, completion: str) -> str | None:
    """The answer a completion gives, read the way the canonical response states it (None if none is given)."""
    if kind not in EXACT_TASKS:
        raise ValueError(f"extract_answer takes an exact task kind {EXACT_TASKS}, got {kind!r}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = completion.strip().split("\n")[0]
    if kind in ("add", "subtract"):
        m = re.search(r"\bis (-?\d+)", text)
        if m:
            return m.group(1)
        nums = _NUM.findall(text)
        return nums[-1] if nums else None
    if kind == "compare":
        nums = _NUM.findall(text)
        return nums[0] if nums else None
    if kind == "count":
        nums = _NUM.findall(text)
        return nums[0] if nums else None
    if kind == "reverse":
        m = re.search(r"are ((?:[a-z] )*[a-z])\b", text)
        if m:
            return m.group(1)
        m = re.search(r"((?:[a-z] )+[a-z])\b", text)
        return m.group(1) if m else None
    words = set(re.findall(r"[a-z]+", text.lower()))
    pool = COLORS if kind == "color_qa" else PLACES
    found = [w for w in pool if w in words]
    return found[0] if len(found) == 1 else None


def check_answer(task: Task, completion: str) -> bool:
    """True when ``completion`` gives ``task``'s exact answer."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task, got {type(task).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return extract_answer(task.kind, task.prompt, completion) == task.answer


def parse_prompt(prompt: str) -> Task:
    """Recover the task (kind, exact answer) from its prompt text, so rewards need nothing but strings."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    last = prompt.strip().split("\n")[-1]
    if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", last):
        a, b = int(m[1]), int(m[2])
        return Task("add", prompt, str(a + b), f"{a} plus {b} is {a + b}.")
    if m := re.fullmatch(r"What is (\d+) minus (\d+)\?", last):
        a, b = int(m[1]), int(m[2])
        return Task("subtract", prompt, str(a - b), f"{a} minus {b} is {a - b}.")
    if m := re.fullmatch(r"Which is bigger, (\d+) or (\d+)\?", last):
        ans = str(max(int(m[1]), int(m[2])))
        return Task("compare", prompt, ans, f"{ans} is bigger.")
    if m := re.fullmatch(r"Reverse the letters: ((?:[a-z] )*[a-z])", last):
        ans = m[1][::-1]
        return Task("reverse", prompt, ans, f"The letters reversed are {ans}.")
    if m := re.fullmatch(r"How many letters are in: ((?:[a-z] )*[a-z])", last):
        ans = str(len(m[1].split()))
        return Task("count", prompt, ans, f"There are {ans} letters.")
    story = "\n".join(prompt.strip().split("\n")[:-1])
    if m := re.fullmatch(r"What color is (\w+)'s (\w+)\?", last):
        c = re.search(rf"\b(\w+) {m[2]}\b", story)  # the first mention: "has a red kite"
        if c and c[1] in COLORS:
            return Task("color_qa", prompt, c[1], f"{m[1]}'s {m[2]} is {c[1]}.")
    if m := re.fullmatch(r"Where does (\w+) meet the (\w+)\?", last):
        p = re.search(r"(?:At|Near) the (\w+), ", story)
        if p:
            return Task("place_qa", prompt, p[1], f"{m[1]} meets the {m[2]} at the {p[1]}.")
    if m := re.fullmatch(r"Tell me a story about an? (\w+) at the (\w+)\.", last):
        return Task("story", prompt, "", "", {"animal": m[1], "place": m[2]})
    raise ValueError(f"not a course task prompt: {prompt!r}")


# -------------------------------------------------------------- gold reward --

def gold_reward(prompt: str, completion: str) -> float:
    """The course's ground-truth reward for any (prompt, completion); the labs' stand-in for human raters.

    Exact tasks: 1.0 for the right answer, +0.25 for the canonical one-sentence form, and -0.05 per word
    beyond twice the canonical length (rambling). Story prompts: 0.5 each for naming the asked-for animal and
    place, +0.25 for 20-80 words, -0.25 per repeated sentence. Used by the alignment lab (chapter: alignment).
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    task = parse_prompt(prompt)
    text = completion.strip()
    words = text.split()
    if task.kind == "story":
        low = set(re.findall(r"[a-z]+", text.lower()))
        r = 0.5 * (task.meta["animal"] in low) + 0.5 * (task.meta["place"] in low)
        r += 0.25 * (20 <= len(words) <= 80)
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        r -= 0.25 * (len(sents) - len(set(sents)))
        return float(r)
    r = 1.0 if extract_answer(task.kind, prompt, text) == task.answer else 0.0
    canonical_words = len(task.response.split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    r += 0.25 * (len(sentences) == 1 and text.endswith("."))
    r -= 0.05 * max(0, len(words) - 2 * canonical_words)
    return float(r)


_RAMBLE = ["Let me think about it.", "Hmm, that is a good question.", "I think I know this one.",
           "This is easy.", "Here is what I think."]


def _worse_response(task: Task, rng: random.Random) -> str:
    """A plausible but worse response: wrong answer, rambling, or a story that misses the request."""
    if task.kind == "story":
        choice = rng.choice(["wrong_animal", "repeat"])
        if choice == "wrong_animal":
            other = rng.choice([a for a in ANIMALS if a != task.meta["animal"]])
            return task.response.replace(task.meta["animal"], other)
        first = task.response.split(". ")[0].rstrip(".") + "."
        return " ".join([first] * 4)
    style = rng.choice(["wrong", "ramble", "wrong_ramble"])
    resp = task.response
    if "wrong" in style:
        if task.answer.isdigit():
            delta = rng.choice([-2, -1, 1, 2, 3])
            wrong = str(max(0, int(task.answer) + delta))
            if wrong == task.answer:
                wrong = str(int(task.answer) + 1)
        elif task.kind == "reverse":
            wrong = " ".join(task.answer.split()[::-1])
            if wrong == task.answer:
                wrong = task.answer + " s"
        else:
            pool = COLORS if task.kind == "color_qa" else PLACES
            wrong = rng.choice([w for w in pool if w != task.answer])
        resp = re.sub(rf"\b{re.escape(task.answer)}\b(?!.*\b{re.escape(task.answer)}\b)", wrong, resp)
    if "ramble" in style:
        resp = " ".join(rng.sample(_RAMBLE, 3)) + " " + resp + " " + rng.choice(_RAMBLE)
    return resp


def preference_pairs(n: int, seed: int = 0, kinds=TASKS, exclude=()) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected", "kind"}``; chosen has the higher gold reward.
    ``exclude``: tasks, pairs or prompts whose prompts no pair may use (held-out pairs)."""
    _check_seed(seed)
    tasks = instruction_tasks(n, seed=seed + 10_000, kinds=kinds, exclude=exclude)
    rng = random.Random(f"prefs-{seed}")
    pairs = []
    for t in tasks:
        worse = _worse_response(t, rng)
        a, b = t.response, worse
        if gold_reward(t.prompt, a) < gold_reward(t.prompt, b):
            a, b = b, a
        pairs.append({"prompt": t.prompt, "chosen": a, "rejected": b, "kind": t.kind})
    return pairs


# ----------------------------------------------------------- pretraining text --

def _fact_line(rng: random.Random) -> str:
    """A plain-prose fact or question/answer line in the tasks' own words (the base model's 'world knowledge')."""
    kind = rng.choice(["add", "subtract", "compare", "reverse", "count", "add", "subtract", "compare"])
    t = make_task(kind, rng)
    if rng.random() < 0.5:
        return t.response
    return f"Question: {t.prompt} Answer: {t.response}"


def pretraining_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` short documents: ~65% stories, ~35% lines of facts and Q/A. Deterministic per seed."""
    _check_count(n_docs, "n_docs")
    _check_seed(seed)
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.65:
            st = make_story(rng)
            doc = st.text
            if rng.random() < 0.3:
                kind = rng.choice(["color_qa", "place_qa"])
                q = (f"What color is {st.name}'s {st.thing}?" if kind == "color_qa"
                     else f"Where does {st.name} meet the {st.animal}?")
                a = (f"{st.name}'s {st.thing} is {st.color}." if kind == "color_qa"
                     else f"{st.name} meets the {st.animal} at the {st.place}.")
                doc += f"\nQuestion: {q} Answer: {a}"
        else:
            doc = "\n".join(_fact_line(rng) for _ in range(rng.randint(3, 6)))
        docs.append(doc)
    return docs


SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def corpus_split(split: str, n_docs: int) -> list[str]:
    """The course corpus split used by the pretraining recipe: ``train``, ``validation`` or ``test``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    return pretraining_corpus(n_docs, seed=SPLIT_SEEDS[split])


# ------------------------------------------------------------- real English --

def reference_english(n_paragraphs: int = 24, min_words: int = 40) -> list[str]:
    """``n_paragraphs`` paragraphs of real English prose that ships, offline, with every CPython: the Python
    language reference as ``help()`` shows it (``pydoc_data.topics``, PSF licence). Prose only: no headings, no
    indented grammar or code, each paragraph at least ``min_words`` words, its lines joined, none twice. One
    paragraph per topic in turn (topics in sorted order), so the text spans the reference. Deterministic for a
    Python version (the reference changes a little between versions). The course corpus is synthetic; Lab 1
    measures a real model's perplexity on this text instead (a model trained on the web has likely seen it:
    compare variants of one model on it, not models)."""
    _check_count(n_paragraphs, "n_paragraphs")
    _check_count(min_words, "min_words")
    from pydoc_data.topics import topics

    per_topic = []
    for key in sorted(topics):
        kept = []
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.splitlines()
            if not lines or any(line[:1].isspace() or set(line.strip()) <= set("*=-") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= min_words:
                kept.append(text)
        per_topic.append(kept)
    # topics repeat some paragraphs: each is kept once, where it first comes
    paragraphs = list(dict.fromkeys(ps[i] for i in range(max(map(len, per_topic))) for ps in per_topic
                                    if i < len(ps)))
    if n_paragraphs > len(paragraphs):
        raise ValueError(f"the reference has {len(paragraphs)} prose paragraphs of at least {min_words} words, "
                         f"asked for {n_paragraphs}")
    return paragraphs[:n_paragraphs]


# -------------------------------------------------------------- reasoning --
#
# Tasks whose answer takes several steps, a step-by-step trace that shows them, and a
# verifier that reads the final answer (chapter: Reasoning). Separate names from the
# exact tasks above, with their own random streams: nothing above changes.

REASONING_TASKS = ("add_carry", "chain")
MARKER = "Answer:"  # the final-answer marker: the last line of every trace
MAX_CHAIN = 40  # chain values stay in 0..40: " 0" to " 40" are single course tokens


def _digits(n: int) -> str:
    """``347`` as ``"3 4 7"``: the course tokenizer splits long numbers unevenly
    (``" 34"``, ``"7"``) but has one token per spaced digit."""
    return _spaced(str(n))


def _chain_ops(rng: random.Random, start: int) -> list[tuple[str, int]]:
    ops, value = [], start
    for _ in range(rng.choice((2, 3))):
        allowed = [op for op, ok in (("plus", value < MAX_CHAIN), ("minus", value > 0),
                                     ("times", 2 * value <= MAX_CHAIN)) if ok]
        op = rng.choice(allowed)
        if op == "plus":
            k = rng.randint(1, min(9, MAX_CHAIN - value))
        elif op == "minus":
            k = rng.randint(1, min(9, value))
        else:
            k = rng.choice([m for m in (2, 3) if m * value <= MAX_CHAIN])
        value = _apply(value, op, k)
        ops.append((op, k))
    return ops


def _apply(value: int, op: str, k: int) -> int:
    return value + k if op == "plus" else value - k if op == "minus" else value * k


_VERB = {"plus": "add {k}", "minus": "subtract {k}", "times": "multiply by {k}"}


def make_reasoning_task(kind: str, rng: random.Random) -> Task:
    """One task of ``kind`` (one of ``REASONING_TASKS``); its ``response`` is the
    step-by-step trace and its ``answer`` the integer as digits (``"632"``).

    * ``add_carry``: two 3-digit numbers with at least one carry, written as spaced
      digits ("What is 3 4 7 plus 2 8 5?").
    * ``chain``: a start number in 0..20, then 2 or 3 operations (add or subtract 1..9,
      multiply by 2 or 3), every value in 0..40 ("Start with 7. Add 5, then ...").

    Chapter: Reasoning.
    """
    if kind not in REASONING_TASKS:
        raise ValueError(f"unknown reasoning kind {kind!r}; expected one of "
                         f"{REASONING_TASKS}")
    _check_rng(rng)
    if kind == "add_carry":
        while True:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            if any(_carries(a, b)):
                break
        prompt = f"What is {_digits(a)} plus {_digits(b)}?"
        meta = {"a": a, "b": b}
        answer = str(a + b)
    else:
        start = rng.randint(0, MAX_OPERAND)
        ops = _chain_ops(rng, start)
        steps = [_VERB[op].format(k=k) for op, k in ops]
        said = steps[0].capitalize() + "".join(f", then {s}" for s in steps[1:])
        prompt = f"Start with {start}. {said}. What is the result?"
        meta = {"start": start, "ops": ops}
        value = start
        for op, k in ops:
            value = _apply(value, op, k)
        answer = str(value)
    task = Task(kind, prompt, answer, "", meta)
    task.response = reasoning_trace(task)
    return task


def _carries(a: int, b: int) -> list[int]:
    """The carry out of each column of ``a + b``, ones first."""
    out, carry = [], 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        out.append(carry)
        a, b = a // 10, b // 10
    return out


def _reasoning(task, name="task"):
    if not isinstance(task, Task):
        raise TypeError(f"{name} must be a llmlab.data.Task, got {type(task).__name__}")
    if task.kind not in REASONING_TASKS:
        raise ValueError(f"{name} must be a reasoning task {REASONING_TASKS}, "
                         f"got kind {task.kind!r}")


def reasoning_trace(task: Task) -> str:
    """The full completion with a scratchpad: one line per step, then the marker line.

    ``chain``: ``"7 plus 5 is 12.\\nThen 12 times 3 is 36.\\nAnswer: 36"`` (``Then``
    keeps each number after a space, where the course tokenizer has one token for it).
    ``add_carry``, column by column from the ones, the last column writing its carry::

        7 plus 5 is 12. Write 2, carry 1.
        4 plus 8 plus 1 is 13. Write 3, carry 1.
        3 plus 2 plus 1 is 6. Write 6.
        Answer: 6 3 2

    Chapter: Reasoning (SFT on traces, and the shape ``format_reward`` asks for).
    """
    _reasoning(task)
    lines = []
    if task.kind == "chain":
        value = task.meta["start"]
        for op, k in task.meta["ops"]:
            new = _apply(value, op, k)
            lines.append(f"{'Then ' if lines else ''}{value} {op} {k} is {new}.")
            value = new
    else:
        a, b = str(task.meta["a"])[::-1], str(task.meta["b"])[::-1]
        carry = 0
        for i, (x, y) in enumerate(zip(a, b)):
            total = int(x) + int(y) + carry
            said = f"{x} plus {y}" + (" plus 1" if carry else "") + f" is {total}."
            if i == len(a) - 1:
                lines.append(f"{said} Write {_digits(total)}.")
            else:
                carry = total // 10
                lines.append(f"{said} Write {total % 10}"
                             + (", carry 1." if carry else "."))
    return "\n".join(lines) + "\n" + direct_answer(task)


def direct_answer(task: Task) -> str:
    """The completion without a scratchpad, in the same format: the marker line only
    (``"Answer: 6 3 2"``; chain answers are one token, ``"Answer: 32"``). Chapter:
    Reasoning (the no-scratchpad baseline)."""
    _reasoning(task)
    value = int(task.answer)
    return f"{MARKER} {_digits(value) if task.kind == 'add_carry' else value}"


def reasoning_tasks(n: int, seed: int = 0, kinds=REASONING_TASKS,
                    exclude=()) -> list[Task]:
    """``n`` reasoning tasks, kinds in round-robin order, deterministic per seed (its
    own random stream: ``instruction_tasks`` is unchanged). ``exclude``: tasks, pairs or
    prompts to leave out, as in ``instruction_tasks`` (a held-out set). Chapter:
    Reasoning."""
    _check_count(n)
    _check_seed(seed)
    if isinstance(kinds, str):
        raise TypeError("kinds must be a collection of kinds, not a single string")
    kinds = tuple(kinds)
    if not kinds or any(k not in REASONING_TASKS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {REASONING_TASKS}, "
                         f"got {kinds}")
    return _round_robin(n, kinds, make_reasoning_task, random.Random(f"reasoning-{seed}"),
                        _prompts(exclude))


# the number after a marker: a sign, digits (single spaces between them allowed,
# "3 2"), not followed by more digits or a decimal part, by a letter ("632e3",
# "0x632") or by an operator ("632 - 100", "632/2"); a trailing period or words
# after a space are fine ("12 apples")
_FINAL = re.compile(
    r"answer[ \t]*:[ \t]*([+-]?)[ \t]*(\d(?:[ \t]?\d)*)"
    r"(?![ \t]?[.,]?\d)(?!\w)(?![ \t]*[-+*/^=%×÷])",
    re.IGNORECASE,
)
_MARKERS = re.compile(r"answer[ \t]*:", re.IGNORECASE)
_N = r"-?\d+"
_STEP = re.compile(
    rf"(?:Then )?{_N} (?:plus|minus|times) {_N} is {_N}\."  # chain
    rf"|\d plus \d(?: plus 1)? is {_N}\. Write \d(?: \d)?(?:, carry 1)?\."  # add_carry
)


def _completion(completion):
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")


def extract_final_answer(completion: str) -> str | None:
    """The integer after the LAST final-answer marker, as plain digits (``"632"``,
    ``"-4"``), or None when there is no marker or no number right after the last one.

    Tolerant of case and whitespace around the marker, spaced digits (``"6 3 2"``), a
    leading sign and a trailing period; words after the number are ignored; a decimal
    (``"3.5"``), a number run into letters (``"632e3"``) or followed by an operator
    (``"632 - 100"``) is no integer answer. Chapter: Reasoning."""
    _completion(completion)
    markers = list(_MARKERS.finditer(completion))
    if not markers:
        return None
    m = _FINAL.match(completion, markers[-1].start())
    if not m:
        return None
    # compared as digit strings, never int(): a model may write thousands of digits
    digits = re.sub(r"\s", "", m[2]).lstrip("0") or "0"
    return "-" + digits if m[1] == "-" and digits != "0" else digits


def verify(task: Task, completion: str) -> bool:
    """True when the final answer of ``completion`` is ``task``'s answer (the reward
    for correctness in RL with verifiable rewards). Chapter: Reasoning."""
    _reasoning(task)
    _completion(completion)
    return extract_final_answer(completion) == task.answer


def format_reward(completion: str) -> float:
    """1.0 when ``completion`` has the trace shape: one or more step lines as
    ``reasoning_trace`` writes them, then exactly one marker line with a number and
    nothing after it; else 0.0. Says nothing about correctness (``verify`` does): a
    policy can earn it with wrong steps. Chapter: Reasoning (GRPO's format reward)."""
    _completion(completion)
    lines = [line.strip() for line in completion.strip().split("\n")]
    if len(lines) < 2 or len(_MARKERS.findall(completion)) != 1:
        return 0.0
    last = _FINAL.match(lines[-1])
    shaped = last and re.fullmatch(r"\.?", lines[-1][last.end():].strip())
    return float(bool(shaped) and all(_STEP.fullmatch(s) for s in lines[:-1]))
