"""The command line on a tiny random model saved with the embedded model's tokenizer."""
import dataclasses
import json
import warnings

import pytest
import torch

from tsmc_kernels import cli

pytestmark = pytest.mark.filterwarnings("ignore")


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_with_prompts(tiny_model_dir, capsys):
    code, out, _ = run(["run", "--model", tiny_model_dir, "--prompt", "Hello", "--prompt", "2+2=",
                        "--particles", "3", "--max-new-tokens", "4"], capsys)
    assert code == 0
    assert out.count("=== prompt") == 2 and "log Zhat" in out and "tokens decoded" in out


def test_run_with_a_prompt_potential(tiny_model_dir, capsys):
    code, out, err = run(["run", "--model", tiny_model_dir, "--prompt", "Hello", "--particles", "3",
                          "--max-new-tokens", "3", "--potential", "regex:[0-9]", "--beta", "2", "--sync-every", "2"],
                         capsys)
    assert code == 0, err
    assert "log phi=0.00" in out or "log phi=-2.00" in out


@pytest.mark.parametrize("spec,match", [("nope", "unknown --potential"), ("regex:(", "regex"),
                                        ("sentiment:neutral", "unknown --potential")])
def test_bad_prompt_potential(tiny_model_dir, capsys, spec, match):
    code, _, err = run(["run", "--model", tiny_model_dir, "--prompt", "Hi", "--potential", spec], capsys)
    assert code == 2 and match in err


def test_run_on_a_task(tiny_model_dir, capsys):
    warnings.simplefilter("always")  # over the module's "ignore" (pytest restores the filters after the test)
    code, out, err = run(["run", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "2",
                          "--particles", "2", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.count("=== prompt") == 2
    # A random model never earns the indicator reward: the warning is one line without library file names.
    assert "tsmc: warning: all particles of prompt(s) [0, 1] have zero weight" in err and ".py:" not in err


def test_eval_writes_json(tiny_model_dir, capsys, tmp_path):
    report = tmp_path / "r.json"
    code, out, _ = run(["eval", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "2",
                        "--particles", "2", "--max-new-tokens", "3", "--methods", "sample,smc",
                        "--json", str(report)], capsys)
    assert code == 0 and "| sample |" in out and "| smc |" in out
    def refuse(constant):  # strict JSON: NaN / Infinity are not JSON (plain sampling has no log Zhat)
        raise AssertionError(f"{constant} in the report")

    data = json.loads(report.read_text(), parse_constant=refuse)
    assert [r["method"] for r in data["results"]] == ["sample", "smc"]
    assert all(r["tokens_decoded"] > 0 for r in data["results"])
    assert data["results"][0]["mean_log_z"] is None


def test_eval_on_gsm8k_file(tiny_model_dir, capsys, tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    code, out, _ = run(["eval", "--model", tiny_model_dir, "--task", "gsm8k", "--data", str(data), "-n", "1",
                        "--particles", "2", "--max-new-tokens", "3", "--methods", "sample", "--format-only"], capsys)
    assert code == 0 and "| sample |" in out


@pytest.mark.parametrize("argv,match", [
    (["run", "--model", "/nonexistent/model", "--prompt", "x"], "not found"),
    (["run", "--prompt", "x", "--cuda-graph", "--device", "cpu"], "CUDA"),
    (["eval", "--task", "nosuchtask"], "unknown task"),
    (["eval", "--task", "gsm8k"], "--data"),
    (["eval", "--task", "gsm8k", "--data", "/nonexistent.jsonl"], "nonexistent"),
    # the library's argument checks and early checks of the command line: one line, status 2, no traceback
    (["run", "--prompt", "x", "--particles", "0"], "--particles must be >= 1"),
    (["run", "--prompt", "x", "--format-only"], "--format-only is for a task"),
    (["run", "-n", "1", "--format-only"], "--format-only is for the GSM8K-format tasks"),
    (["run", "--prompt", "x", "--method", "sample", "--head", "/tmp/tsmc_unused_head"], "are for --method smc"),
    (["run", "--prompt", "x", "--method", "sample", "--potential", "regex:a"], "are for --method smc"),
    (["run", "--model", "/tmp", "--prompt", "x"], "not a model folder"),
    (["run", "--model", "/nonexistent", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["run", "--model", "/nonexistent", "--method", "power", "--alpha", "nan"], "--alpha must be"),
    (["run", "--model", "/nonexistent", "--ess-threshold", "-1"], "--ess-threshold must be >= 0"),
    (["eval", "--methods", "sample,bogus"], "unknown ['bogus']"),
    (["eval", "--methods", "twisted"], "needs a trained twist head"),
    (["train-twist", "--steps", "0", "--out", "/tmp/tsmc_unused_head"], "--steps must be >= 1"),
    (["bounds", "--runs", "1"], "--runs must be >= 2"),
    (["run", "--prompt", "x", "--temperature", "0"], "temperature"),
    (["run", "--prompt", "x", "--seed", "-1"], "seed"),
    (["run", "--prompt", "x", "--method", "power", "--alpha", "0"], "alpha"),
    (["run", "--prompt", "x", "--method", "power", "--temperature", "0.5"], "not used by --method power"),
    (["run", "--prompt", "x", "--n-mcmc", "3"], "for --method power"),
    (["run", "--prompt", ""], "empty"),
    (["run", "-n", "0"], "num-problems"),
    (["run", "--prompt", "x", "--device", "bogus"], "--device bogus"),
    (["eval", "--json", "/nonexistent_dir/r.json"], "does not exist"),
    (["train-twist", "--loss", "bogus", "--out", "/tmp/tsmc_unused_head"], "unknown twist loss"),
    (["train-twist", "--lr", "nan", "--out", "/tmp/tsmc_unused_head"], "--lr"),
    (["demo", "--particles", "0"], "--particles"),
    (["demo", "--out", "/nonexistent_dir/x.png"], "does not exist"),
])
def test_documented_errors(argv, match, capsys, tiny_model_dir):
    if "--model" not in argv:
        argv = argv[:1] + ["--model", tiny_model_dir] + argv[1:]
    code, _, err = run(argv, capsys)
    assert code == 2 and match in err


def test_every_command_documents_its_options_and_defaults(capsys):
    for command in ("run", "eval", "train-twist", "bounds", "bench", "demo"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert command == "bench" or text.count("(default: ") >= 3, command
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "power-entropy" in text and "(default: 2)" in text  # the methods, and eval's own --n-mcmc default


def test_not_jsonl_is_an_error(tiny_model_dir, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    code, _, err = run(["eval", "--model", tiny_model_dir, "--task", "gsm8k", "--data", str(bad)], capsys)
    assert code == 2 and "not valid JSON" in err


def test_bench_collects(capfd):
    code, out, _ = run(["bench", "--co", "-q"], capfd)  # pytest runs in a subprocess: capture the fds
    assert code == 0 and "test_bench_smc.py" in out


def test_train_twist_then_use_the_head(tiny_model_dir, capsys, tmp_path):
    head = tmp_path / "head"
    code, out, _ = run(["train-twist", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "2",
                        "--particles", "2", "--steps", "1", "--max-new-tokens", "3", "--out", str(head)], capsys)
    assert code == 0 and (head / "config.json").is_file() or any(head.iterdir())
    code, out, _ = run(["run", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "1",
                        "--particles", "2", "--max-new-tokens", "3", "--head", str(head)], capsys)
    assert code == 0 and "log Zhat" in out
    code, out, _ = run(["eval", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "1",
                        "--particles", "2", "--max-new-tokens", "3", "--methods", "twisted", "--head", str(head)],
                       capsys)
    assert code == 0 and "| twisted |" in out


def test_fudge_and_model_heads(tiny_model_dir, capsys, tmp_path):
    """train-twist --loss fudge builds the logsigmoid head FUDGE needs; a saved ModelTwistHead runs
    from the command line (the sampler binds its prompts)."""
    from transformers import AutoModelForCausalLM

    from tsmc_kernels.twist import ModelTwistHead

    fudge = tmp_path / "fudge"
    code, _, err = run(["train-twist", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "2",
                        "--particles", "2", "--steps", "1", "--max-new-tokens", "3", "--loss", "fudge",
                        "--out", str(fudge)], capsys)
    assert code == 0, err
    model_head = tmp_path / "model_head"
    ModelTwistHead.from_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), num_layers=1).save_pretrained(
        model_head)
    for head in (fudge, model_head):
        code, out, err = run(["run", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "1",
                              "--particles", "2", "--max-new-tokens", "3", "--head", str(head)], capsys)
        assert code == 0 and "log Zhat" in out, err


def test_missing_head_is_an_error(tiny_model_dir, capsys, tmp_path):
    code, _, err = run(["run", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "1",
                        "--head", str(tmp_path / "nohead")], capsys)
    assert code == 2 and "twist head" in err


def test_bounds_without_exact_samples_is_an_error(tiny_model_dir, capsys):
    code, _, err = run(["bounds", "--model", tiny_model_dir, "--task", "arithmetic-short", "-n", "1",
                        "--particles", "2", "--runs", "2", "--max-new-tokens", "2", "--max-proposals", "8"], capsys)
    assert code == 2 and "rejection sampling" in err


def test_bounds(tiny_model_dir, capsys, monkeypatch):
    """The bounds command end to end, with a potential the random model often satisfies."""
    task, problems, popts = cli._load_task(cli.build_parser().parse_args(
        ["bounds", "--task", "arithmetic-short", "-n", "1"]))
    even_first = lambda ids, **kw: torch.where(ids[:, 0] % 2 == 0, 0.0, -float("inf"))  # noqa: E731
    task = dataclasses.replace(task, potential=lambda golds, **kw: even_first)
    monkeypatch.setattr(cli, "_load_task", lambda args: (task, problems, popts))
    code, out, err = run(["bounds", "--model", tiny_model_dir, "--particles", "2", "--runs", "2",
                          "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "lower" in out and "upper" in out


def test_demo_on_a_tiny_model(tiny_model_dir, capsys, tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    png = tmp_path / "report.png"
    code, out, _ = run(["demo", "--model", tiny_model_dir, "--data", str(data), "--out", str(png), "-n", "2",
                        "--particles", "2"], capsys)
    assert code == 0 and png.stat().st_size > 0
    assert out.count("| sample |") == 2 and "| smc |" in out


def test_demo_without_matplotlib_prints_the_tables(tiny_model_dir, capsys, tmp_path, monkeypatch):
    import tsmc_kernels.demo as demo

    monkeypatch.setattr(demo, "_can_plot", lambda: False)
    png = tmp_path / "report.png"
    code, out, _ = run(["demo", "--model", tiny_model_dir, "--out", str(png), "-n", "1", "--particles", "2"], capsys)
    assert code == 0 and not png.exists()
    assert 0 <= out.find("matplotlib is not installed") < out.find("| smc |")
