"""A built-in task: short arithmetic word problems generated from a seed.

Problems such as "Tom has 3 apples. He buys 4 more. How many apples does Tom have now?" with a
small non-negative integer answer, made by :func:`make_problems` from templates (several per
operation, ``+``, ``-``, ``*``, and two-step ones), deterministic given the seed. Each problem is
an :class:`ArithmeticProblem` (a :class:`~.gsm8k.GSM8KProblem` that also carries the
``expression`` whose value is the gold answer).

Two ways to ask:

* the GSM8K format (:func:`build_prompt`, the GRPO demo's system prompt, XML answer): all the
  GSM8K rewards and :func:`arithmetic_potential` apply unchanged;
* the short-answer format (:func:`build_short_prompt`: "answer with only the number"), scored by
  :func:`short_answer_reward` = 1.0 if the first number in the completion equals the gold answer.
  Useful for tiny models that cannot follow the XML format.

Measured base rates of SmolLM2-135M-Instruct (Q4_1 GGUF, temperature 1, 160 samples each, so
about +-2 points): short answer, "easy" ~4%, "medium" ~2-4%, "hard" ~1%; the XML format: no
reward of any kind on 40 "easy" samples.

Difficulties (``difficulty=``): ``"easy"`` one ``+``/``-`` on numbers up to 10; ``"medium"`` one
``+``/``-``/``*`` on numbers up to 20 (products of factors up to 9); ``"hard"`` two steps.
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

from ..potentials.base import RewardPotential
from .gsm8k import (COMPONENTS, GSM8KProblem, SYSTEM_PROMPT, build_messages, gsm8k_potential,
                    render_messages, reward_potential)

__all__ = [
    "ArithmeticProblem", "DIFFICULTIES", "DEFAULT_DIFFICULTY", "SHORT_SYSTEM_PROMPT", "make_problems",
    "build_prompt", "build_messages", "build_short_messages", "build_short_prompt",
    "extract_first_number", "short_answer_reward", "arithmetic_potential", "short_answer_potential",
]

SHORT_SYSTEM_PROMPT = "Solve the math problem. Reply with only the final answer as a number, nothing else."


@dataclass(frozen=True)
class ArithmeticProblem(GSM8KProblem):
    """A generated problem: ``question``, ``gold`` (decimal string) and the ``expression`` it came from."""

    expression: str = ""


_NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Noah", "Zoe", "Leo", "Ava"]
_PRONOUN = {"Tom": "He", "Ben": "He", "Sam": "He", "Jack": "He", "Noah": "He", "Leo": "He",
            "Anna": "She", "Lily": "She", "Mia": "She", "Emma": "She", "Zoe": "She", "Ava": "She"}
_ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "oranges", "cards",
          "balloons", "candies"]
_CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]

# Templates per operation kind; the expression of each kind is in _EXPR. Operand ranges come from
# the difficulty and keep every answer non-negative (see _operands).
_TEMPLATES: dict[str, list[str]] = {
    "add": [
        "{name} has {a} {items}. {pron} buys {b} more. How many {items} does {name} have now?",
        "There are {a} {items} in a box and {b} {items} on the table. How many {items} are there in total?",
        "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read in all?",
        "{name} has {a} {items} and {friend} has {b} {items}. How many {items} do they have together?",
    ],
    "sub": [
        "{name} has {a} {items}. {pron} gives {b} of them to {friend}. How many {items} does {name} have left?",
        "A shop had {a} {items}. It sold {b} of them. How many {items} does the shop have left?",
        "{name} had {a} dollars and spent {b} dollars on lunch. How many dollars does {name} have left?",
        "There were {a} birds on a tree. {b} birds flew away. How many birds are still on the tree?",
    ],
    "mul": [
        "{name} buys {a} {containers} of {items}. Each one holds {b} {items}. How many {items} does {name} buy?",
        "A garden has {a} rows with {b} flowers in each row. How many flowers are in the garden?",
        "One ticket costs {b} dollars. How many dollars do {a} tickets cost?",
        "{name} walks {b} miles every day. How many miles does {name} walk in {a} days?",
    ],
    "add_sub": [
        "{name} has {a} {items}. {pron} buys {b} more and then gives {c} to {friend}. How many {items} does {name} have now?",
        "A bus has {a} people. At the first stop {b} people get on and {c} people get off. How many people are on the bus now?",
    ],
    "mul_add": [
        "{name} has {a} {containers} with {b} {items} in each, and {c} loose {items}. How many {items} does {name} have in total?",
        "{name} buys {a} notebooks for {b} dollars each and a pen for {c} dollars. How many dollars does {name} spend?",
    ],
    "mul_sub": [
        "There are {a} {containers} with {b} {items} in each. {name} eats {c} of the {items}. How many {items} are left?",
        "{name} earns {b} dollars a day for {a} days and then spends {c} dollars. How many dollars does {name} have left?",
    ],
}
_EXPR = {"add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}",
         "add_sub": "{a} + {b} - {c}", "mul_add": "{a} * {b} + {c}", "mul_sub": "{a} * {b} - {c}"}

DEFAULT_DIFFICULTY = "easy"

# difficulty -> (operation kinds, max addend, max factor)
DIFFICULTIES: dict[str, tuple[tuple[str, ...], int, int]] = {
    "easy": (("add", "sub"), 10, 0),
    "medium": (("add", "sub", "mul"), 20, 9),
    "hard": (("add_sub", "mul_add", "mul_sub"), 20, 9),
}


def _operands(kind: str, rng: random.Random, hi: int, fhi: int) -> dict[str, int]:
    if kind == "add":
        return {"a": rng.randint(1, hi), "b": rng.randint(1, hi)}
    if kind == "sub":
        a = rng.randint(2, hi)
        return {"a": a, "b": rng.randint(1, a - 1)}
    if kind == "mul":
        return {"a": rng.randint(2, fhi), "b": rng.randint(2, fhi)}
    if kind == "add_sub":
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        return {"a": a, "b": b, "c": rng.randint(1, a + b - 1)}
    if kind == "mul_add":
        return {"a": rng.randint(2, fhi), "b": rng.randint(2, fhi), "c": rng.randint(1, hi)}
    if kind == "mul_sub":
        a, b = rng.randint(2, fhi), rng.randint(2, fhi)
        return {"a": a, "b": b, "c": rng.randint(1, min(hi, a * b - 1))}
    raise AssertionError(kind)


def _evaluate(expression: str) -> int:
    """Value of an expression made of non-negative integers, ``+``, ``-``, ``*`` (usual precedence)."""
    total = 0
    for sign, term in re.findall(r"([+-]?)\s*(\d+(?:\s*\*\s*\d+)*)", expression):
        value = 1
        for f in term.split("*"):
            value *= int(f)
        total += -value if sign == "-" else value
    return total


def make_problems(n: int, seed: int = 0, difficulty: str = DEFAULT_DIFFICULTY) -> list[ArithmeticProblem]:
    """``n`` word problems, deterministic given ``(seed, difficulty)``; operation kinds are cycled
    so that every kind appears equally often (up to one), in a shuffled order."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; known: {list(DIFFICULTIES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kinds, hi, fhi = DIFFICULTIES[difficulty]
    rng = random.Random(f"arithmetic:{difficulty}:{seed}")
    order = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(order)
    problems = []
    for kind in order:
        template = rng.choice(_TEMPLATES[kind])
        name = rng.choice(_NAMES)
        friend = rng.choice([x for x in _NAMES if x != name])
        ops = _operands(kind, rng, hi, fhi)
        question = template.format(name=name, pron=_PRONOUN[name], friend=friend, items=rng.choice(_ITEMS),
                                   containers=rng.choice(_CONTAINERS), **ops)
        expression = _EXPR[kind].format(**ops)
        value = _evaluate(expression)
        assert value >= 0, (expression, value)
        problems.append(ArithmeticProblem(question=question, gold=str(value), expression=expression))
    return problems


# ----------------------------------------------------------------------------------- prompts

def build_prompt(tokenizer, question: str) -> str:
    """The GSM8K-format prompt (the GRPO demo's system prompt) for ``question``."""
    return render_messages(tokenizer, build_messages(question, SYSTEM_PROMPT))


def build_short_messages(question: str) -> list[dict]:
    """Chat messages asking for only the number."""
    return [{"role": "system", "content": SHORT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def build_short_prompt(tokenizer, question: str) -> str:
    """The short-answer prompt for ``question`` (chat template with the generation prompt)."""
    return render_messages(tokenizer, build_short_messages(question))


# ----------------------------------------------------------------------------------- rewards

# Thousands groups only when every group has 3 digits ("1,2345" is 1 then 2345, not 1234);
# a leading-dot decimal is one number (".5" is not 5). ASCII digits, after NFKC ("１２" -> "12").
_NUMBER = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)", re.ASCII)


_MINUS_SIGNS = str.maketrans({"\u2212": "-"})  # the minus sign, which NFKC leaves as it is


def extract_first_number(completion: str) -> str | None:
    """The first number in the text (commas removed, e.g. ``"1,200"`` -> ``"1200"``; fullwidth digits
    and the minus sign U+2212 read as ASCII), or ``None``."""
    m = _NUMBER.search(unicodedata.normalize("NFKC", completion).translate(_MINUS_SIGNS))
    return None if m is None else m.group(0).replace(",", "")


def short_answer_reward(completion: str, gold: str) -> float:
    """1.0 if the first number in the completion is the integer ``gold`` (``"7.0"``, ``"07"`` and
    ``"7.5"`` do not count as 7), else 0.0."""
    return 1.0 if extract_first_number(completion) == str(gold) else 0.0


# -------------------------------------------------------------------------------- potentials

def arithmetic_potential(golds: Sequence[str], *, mode: str = "exp", beta: float = 1.0, threshold: float = 0.0,
                         components: Sequence[str] = COMPONENTS, dotall: bool = True) -> RewardPotential:
    """The GSM8K potential (:func:`~.gsm8k.gsm8k_potential`) on arithmetic problems' golds."""
    return gsm8k_potential(golds, mode=mode, beta=beta, threshold=threshold, components=components, dotall=dotall)


def short_answer_potential(golds: Sequence[str], *, mode: str = "indicator", beta: float = 1.0,
                           threshold: float = 0.0) -> RewardPotential:
    """Potential of :func:`short_answer_reward` against ``golds[prompt_index[i]]``.

    Default ``mode="indicator"``: ``phi = 1`` for a correct first number, else 0 (``-inf`` log).
    """
    return reward_potential(short_answer_reward, golds, mode=mode, beta=beta, threshold=threshold,
                            name="short_answer")

