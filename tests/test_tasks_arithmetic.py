"""Built-in arithmetic task: deterministic generation, correct answers, prompts, rewards, potentials."""
import math
import re
from collections import Counter

import pytest
import torch

from tsmc_kernels.tasks import get_task
from tsmc_kernels.tasks import arithmetic as A
from tsmc_kernels.tasks import gsm8k as G


def _ints(text):
    return sorted(int(x) for x in re.findall(r"\d+", text))


def _ops_eval(expr):
    # independent oracle: Python's own evaluation of "a op b [op c]" (digits and + - * only)
    assert re.fullmatch(r"[\d\s+*-]+", expr), expr
    return eval(expr, {"__builtins__": {}})  # noqa: S307 -- checked to be digits and operators


@pytest.mark.parametrize("difficulty", list(A.DIFFICULTIES))
def test_deterministic_per_seed(difficulty):
    a = A.make_problems(30, seed=7, difficulty=difficulty)
    b = A.make_problems(30, seed=7, difficulty=difficulty)
    c = A.make_problems(30, seed=8, difficulty=difficulty)
    assert a == b
    assert a != c
    assert len(a) == 30 and all(isinstance(p, G.GSM8KProblem) for p in a)
    assert A.make_problems(0, seed=1, difficulty=difficulty) == []


@pytest.mark.parametrize("difficulty", list(A.DIFFICULTIES))
def test_answers_are_correct(difficulty):
    probs = A.make_problems(300, seed=0, difficulty=difficulty)
    for p in probs:
        value = _ops_eval(p.expression)
        assert p.gold == str(value) and p.gold.isdigit(), p
        # the question states exactly the numbers of the expression
        assert _ints(p.question) == _ints(p.expression), p
        assert p.question.endswith("?")


def test_difficulty_ranges_and_operations():
    easy = A.make_problems(200, seed=0, difficulty="easy")
    assert all("*" not in p.expression and max(_ints(p.expression)) <= 10 for p in easy)
    assert {"+", "-"} <= {op for p in easy for op in re.findall(r"[+*-]", p.expression)}
    medium = A.make_problems(300, seed=0, difficulty="medium")
    ops = Counter(re.findall(r"[+*-]", p.expression)[0] for p in medium)
    assert set(ops) == {"+", "-", "*"} and min(ops.values()) == 100   # kinds cycled evenly
    hard = A.make_problems(90, seed=0, difficulty="hard")
    assert all(len(re.findall(r"[+*-]", p.expression)) == 2 for p in hard)


def test_problems_are_varied():
    probs = A.make_problems(200, seed=3, difficulty="medium")
    assert len({p.question for p in probs}) > 190
    # several templates per operation: the first three words differ a lot
    assert len({" ".join(p.question.split()[1:4]) for p in probs}) >= 8
    assert len({p.gold for p in probs}) >= 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        A.make_problems(3, seed=0, difficulty="impossible")
    with pytest.raises(ValueError, match="n must be"):
        A.make_problems(-1, seed=0)


def test_prompts():
    q = A.make_problems(1, seed=0)[0].question
    tok = type("T", (), {"chat_template": None})()
    assert "<reasoning>" in A.build_prompt(tok, q) and q in A.build_prompt(tok, q)
    short = A.build_short_prompt(tok, q)
    assert q in short and A.SHORT_SYSTEM_PROMPT in short and "<reasoning>" not in short
    assert A.build_short_messages(q)[-1] == {"role": "user", "content": q}


@pytest.mark.parametrize("text,num", [
    ("7", "7"), (" The answer is 12.", "12"), ("1,200 apples", "1200"), ("3, 4", "3"),
    ("-3 and 5", "-3"), ("3.5", "3.5"), ("no number", None), ("x=12,345,678", "12345678"),
    ("1,2345", "1"), ("12,34", "12"), (".5 apples", ".5"), ("１２", "12"), ("1,200.5", "1200.5"),
    ("\u22127", "-7"),  # the minus sign (not NFKC's business): -7, never a false 7
])
def test_extract_first_number(text, num):
    assert A.extract_first_number(text) == num


@pytest.mark.parametrize("text,r", [
    ("9", 1.0), ("9 apples", 1.0), ("The answer is 9.", 1.0), ("4 + 5 = 9", 0.0), ("9.5", 0.0),
    ("09", 0.0), ("", 0.0), ("nine", 0.0), ("-9", 0.0), (".9", 0.0), ("99", 0.0), ("９", 1.0),
])
def test_short_answer_reward(text, r):
    assert A.short_answer_reward(text, "9") == r


def test_xml_format_rewards_apply():
    p = A.make_problems(1, seed=0, difficulty="easy")[0]
    perfect = f"<reasoning>\n{p.expression}\n</reasoning>\n<answer>\n{p.gold}\n</answer>\n"
    assert G.total_reward(perfect, p.gold) == 4.0


def test_potentials_shapes_and_prompt_index():
    probs = A.make_problems(3, seed=0, difficulty="easy")
    golds = [p.gold for p in probs]
    pidx = torch.tensor([2, 0, 0, 1, 2], dtype=torch.int64)
    texts = [golds[2], golds[0], "nothing", golds[0], f"{int(golds[2]) + 1}"]
    ids = torch.zeros(5, 4, dtype=torch.int64)
    ind = A.short_answer_potential(golds)(ids, texts=texts, prompt_index=pidx)
    expected = [0.0, 0.0, -math.inf, 0.0 if golds[0] == golds[1] else -math.inf, -math.inf]
    assert ind.shape == (5,) and ind.tolist() == expected
    ex = A.short_answer_potential(golds, mode="exp", beta=3.0)(ids, texts=texts, prompt_index=pidx)
    assert ex.tolist() == [3.0 if e == 0.0 else 0.0 for e in expected]
    xml = A.arithmetic_potential(golds)(ids, texts=texts, prompt_index=pidx)
    assert xml.shape == (5,)
    assert xml.tolist() == pytest.approx([G.total_reward(t, golds[i]) for t, i in zip(texts, pidx.tolist())])


def test_registry_tasks():
    t = get_task("arithmetic", difficulty="medium")
    probs = t.problems(n=5, seed=2)
    assert probs == A.make_problems(5, seed=2, difficulty="medium")
    p = probs[0]
    assert t.reward(f"<reasoning>\nx\n</reasoning>\n<answer>\n{p.gold}\n</answer>\n", p.gold) == 4.0
    s = get_task("arithmetic-short")
    sp = s.problems(n=4, seed=1)
    assert sp == A.make_problems(4, seed=1, difficulty=A.DEFAULT_DIFFICULTY)
    assert s.reward(sp[0].gold, sp[0].gold) == s.max_reward == 1.0
    out = s.potential([q.gold for q in sp])(torch.zeros(2, 1, dtype=torch.int64), texts=[sp[1].gold, "x"],
                                           prompt_index=torch.tensor([1, 1]))
    assert out.tolist() == [0.0, -math.inf]
    with pytest.raises(ValueError, match="pass n"):
        s.problems()
    with pytest.raises(ValueError, match="difficulty"):
        get_task("arithmetic", difficulty="bogus")
