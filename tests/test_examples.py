"""Every runnable example in python/ end to end, on a tiny random model (``--model``) with tiny sizes:
what a new user runs first must not be the one thing CI never ran."""
import json
import os
import runpy
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
SAMPLERS = ["--particles", "2", "--runs", "1", "--max-new-tokens", "3", "--every", "2", "--twist-steps", "1"]


def run_example(name, argv, monkeypatch, capsys):
    """Run ``python/<name>.py`` as ``__main__`` with ``argv``; returns (exit status, stdout + stderr)."""
    monkeypatch.syspath_prepend(EXAMPLES)
    monkeypatch.setattr(sys, "argv", [name + ".py", *argv])
    code = 0
    try:
        runpy.run_path(os.path.join(EXAMPLES, name + ".py"), run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_smc_generate_example(tiny_model_dir, monkeypatch, capsys):
    code, out = run_example("smc_generate_example", ["--model", tiny_model_dir, "--particles", "2",
                                                     "--max-new-tokens", "3"], monkeypatch, capsys)
    assert code == 0 and out.count("best SMC answer") == 2 and "log Zhat" in out


def test_power_sampling_example(tiny_model_dir, monkeypatch, capsys):
    code, out = run_example("power_sampling_example", ["--model", tiny_model_dir, "--blocks", "1", "--block-size", "2",
                                                       "--n-mcmc", "1", "--chains", "2"], monkeypatch, capsys)
    assert code == 0 and "acceptance" in out


@pytest.mark.parametrize("name,extra", [
    ("toxicity_example", ["--bounds-runs", "0"]),
    ("sentiment_example", ["--bounds-runs", "2"]),
    ("infilling_example", []),
])
def test_task_examples(name, extra, tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip({"toxicity_example": "profanity_check", "sentiment_example": "vaderSentiment"}.get(name, "torch"))
    code, out = run_example(name, ["--model", tiny_model_dir, *SAMPLERS, *extra], monkeypatch, capsys)
    assert code == 0
    if "--bounds-runs" in extra and name == "sentiment_example":
        assert "bootstrap SMC" in out.split("rejection sampling")[1]  # the bounds table
    for row in ("p0 sampling", "importance sampling", "bootstrap SMC", "SMC + intermediate", "twisted SMC (CTL)"):
        assert row in out


def test_bad_bounds_runs_stop_before_loading(monkeypatch, capsys):
    code, out = run_example("toxicity_example", ["--model", "/nonexistent", "--bounds-runs", "1"], monkeypatch, capsys)
    assert code == 2 and "standard errors need two runs" in out


def test_bounds_example(tiny_model_dir, monkeypatch, capsys):
    code, out = run_example("bounds_example", ["--model", tiny_model_dir, "--problems", "1", "--particles", "2",
                                               "--runs", "2", "--max-new-tokens", "2", "--twist-steps", "1",
                                               "--twist-particles", "2"], monkeypatch, capsys)
    assert code == 0 and "tightest interval per problem: [0]" in out and "twisted IWAE" in out


def test_twist_acceptance(tiny_model_dir, monkeypatch, capsys):
    code, out = run_example("twist_acceptance", ["--model", tiny_model_dir, "--prompts", "2", "--particles", "2",
                                                 "--train-particles", "2", "--inner-steps", "1", "--max-steps", "1",
                                                 "--eval-runs", "1", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code in (0, 1) and ("ACCEPT" in out)  # 1: the one-round head did not beat bootstrap


def test_train_twist_gsm8k(tiny_model_dir, monkeypatch, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(2)))
    argv = ["--model", tiny_model_dir, "--data", str(data), "--max-steps", "1", "--particles", "2",
            "--max-new-tokens", "3", "--batch-size", "1", "--save-steps", "1", "--output-dir", str(tmp_path / "run"),
            "--device", "cpu"]
    code, out = run_example("train_twist_gsm8k", argv, monkeypatch, capsys)
    assert code == 0 and (tmp_path / "run" / "final").is_dir() and "saved the twist head" in out
    code, _ = run_example("train_twist_gsm8k", argv[:2] + ["--data", str(tmp_path / "missing.jsonl")], monkeypatch, capsys)
    assert "GSM8K data not found" in str(code)  # before the model is loaded
