"""GSM8K: prompts, answer extraction, the five rewards of the GRPO demo, and potentials (SPEC §7).

The rewards reproduce, character for character, those of the well-known GRPO demo for
Qwen2.5-1.5B-Instruct on GSM8K (``grpo_demo.py``)::

    correctness  2.0    extracted answer == gold (string equality)
    integer      0.5    extracted answer ``.isdigit()`` (so "-3", "3.5", "1,000" score 0)
    strict       0.5    re.match(r"^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$", text)
    soft         0.5    re.match(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", text)
    xml          0.5    count_xml: 4 x 0.125 for singly present tags, minus 0.001 per trailing character

``strict`` and ``soft`` were matched without flags in the first revision of the demo and with
``re.DOTALL`` in the later one; ``dotall=True`` (the default) selects the later revision. Without
DOTALL, ``.`` does not cross newlines, so multi-line reasoning fails both format rewards. Note that
``re.match`` anchors only at the start and ``$`` also matches before a final newline, so the
strict pattern accepts one extra trailing ``\\n`` (as in the demo).

The maximum total is 4.0 (a perfect completion with a correct integer answer).

One deliberate difference (SPEC §7): the gold is the text after ``####`` with commas and ``$``
removed, where the demo compares the raw text, so "1000" is right against the gold "1,000" and
"1,000" is not (14 of the 1319 test golds have a comma); predictions are compared as written.

Calling convention for potentials: ``reward_fn(texts, prompt_index) -> list[float]`` where row
``i`` is scored against ``golds[prompt_index[i]]`` (see :class:`~tsmc_kernels.potentials.base.RewardPotential`).

Data: ``load_jsonl(path)`` reads the standard GSM8K jsonl (``question``, ``answer`` with a final
``#### <gold>`` line). The package ships no data; pass the path.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..potentials.base import RewardPotential

__all__ = [
    "SYSTEM_PROMPT", "XML_COT_FORMAT", "COMPONENTS", "MAX_REWARD", "GSM8KProblem",
    "build_messages", "build_prompt", "extract_gold", "extract_answer",
    "correctness_reward", "integer_reward", "strict_format_reward", "soft_format_reward",
    "xml_count_reward", "count_xml", "rewards_breakdown", "total_reward", "load_jsonl",
    "gsm8k_potential", "gsm8k_format_potential", "reward_potential",
]

# The demo's system prompt, verbatim (including the leading newline).
SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

XML_COT_FORMAT = """\
<reasoning>
{reasoning}
</reasoning>
<answer>
{answer}
</answer>
"""

STRICT_PATTERN = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
SOFT_PATTERN = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"


@dataclass(frozen=True)
class GSM8KProblem:
    """One problem: the question text and the gold answer string (commas and ``$`` removed)."""

    question: str
    gold: str


# ----------------------------------------------------------------------------------- prompts

def build_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages ``[system, user]`` as in the demo."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def render_messages(tokenizer, messages: list[dict]) -> str:
    """``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` as text, or a plain-text
    rendering (``System: ...\\n\\nUser: ...\\n\\nAssistant:``) if the tokenizer has no chat template."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


def build_prompt(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The prompt text for ``question`` (chat template with the generation prompt)."""
    return render_messages(tokenizer, build_messages(question, system_prompt))


# -------------------------------------------------------------------------------- extraction

def extract_gold(answer_field: str) -> str:
    """The gold answer: text after ``####``, stripped, with commas and ``$`` removed.

    Raises ``ValueError`` if there is no ``####``.
    """
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer_field[-80:]!r}")
    return answer_field.split("####")[-1].strip().replace(",", "").replace("$", "").strip()


def extract_answer(completion: str) -> str:
    """The predicted answer: text after the last ``<answer>`` up to the next ``</answer>``, stripped.

    As in the demo, with no ``<answer>`` tag this is the whole text up to the first ``</answer>``
    (or the whole text), stripped.
    """
    return completion.split("<answer>")[-1].split("</answer>")[0].strip()


# ----------------------------------------------------------------------------------- rewards

def correctness_reward(completion: str, gold: str) -> float:
    """2.0 if the extracted answer equals ``gold`` (string equality), else 0."""
    return 2.0 if extract_answer(completion) == gold else 0.0


def integer_reward(completion: str, gold: str | None = None) -> float:
    """0.5 if the extracted answer is all digits (``str.isdigit``), else 0."""
    return 0.5 if extract_answer(completion).isdigit() else 0.0


def strict_format_reward(completion: str, gold: str | None = None, *, dotall: bool = True) -> float:
    """0.5 if ``re.match`` of the strict pattern succeeds (``re.DOTALL`` when ``dotall``)."""
    return 0.5 if re.match(STRICT_PATTERN, completion, flags=re.DOTALL if dotall else 0) else 0.0


def soft_format_reward(completion: str, gold: str | None = None, *, dotall: bool = True) -> float:
    """0.5 if ``re.match`` of the soft pattern succeeds (``re.DOTALL`` when ``dotall``)."""
    return 0.5 if re.match(SOFT_PATTERN, completion, flags=re.DOTALL if dotall else 0) else 0.0


def count_xml(text: str) -> float:
    """The demo's ``count_xml``: 0.125 per singly-present tag, minus 0.001 per trailing character."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xml_count_reward(completion: str, gold: str | None = None) -> float:
    """:func:`count_xml` of the completion (at most 0.5 up to a +0.001 quirk, may be negative)."""
    return count_xml(completion)


_REWARDS: dict[str, Callable[..., float]] = {
    "correctness": correctness_reward,
    "integer": integer_reward,
    "strict": strict_format_reward,
    "soft": soft_format_reward,
    "xml": xml_count_reward,
}
_TAKES_DOTALL = {"strict", "soft"}
COMPONENTS: tuple[str, ...] = tuple(_REWARDS)
FORMAT_COMPONENTS: tuple[str, ...] = ("strict", "soft", "xml")
MAX_REWARD = 4.0


def _check_components(components: Sequence[str], need_gold: bool = True) -> tuple[str, ...]:
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    if not components:
        raise ValueError("components must name at least one reward")
    unknown = [c for c in components if c not in _REWARDS]
    if unknown:
        raise ValueError(f"unknown reward component(s) {unknown}; known: {list(COMPONENTS)}")
    if not need_gold and "correctness" in components:
        raise ValueError("the 'correctness' reward needs gold answers; use gsm8k_potential(golds, ...)")
    return components


def rewards_breakdown(completion: str, gold: str | None, *, dotall: bool = True,
                      components: Sequence[str] = COMPONENTS) -> dict[str, float]:
    """Each reward in ``components`` by name, plus ``"total"`` (their sum)."""
    components = _check_components(components, need_gold=gold is not None)
    out = {}
    for c in components:
        fn = _REWARDS[c]
        out[c] = fn(completion, gold, dotall=dotall) if c in _TAKES_DOTALL else fn(completion, gold)
    out["total"] = sum(out.values())
    return out


def total_reward(completion: str, gold: str | None, dotall: bool = True,
                 components: Sequence[str] = COMPONENTS) -> float:
    """Sum of the rewards in ``components`` (all five by default: at most 4.0)."""
    return rewards_breakdown(completion, gold, dotall=dotall, components=components)["total"]


# ---------------------------------------------------------------------------------------- data

def load_jsonl(path: str | os.PathLike, limit: int | None = None, seed: int | None = None) -> list[GSM8KProblem]:
    """Read GSM8K problems from a jsonl file (one ``{"question", "answer"}`` object per line).

    With ``seed`` the problems are shuffled (deterministically) before ``limit`` keeps the first
    ones. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` naming the line for a
    line that is not a JSON object or lacks ``question``/``answer``/``####``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GSM8K data file not found: {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in ("question", "answer") if not isinstance(rec.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-string field(s) {missing}")
            try:
                gold = extract_gold(rec["answer"])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            problems.append(GSM8KProblem(question=rec["question"], gold=gold))
    if seed is not None:
        random.Random(seed).shuffle(problems)
    if limit is not None:
        problems = problems[:limit]
    return problems


# ---------------------------------------------------------------------------------- potentials

def _golds_for(golds: Sequence[str], prompt_index, m: int) -> list[str]:
    idx = torch.as_tensor(prompt_index).reshape(-1).tolist()
    if len(idx) != m:
        raise ValueError(f"prompt_index has {len(idx)} entries for {m} texts")
    bad = [i for i in idx if not 0 <= i < len(golds)]
    if bad:
        raise IndexError(f"prompt_index value {bad[0]} out of range for {len(golds)} gold answers")
    return [golds[i] for i in idx]


def reward_potential(score: Callable[[str, str | None], float], golds: Sequence[str] | None, *,
                     mode: str = "exp", beta: float = 1.0, threshold: float = 0.0,
                     name: str = "reward") -> RewardPotential:
    """A :class:`RewardPotential` from a per-text ``score(text, gold) -> float``.

    Row ``i`` gets ``gold = golds[prompt_index[i]]`` (``None`` when ``golds`` is ``None``).
    """
    golds = None if golds is None else [str(g) for g in golds]

    def reward_fn(texts: list[str], prompt_index) -> list[float]:
        gs = [None] * len(texts) if golds is None else _golds_for(golds, prompt_index, len(texts))
        return [float(score(t, g)) for t, g in zip(texts, gs)]

    reward_fn.__name__ = name
    return RewardPotential(reward_fn, mode=mode, beta=beta, threshold=threshold, name=name)


def gsm8k_potential(golds: Sequence[str], *, mode: str = "exp", beta: float = 1.0, threshold: float = 0.0,
                    components: Sequence[str] = COMPONENTS, dotall: bool = True) -> RewardPotential:
    """The GSM8K potential: ``r`` = sum of ``components`` against ``golds[prompt_index[i]]``.

    ``mode="exp"``: ``log phi = beta * r``; ``mode="indicator"``: ``phi = 1[r > threshold]``. For
    "the answer is correct" use ``mode="indicator", components=("correctness",)`` (with all five
    components ``r > 0`` holds for nearly any partly formatted completion).
    """
    components = _check_components(components)
    name = "gsm8k[" + "+".join(components) + "]"
    return reward_potential(
        lambda t, g: total_reward(t, g, dotall=dotall, components=components), golds,
        mode=mode, beta=beta, threshold=threshold, name=name)


def gsm8k_format_potential(*, mode: str = "exp", beta: float = 1.0, threshold: float = 0.0,
                           components: Sequence[str] = FORMAT_COMPONENTS, dotall: bool = True) -> RewardPotential:
    """A gold-free potential on the format rewards (``strict``, ``soft``, ``xml``; ``integer`` allowed)."""
    components = _check_components(components, need_gold=False)
    name = "gsm8k_format[" + "+".join(components) + "]"
    return reward_potential(
        lambda t, g: total_reward(t, None, dotall=dotall, components=components), None,
        mode=mode, beta=beta, threshold=threshold, name=name)
