"""The erosion recipes of ``bench_efficacy.py``: benign fine-tunes of different kinds, their data and metrics.

* ``classification`` — the demo's headline → topic task (:mod:`lssf_lightning.demo.task`), exact match.
* ``instruct`` — benign instruction following: ``ollama-forge`` harmless instructions (a part of the shuffled
  pool the demo never uses) answered at run time by the aligned model itself, greedy; no exact metric, so
  the in-domain perplexity is its task measure. Replies are cut after their last full sentence
  (:func:`lssf_lightning.demo.align.trim_answer`), as the demo's safety pass does.
* ``arithmetic`` — word problems generated here, each with a worked answer ending "The answer is N.";
  scored by the exact final number.

Every recipe gives disjoint train / validation / test rows (``{"prompt", "response"}``); the in-domain
perplexity is measured on the replies of the held-out rows (validation for the sweep, test for the table).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lssf_lightning.demo.align import trim_answer
from lssf_lightning.demo.task import is_correct, task_splits

__all__ = ["KINDS", "RecipeData", "WordProblem", "final_number", "word_problems", "recipe_data"]

KINDS = ("classification", "instruct", "arithmetic")

# -- arithmetic word problems --

_NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goran",
    "Hana",
    "Ivo",
    "Jade",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
)
_ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "shells", "cards", "eggs")
_CONTAINERS = ("boxes", "bags", "jars", "baskets", "crates", "packs")


@dataclass(frozen=True)
class WordProblem:
    """One generated problem, its worked answer and the final number."""

    question: str
    worked: str
    answer: int

    def to_row(self) -> dict[str, str]:
        return {"prompt": self.question, "response": self.worked}


def _problem(rng: random.Random) -> WordProblem:
    name, item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    kind = rng.randrange(3)
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    if kind == 0:  # groups plus extra
        total = a * b + c
        question = (
            f"{name} has {a} {box} with {b} {item} in each, and {c} more {item}. How many {item} in all?"
        )
        worked = f"{a} {box} × {b} {item} = {a * b} {item}. {a * b} + {c} = {total}. The answer is {total}."
    elif kind == 1:  # groups minus given away
        c = rng.randint(1, a * b - 1)
        total = a * b - c
        question = f"{name} buys {a} {box} of {b} {item} and gives away {c} {item}. How many {item} are left?"
        worked = f"{a} × {b} = {a * b} {item}. {a * b} − {c} = {total}. The answer is {total}."
    else:  # share equally
        people = rng.randint(2, 6)
        total = a * b * people
        question = (
            f"{name} shares {total} {item} equally among {people} friends. "
            f"How many {item} does each friend get?"
        )
        worked = f"{total} ÷ {people} = {a * b}. The answer is {a * b}."
        total = a * b
    return WordProblem(question, worked, total)


def word_problems(count: int, seed: int = 0, exclude: frozenset[str] = frozenset()) -> list[WordProblem]:
    """``count`` distinct problems (none of whose question is in ``exclude``), drawn with ``seed``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < count:
        problem = _problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


_FINAL = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


def final_number(text: str) -> int | None:
    """The number after the first "answer is" in ``text`` (``None`` when there is none)."""
    match = _FINAL.search(text)
    return int(match.group(1)) if match else None


# -- recipe data --


@dataclass
class RecipeData:
    """Rows and metric of one recipe. ``score(answers, split)`` is the task metric on ``split``'s
    ``task_prompts`` (``None`` for a recipe without one)."""

    kind: str
    train: list[dict[str, str]]
    val: list[dict[str, str]]
    test: list[dict[str, str]]
    task_prompts: dict[str, list[str]] = field(default_factory=dict)
    task_tokens: int = 0
    score: Callable[[list[str], str], float] | None = None

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            **{f"task_{k}": len(v) for k, v in self.task_prompts.items()},
        }


def _classification(train: int, val: int, test: int, seed: int) -> RecipeData:
    train_set, val_set, test_set = task_splits(train, val, test, seed=seed)
    sets = {"val": val_set, "test": test_set}

    def score(answers: list[str], split: str) -> float:
        return sum(is_correct(a, e.topic) for a, e in zip(answers, sets[split])) / len(answers)

    return RecipeData(
        "classification",
        [e.to_row() for e in train_set],
        [e.to_row() for e in val_set],
        [e.to_row() for e in test_set],
        {k: [e.prompt for e in v] for k, v in sets.items()},
        task_tokens=6,
        score=score,
    )


def _arithmetic(train: int, val: int, test: int, seed: int) -> RecipeData:
    test_set = word_problems(test, seed=seed + 2)
    val_set = word_problems(val, seed=seed + 1, exclude=frozenset(p.question for p in test_set))
    taken = frozenset(p.question for p in test_set + val_set)
    train_set = word_problems(train, seed=seed, exclude=taken)
    sets = {"val": val_set, "test": test_set}

    def score(answers: list[str], split: str) -> float:
        return sum(final_number(a) == p.answer for a, p in zip(answers, sets[split])) / len(answers)

    return RecipeData(
        "arithmetic",
        [p.to_row() for p in train_set],
        [p.to_row() for p in val_set],
        [p.to_row() for p in test_set],
        {k: [p.question for p in v] for k, v in sets.items()},
        task_tokens=40,
        score=score,
    )


def _instruct(
    prompts: Sequence[str], answer: Callable[[list[str]], list[str]], train: int, val: int, test: int
) -> RecipeData:
    if len(prompts) < train + val + test:
        raise ValueError(
            f"the instruct recipe needs {train + val + test} prompts, the pool holds {len(prompts)}"
        )
    chosen = list(prompts[: train + val + test])
    replies = answer(chosen)
    rows = [{"prompt": p, "response": trim_answer(r)} for p, r in zip(chosen, replies) if r.strip()]
    return RecipeData("instruct", rows[:train], rows[train : train + val], rows[train + val :])


def recipe_data(
    kind: str,
    train: int,
    val: int,
    test: int,
    *,
    seed: int = 0,
    instruct_prompts: Sequence[str] = (),
    answer: Callable[[list[str]], list[str]] | None = None,
) -> RecipeData:
    """The rows of recipe ``kind``; ``instruct`` needs ``instruct_prompts`` and ``answer`` (the aligned
    model's greedy replies)."""
    if kind == "classification":
        return _classification(train, val, test, seed)
    if kind == "arithmetic":
        return _arithmetic(train, val, test, seed)
    if kind == "instruct":
        if answer is None:
            raise ValueError("the instruct recipe needs the aligned model's answer function")
        return _instruct(instruct_prompts, answer, train, val, test)
    raise ValueError(f"unknown recipe kind {kind!r}; known: {', '.join(KINDS)}")
