"""GSM8K task: the GRPO demo's rewards (SPEC §7), extraction, data loading, potentials."""
import json
import math
import os

import pytest
import torch

from tsmc_kernels.tasks import get_task, TASKS
from tsmc_kernels.tasks import gsm8k as G

DATA = "/work/shared/data/gsm8k"
PERFECT = "<reasoning>\nJanet has 16 - 3 - 4 = 9 eggs.\n</reasoning>\n<answer>\n18\n</answer>\n"


# ----------------------------------------------------------------------------------- prompts

def test_system_prompt_is_the_demo_one():
    assert G.SYSTEM_PROMPT == "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    msgs = G.build_messages("What is 2+2?")
    assert msgs == [{"role": "system", "content": G.SYSTEM_PROMPT}, {"role": "user", "content": "What is 2+2?"}]


class _ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


class _PlainTok:
    chat_template = None


def test_build_prompt_uses_chat_template_with_generation_prompt():
    p = G.build_prompt(_ChatTok(), "Q?")
    assert p == f"<system>{G.SYSTEM_PROMPT}</system><user>Q?</user><assistant>"


def test_build_prompt_plain_fallback():
    p = G.build_prompt(_PlainTok(), "How many?")
    assert "Respond in the following format:" in p and "How many?" in p
    assert p.endswith("Assistant:")


# -------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("answer,gold", [
    ("some work\n#### 18", "18"),
    ("x\n#### 1,080", "1080"),
    ("x\n####  $2,250 ", "2250"),
    ("x\n#### -3", "-3"),
    ("x\n#### 3.5", "3.5"),
])
def test_extract_gold(answer, gold):
    assert G.extract_gold(answer) == gold


def test_extract_gold_without_marker_raises():
    with pytest.raises(ValueError, match="####"):
        G.extract_gold("no marker here 42")


@pytest.mark.parametrize("text,ans", [
    (PERFECT, "18"),
    ("<answer>1</answer> then <answer> 2 </answer> tail", "2"),      # the last <answer>
    ("<answer>\n7\n</answer>\n<answer>\n8", "8"),                      # last one unclosed: to the end
    ("just 42 ", "just 42"),                                          # no tags: whole text, stripped
    ("  42\n</answer> junk", "42"),                                   # no <answer>: up to first </answer>
])
def test_extract_answer(text, ans):
    assert G.extract_answer(text) == ans


# ----------------------------------------------------------------------------------- rewards

def test_perfect_completion_scores_max_4():
    b = G.rewards_breakdown(PERFECT, "18")
    assert b == {"correctness": 2.0, "integer": 0.5, "strict": 0.5, "soft": 0.5, "xml": 0.5, "total": 4.0}
    assert G.total_reward(PERFECT, "18") == 4.0 == G.MAX_REWARD
    # first revision (no DOTALL): strict still matches one-line fields, but the soft pattern has no
    # explicit newlines, so it never matches the requested format (the demo's known quirk)
    b0 = G.rewards_breakdown(PERFECT, "18", dotall=False)
    assert b0["strict"] == 0.5 and b0["soft"] == 0.0 and b0["total"] == 3.5


def test_correctness_is_string_equality():
    assert G.correctness_reward(PERFECT, "18") == 2.0
    assert G.correctness_reward(PERFECT, "18.0") == 0.0
    assert G.correctness_reward(PERFECT.replace("18", "$18"), "18") == 0.0
    assert G.correctness_reward(PERFECT.replace("18", "1,080"), "1080") == 0.0


@pytest.mark.parametrize("ans,r", [("18", 0.5), ("-3", 0.0), ("3.5", 0.0), ("1,000", 0.0), ("", 0.0),
                                   ("x", 0.0), ("007", 0.5)])
def test_integer_reward(ans, r):
    assert G.integer_reward(f"<answer>\n{ans}\n</answer>") == r


def test_negative_gold_correct_but_not_integer():
    text = PERFECT.replace("18", "-3")
    b = G.rewards_breakdown(text, "-3")
    assert b["correctness"] == 2.0 and b["integer"] == 0.0 and b["total"] == 3.5


def test_gold_with_commas_and_dollars_matches_plain_answer():
    gold = G.extract_gold("...\n#### $1,080")
    assert G.total_reward(PERFECT.replace("18", "1080"), gold) == 4.0


def test_strict_format_needs_trailing_newline():
    assert G.strict_format_reward(PERFECT) == 0.5
    assert G.strict_format_reward(PERFECT[:-1]) == 0.0           # missing final "\n"
    assert G.strict_format_reward(PERFECT + "\n") == 0.5         # `$` also matches before a final "\n"
    assert G.strict_format_reward(PERFECT + "more") == 0.0
    assert G.strict_format_reward(" " + PERFECT) == 0.0          # anchored at the start
    assert G.strict_format_reward(PERFECT.replace("<reasoning>\n", "<reasoning>")) == 0.0


def test_dotall_vs_not_on_multiline_reasoning():
    text = "<reasoning>\nstep 1\nstep 2\n</reasoning>\n<answer>\n5\n</answer>\n"
    assert G.strict_format_reward(text, dotall=True) == 0.5
    assert G.strict_format_reward(text, dotall=False) == 0.0
    assert G.soft_format_reward(text, dotall=True) == 0.5
    assert G.soft_format_reward(text, dotall=False) == 0.0
    # one-line fields: the old revision matches too
    one = "<reasoning>\nstep\n</reasoning>\n<answer>\n5\n</answer>\n"
    assert G.strict_format_reward(one, dotall=False) == 0.5
    # the soft pattern has no newlines of its own: single-line tags pass without DOTALL
    assert G.soft_format_reward("<reasoning>r</reasoning> <answer>5</answer>", dotall=False) == 0.5
    assert G.total_reward(text, "5", dotall=True) - G.total_reward(text, "5", dotall=False) == pytest.approx(1.0)


def test_soft_format():
    assert G.soft_format_reward("<reasoning>r</reasoning>\n \t\n<answer>5</answer>") == 0.5   # whitespace between
    assert G.soft_format_reward("<reasoning>r</reasoning><answer>5</answer> trailing text") == 0.5
    assert G.soft_format_reward("<reasoning>r</reasoning> x <answer>5</answer>") == 0.0      # non-space between
    assert G.soft_format_reward("Sure! <reasoning>r</reasoning><answer>5</answer>") == 0.0   # re.match: at the start
    assert G.soft_format_reward("<reasoning>r</reasoning><answer>5") == 0.0


def test_xml_count_exact_pieces():
    assert G.count_xml(PERFECT) == pytest.approx(0.5)
    assert G.count_xml("") == 0.0
    assert G.count_xml("<reasoning>\n") == pytest.approx(0.125)
    assert G.count_xml("a\n</reasoning>\nb") == pytest.approx(0.125)
    # no "\n</answer>\n": the "\n<answer>\n" piece is penalised by the whole text length
    t = "x\n<answer>\n5"
    assert G.count_xml(t) == pytest.approx(0.125 - 0.001 * len(t))
    # ends with "\n</answer>" (no final newline): second penalty is (0 - 1) * 0.001 -> +0.001
    t = "<reasoning>\nr\n</reasoning>\n<answer>\n5\n</answer>"
    assert G.count_xml(t) == pytest.approx(0.5 - 0.001 * len(t) + 0.001)


def test_xml_count_penalises_text_after_answer():
    tail = "Hope this helps!"
    t = PERFECT + tail
    # both pieces penalised: len(tail) after "\n</answer>\n" and len("\n" + tail) - 1 after "\n</answer>"
    assert G.count_xml(t) == pytest.approx(0.5 - 0.001 * len(tail) - 0.001 * len(tail))
    assert G.xml_count_reward(t) < G.xml_count_reward(PERFECT)


def test_xml_count_duplicated_tags_get_nothing():
    dup = PERFECT + PERFECT
    assert G.count_xml(dup) == 0.0                           # every tag appears twice
    t = "<reasoning>\na\n</reasoning>\n<reasoning>\nb\n</reasoning>\n<answer>\n5\n</answer>\n"
    assert G.count_xml(t) == pytest.approx(0.25)             # only the answer tags count
    b = G.rewards_breakdown(dup, "18")
    assert b["correctness"] == 2.0 and b["soft"] == 0.5
    # with DOTALL the lazy answer group of the strict pattern stretches over the second block (as in the demo)
    assert b["strict"] == 0.5
    assert G.strict_format_reward(dup, dotall=False) == 0.0


def test_total_is_sum_of_components_and_bounded():
    texts = [PERFECT, PERFECT[:-1], PERFECT + "tail", "garbage", "<answer>18</answer>", PERFECT + PERFECT]
    for t in texts:
        b = G.rewards_breakdown(t, "18")
        assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
        assert b["total"] <= 4.0 + 1e-9
        assert G.total_reward(t, "18") == b["total"]


def test_components_selection_and_errors():
    assert G.total_reward(PERFECT, "18", components=("correctness",)) == 2.0
    assert G.rewards_breakdown(PERFECT, None, components=G.FORMAT_COMPONENTS) == {
        "strict": 0.5, "soft": 0.5, "xml": 0.5, "total": 1.5}
    with pytest.raises(ValueError, match="unknown reward"):
        G.total_reward(PERFECT, "18", components=("bogus",))
    with pytest.raises(ValueError, match="gold"):
        G.total_reward(PERFECT, None)


# ---------------------------------------------------------------------------------------- data

def _first_lines(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.mark.skipif(not os.path.exists(f"{DATA}/test.jsonl"), reason="GSM8K data not available")
def test_gold_extraction_on_real_data():
    recs = _first_lines(f"{DATA}/test.jsonl", 3)
    assert [G.extract_gold(r["answer"]) for r in recs] == ["18", "3", "70000"]
    probs = G.load_jsonl(f"{DATA}/test.jsonl")
    assert len(probs) == 1319
    assert probs[0] == G.GSM8KProblem(question=recs[0]["question"], gold="18")
    for p in probs:
        assert p.gold and "," not in p.gold and "$" not in p.gold and p.gold == p.gold.strip()
    assert sum(p.gold.isdigit() for p in probs) > 1300


@pytest.mark.skipif(not os.path.exists(f"{DATA}/train.jsonl"), reason="GSM8K data not available")
def test_load_jsonl_limit_and_seed_on_real_data():
    a = G.load_jsonl(f"{DATA}/train.jsonl", limit=5, seed=3)
    b = G.load_jsonl(f"{DATA}/train.jsonl", limit=5, seed=3)
    c = G.load_jsonl(f"{DATA}/train.jsonl", limit=5, seed=4)
    first = G.load_jsonl(f"{DATA}/train.jsonl", limit=5)
    assert a == b and a != c and len(a) == 5
    assert first[0].question.startswith("Natalia")


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_load_jsonl_ok(tmp_path):
    p = _write(tmp_path, [json.dumps({"question": "q1", "answer": "w\n#### $1,000"}), "",
                          json.dumps({"question": "q2", "answer": "#### 7"})])
    assert G.load_jsonl(p) == [G.GSM8KProblem("q1", "1000"), G.GSM8KProblem("q2", "7")]
    assert G.load_jsonl(str(p), limit=1) == [G.GSM8KProblem("q1", "1000")]
    assert sorted(G.load_jsonl(p, seed=0), key=lambda x: x.question) == G.load_jsonl(p)


def test_load_jsonl_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        G.load_jsonl(missing)


def test_load_jsonl_bad_json_names_line(tmp_path):
    p = _write(tmp_path, [json.dumps({"question": "q", "answer": "#### 1"}), "{not json"])
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        G.load_jsonl(p)


@pytest.mark.parametrize("rec,match", [
    ({"question": "q"}, "answer"),
    ({"answer": "#### 1"}, "question"),
    ({"question": "q", "answer": 5}, "answer"),
    ({"question": "q", "answer": "no marker"}, "####"),
    ([1, 2], "JSON object"),
])
def test_load_jsonl_missing_fields(tmp_path, rec, match):
    p = _write(tmp_path, [json.dumps(rec)])
    with pytest.raises(ValueError, match=match):
        G.load_jsonl(p)


# ---------------------------------------------------------------------------------- potentials

def _ids(m):
    return torch.zeros(m, 3, dtype=torch.int64)


def test_gsm8k_potential_uses_prompt_index():
    golds = ["18", "5"]
    texts = [PERFECT, PERFECT, PERFECT.replace("18", "5"), "garbage"]
    pidx = torch.tensor([0, 1, 1, 0], dtype=torch.int64)
    pot = G.gsm8k_potential(golds)
    assert pot.needs_text
    out = pot(_ids(4), texts=texts, prompt_index=pidx)
    assert out.shape == (4,) and out.dtype == torch.float32
    expect = [G.total_reward(t, golds[i]) for t, i in zip(texts, pidx.tolist())]
    assert out.tolist() == pytest.approx(expect)
    assert out[0] == pytest.approx(4.0) and out[1] == pytest.approx(2.0) and out[2] == pytest.approx(4.0)
    hot = G.gsm8k_potential(golds, beta=2.5)(_ids(4), texts=texts, prompt_index=pidx)
    assert hot.tolist() == pytest.approx([2.5 * e for e in expect])


def test_gsm8k_potential_indicator_gives_minus_inf():
    pot = G.gsm8k_potential(["18", "5"], mode="indicator", components=("correctness",))
    out = pot(_ids(3), texts=[PERFECT, PERFECT, "<answer>5</answer>"],
              prompt_index=torch.tensor([0, 1, 1]))
    assert out[0] == 0.0 and out[1] == -math.inf and out[2] == 0.0
    assert not torch.isnan(out).any()


def test_gsm8k_potential_threshold_and_dotall():
    multi = "<reasoning>\na\nb\n</reasoning>\n<answer>\n5\n</answer>\n"
    comps = ("strict", "soft")
    on = G.gsm8k_potential(["5"], mode="indicator", threshold=0.75, components=comps)
    off = G.gsm8k_potential(["5"], mode="indicator", threshold=0.75, components=comps, dotall=False)
    assert on(_ids(1), texts=[multi]).item() == 0.0
    assert off(_ids(1), texts=[multi]).item() == -math.inf


def test_gsm8k_potential_errors():
    pot = G.gsm8k_potential(["1"])
    with pytest.raises(IndexError, match="out of range"):
        pot(_ids(1), texts=[PERFECT], prompt_index=torch.tensor([3]))
    with pytest.raises(ValueError, match="needs decoded text"):
        pot(_ids(1))
    with pytest.raises(ValueError, match="unknown reward"):
        G.gsm8k_potential(["1"], components=("nope",))
    with pytest.raises(ValueError, match="mode"):
        G.gsm8k_potential(["1"], mode="linear")


def test_format_potential_needs_no_gold():
    pot = G.gsm8k_format_potential()
    out = pot(_ids(3), texts=[PERFECT, "garbage", PERFECT + "tail"])
    assert out.tolist() == pytest.approx([1.5, 0.0, 1.0 - 0.008])   # strict fails with a tail
    with pytest.raises(ValueError, match="gold"):
        G.gsm8k_format_potential(components=("correctness", "xml"))
    ind = G.gsm8k_format_potential(mode="indicator", threshold=1.0, components=("strict", "soft", "integer"))
    assert ind(_ids(2), texts=[PERFECT, PERFECT[:-1]]).tolist() == [0.0, -math.inf]


# ------------------------------------------------------------------------------------ registry

def test_registry(tmp_path):
    assert {"gsm8k", "arithmetic", "arithmetic-short"} <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*arithmetic.*gsm8k"):
        get_task("nope")
    with pytest.raises(ValueError, match="path"):
        get_task("gsm8k")
    p = _write(tmp_path, [json.dumps({"question": "q1", "answer": "#### 18"})])
    task = get_task("gsm8k", path=p)
    probs = task.problems()
    assert probs == [G.GSM8KProblem("q1", "18")]
    assert task.reward(PERFECT, "18") == task.max_reward == 4.0
    assert task.build_messages("q1")[0]["content"] == G.SYSTEM_PROMPT
    out = task.potential([p.gold for p in probs])(_ids(1), texts=[PERFECT])
    assert out.item() == pytest.approx(4.0)


def test_package_does_not_hardcode_data_path():
    import tsmc_kernels.tasks as T
    root = os.path.dirname(T.__file__)
    for fn in os.listdir(root):
        if fn.endswith(".py"):
            with open(os.path.join(root, fn), encoding="utf-8") as f:
                assert "/work/shared" not in f.read(), fn
