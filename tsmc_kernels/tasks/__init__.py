"""Tasks: problems, prompts, rewards and potentials, behind one registry.

``get_task(name, **options) -> Task``; every task follows one calling convention::

    task = get_task("arithmetic", difficulty="easy")
    problems = task.problems(n=64, seed=0)                 # list[GSM8KProblem] (question, gold)
    prompts = [task.build_prompt(tokenizer, p.question) for p in problems]
    phi = task.potential([p.gold for p in problems])      # RewardPotential, rows -> golds[prompt_index]
    r = task.reward(completion_text, problems[0].gold)    # float, at most task.max_reward

Known tasks:

* ``"gsm8k"`` (option ``path=``, a GSM8K jsonl file, required): the GRPO demo's prompt and its five
  summed rewards (SPEC §7, max 4.0); potential options ``mode``, ``beta``, ``threshold``,
  ``components``, ``dotall``.
* ``"arithmetic"`` (option ``difficulty=`` "easy" | "medium" | "hard"): generated word problems in
  the same XML format with the same rewards.
* ``"arithmetic-short"`` (option ``difficulty=``): the same problems asking for only the number;
  reward 1.0 if the first number in the completion is correct; the potential is an indicator by
  default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import arithmetic, gsm8k
from .gsm8k import GSM8KProblem

__all__ = ["Task", "get_task", "TASKS", "GSM8KProblem", "gsm8k", "arithmetic"]


@dataclass(frozen=True)
class Task:
    """A task's problems, prompts, reward and potential builder (see the module docstring)."""

    name: str
    problems: Callable[..., list[GSM8KProblem]]  # problems(n=None, seed=None)
    build_messages: Callable[[str], list[dict]]  # build_messages(question)
    build_prompt: Callable[..., str]             # build_prompt(tokenizer, question)
    reward: Callable[[str, str], float]          # reward(completion, gold)
    potential: Callable[..., object]             # potential(golds, **options) -> RewardPotential
    max_reward: float


TASKS: dict[str, Callable[..., Task]] = {}


def _register(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn
    return deco


def get_task(name: str, **options) -> Task:
    """The task called ``name`` with its ``options``; ``ValueError`` listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**options)


@_register("gsm8k")
def _gsm8k(path=None, dotall: bool = True) -> Task:
    if path is None:
        raise ValueError("task 'gsm8k' needs the data: get_task('gsm8k', path='.../gsm8k/test.jsonl')")

    def problems(n: int | None = None, seed: int | None = None):
        return gsm8k.load_jsonl(path, limit=n, seed=seed)

    def potential(golds, **kw):
        kw.setdefault("dotall", dotall)
        return gsm8k.gsm8k_potential(golds, **kw)

    return Task(name="gsm8k", problems=problems, build_messages=gsm8k.build_messages,
                build_prompt=gsm8k.build_prompt,
                reward=lambda completion, gold: gsm8k.total_reward(completion, gold, dotall=dotall),
                potential=potential, max_reward=gsm8k.MAX_REWARD)


def _arithmetic_problems(difficulty: str):
    if difficulty not in arithmetic.DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; known: {list(arithmetic.DIFFICULTIES)}")

    def problems(n: int | None = None, seed: int | None = None):
        if n is None:
            raise ValueError("arithmetic tasks generate their problems: pass n (and seed)")
        return arithmetic.make_problems(n, seed=0 if seed is None else seed, difficulty=difficulty)

    return problems


@_register("arithmetic")
def _arithmetic(difficulty: str = arithmetic.DEFAULT_DIFFICULTY, dotall: bool = True) -> Task:
    def potential(golds, **kw):
        kw.setdefault("dotall", dotall)
        return arithmetic.arithmetic_potential(golds, **kw)

    return Task(name="arithmetic", problems=_arithmetic_problems(difficulty),
                build_messages=gsm8k.build_messages, build_prompt=arithmetic.build_prompt,
                reward=lambda completion, gold: gsm8k.total_reward(completion, gold, dotall=dotall),
                potential=potential, max_reward=gsm8k.MAX_REWARD)


@_register("arithmetic-short")
def _arithmetic_short(difficulty: str = arithmetic.DEFAULT_DIFFICULTY) -> Task:
    return Task(name="arithmetic-short", problems=_arithmetic_problems(difficulty),
                build_messages=arithmetic.build_short_messages, build_prompt=arithmetic.build_short_prompt,
                reward=arithmetic.short_answer_reward, potential=arithmetic.short_answer_potential,
                max_reward=1.0)
