"""Compare samplers on a task at a comparable budget of decoded tokens (the ``eval`` command).

Methods (each gets ``num_particles`` samples per problem and ``max_new_tokens``):

* ``sample``: plain sampling from the model (``smc_generate`` with no potential and no
  resampling: N independent samples); answers selected by best-of-N (by reward) and by
  majority vote over extracted answers.
* ``smc``: bootstrap SMC with the task's potential; the answer with the largest total weight.
* ``twisted``: twisted SMC with a trained head (needs ``twist=``).
* ``power-uniform`` / ``power-entropy``: power-distribution MH (SPEC §5), one chain per sample.

Reported per method: the (weighted) fraction of samples that earn a reward, the mean reward,
the accuracy of the selected answer, tokens decoded and wall time.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .sampler import smc_generate

METHODS = ("sample", "smc", "twisted", "power-uniform", "power-entropy")


@dataclass
class MethodResult:
    method: str
    reward_fraction: float  # weighted fraction of samples with reward > 0
    mean_reward: float  # weighted mean reward
    accuracy: float  # selected answer == gold
    best_of_n_accuracy: float  # any sample correct (oracle best-of-N by reward)
    tokens_decoded: int
    wall_time_s: float
    mean_log_z: float = float("nan")  # SMC only: mean log Zhat over problems with finite Zhat
    ess_trace: list = field(default_factory=list)  # SMC only: mean ESS per step
    resample_rate: float = float("nan")


@dataclass
class EvalReport:
    task: str
    num_problems: int
    num_particles: int
    max_new_tokens: int
    results: list

    def table(self) -> str:
        """A Markdown table of the results."""
        head = ("| method | reward frac | mean reward | accuracy | best-of-N acc | tokens | time (s) | mean log Zhat |\n"
                "|---|---|---|---|---|---|---|---|")
        rows = [f"| {r.method} | {r.reward_fraction:.3f} | {r.mean_reward:.3f} | {r.accuracy:.3f} | "
                f"{r.best_of_n_accuracy:.3f} | {r.tokens_decoded} | {r.wall_time_s:.1f} | "
                f"{'' if math.isnan(r.mean_log_z) else f'{r.mean_log_z:.3f}'} |" for r in self.results]
        return "\n".join([head, *rows])

    def to_json(self) -> str:
        """The report as strict JSON: NaN / infinite numbers (no log Zhat for plain sampling, a prompt
        whose particles all died) become ``null``."""
        return json.dumps(_finite_or_none(asdict(self)), indent=2, allow_nan=False)


def _finite_or_none(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _answer_key(task_name: str, text: str) -> str | None:
    from .tasks import arithmetic, gsm8k
    if task_name == "arithmetic-short":
        return arithmetic.extract_first_number(text)
    ans = gsm8k.extract_answer(text)
    return ans or None


def _score(task, task_name, problems, texts, weights, N):
    """Weighted reward stats and selected-answer accuracy. ``texts``: B*N strings; ``weights``: [B, N]."""
    B = len(problems)
    rewards = torch.tensor([task.reward(t, problems[i // N].gold) for i, t in enumerate(texts)],
                           dtype=torch.float64).view(B, N)
    w = weights.double().cpu()
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.full_like(w, 1.0 / N))
    frac = float(((rewards > 0).double() * w).sum(1).mean())
    mean_r = float((rewards * w).sum(1).mean())
    correct, any_correct = 0, 0
    for b in range(B):
        votes = Counter()
        for n in range(N):
            key = _answer_key(task_name, texts[b * N + n])
            if key is not None:
                votes[key] += float(w[b, n])
        chosen = votes.most_common(1)[0][0] if votes else None
        correct += int(chosen is not None and chosen == problems[b].gold)
        any_correct += int(any(_answer_key(task_name, texts[b * N + n]) == problems[b].gold for n in range(N)))
    return frac, mean_r, correct / B, any_correct / B


def evaluate(model, tokenizer, task_name: str, problems, *, task=None, methods=("sample", "smc"),
             num_particles: int = 8, max_new_tokens: int = 32, seed: int = 0, twist=None, potential_options=None,
             power_options=None, progress: bool = True) -> EvalReport:
    """Run every method on ``problems`` and collect :class:`MethodResult` rows.

    Args:
        model, tokenizer: an HF causal LM and its tokenizer (left padding is set here).
        task_name: a name known to :func:`tsmc_kernels.tasks.get_task`; ``task``: the Task object.
        problems: list of problems with ``.question`` and ``.gold``.
        methods: subset of :data:`METHODS` (or one method name).
        twist: twist head for ``twisted``. potential_options: kwargs for ``task.potential``.
        power_options: kwargs for :func:`tsmc_kernels.power.power_sample`.
    Returns:
        :class:`EvalReport`.
    """
    from .tasks import get_task

    task = task or get_task(task_name)
    if isinstance(methods, str):
        methods = [methods]
    if len(problems) == 0:
        raise ValueError("evaluate needs at least one problem")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    if "twisted" in methods and twist is None:
        raise ValueError("method 'twisted' needs a trained twist head (--head PATH)")
    tokenizer.padding_side = "left"
    prompts = [task.build_prompt(tokenizer, p.question) for p in problems]
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    potential = task.potential([p.gold for p in problems], **(potential_options or {}))
    N, B = num_particles, len(problems)
    results = []
    for method in methods:
        t0 = time.perf_counter()
        extra = {}
        bar = method if progress else False  # the bar says which method is running
        if method in ("sample", "smc", "twisted"):
            out = smc_generate(model, enc.input_ids, enc.attention_mask, num_particles=N,
                               max_new_tokens=max_new_tokens, tokenizer=tokenizer, seed=seed, progress=bar,
                               potential=None if method == "sample" else potential,
                               twist=twist if method == "twisted" else None,
                               ess_threshold=0.0 if method == "sample" else 0.5)
            texts = tokenizer.batch_decode(out.completions.reshape(B * N, -1).tolist(), skip_special_tokens=True)
            weights = torch.full((B, N), 1.0 / N) if method == "sample" else out.weights
            tokens = out.tokens_decoded
            if method != "sample":
                finite = torch.isfinite(out.log_z)
                extra = dict(mean_log_z=float(out.log_z[finite].mean()) if finite.any() else -math.inf,
                             ess_trace=out.ess.float().mean(0).tolist(),
                             resample_rate=float(out.resampled.float().mean()))
        else:
            from .power import power_sample
            opts = dict(power_options or {})
            out = power_sample(model, enc.input_ids, enc.attention_mask, cut=method.split("-")[1],
                               num_chains=N, max_new_tokens=max_new_tokens, seed=seed, progress=bar, **opts)
            texts = tokenizer.batch_decode(out.completions.reshape(B * N, -1).tolist(), skip_special_tokens=True)
            weights = torch.full((B, N), 1.0 / N)
            tokens = int(out.tokens_decoded)
        wall = time.perf_counter() - t0
        frac, mean_r, acc, best = _score(task, task_name, problems, texts, weights, N)
        results.append(MethodResult(method, frac, mean_r, acc, best, int(tokens), wall, **extra))
    return EvalReport(task_name, B, N, max_new_tokens, results)
