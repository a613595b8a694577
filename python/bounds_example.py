"""Bidirectional bounds on log Z (SPEC §4) for SmolLM2-135M-Instruct: bootstrap SMC vs a learned twist.

Task: short arithmetic word problems (:mod:`tsmc_kernels.tasks.arithmetic`, "answer with only the
number"). The potential is ``phi = 1`` when the first number of the completion is the gold answer,
``e^-1`` for another number and ``e^-3`` without a number (``--hard``: the indicator of a right
answer). ``phi <= 1``, so rejection sampling from ``p0`` gives exact target samples: they are drawn
once and shared by every method's upper bound.

For each method the table shows, per problem, the lower bound ``E[log Zhat]`` of SMC, the upper
bound ``E[log Zhat]`` of SMC conditioned on an exact sample, the gap (which bounds the symmetrised
KL between the sampler and the target on the extended space), and the proposal KLs
``KL(q || sigma)`` / ``KL(sigma || q)`` of one particle (``inf`` with ``--hard``: ``q`` proposes wrong
answers, which the target excludes). Methods:

* ``bootstrap SMC`` (proposal = p0, resampling at every step) and ``bootstrap IWAE`` (no resampling);
* ``twisted SMC``: an ``MLPTwistHead`` trained by contrastive twist learning
  (``tsmc_kernels.twist.fit_twist``) when that module is importable; otherwise skipped with a message.

A better sampler has a smaller gap; ``log Z`` lies between every lower and every upper bound in
expectation (the rejection sampler's plain Monte Carlo estimate ``log mean phi`` is printed for
reference). Costs about 10 CPU-minutes with the defaults (model loading included).

    .venv/bin/python python/bounds_example.py [--problems 2 --particles 4 --runs 8 --twist-steps 4]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from example_common import add_run_options, load_model
from tsmc_kernels.bounds import log_z_bounds, rejection_samples
from tsmc_kernels.potentials.base import Potential
from tsmc_kernels.tasks.arithmetic import (build_short_prompt, extract_first_number, make_problems,
                                           short_answer_potential, short_answer_reward)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=2, help="arithmetic problems (prompts)")
    ap.add_argument("--difficulty", default="easy", choices=["easy", "medium", "hard"])
    ap.add_argument("--particles", type=int, default=4, help="particles per SMC run")
    ap.add_argument("--runs", type=int, default=8, help="independent runs per bound (and exact samples per problem)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--wrong", type=float, default=1.0, help="-log phi of a wrong first number")
    ap.add_argument("--no-number", type=float, default=3.0, help="-log phi of a completion without a number")
    ap.add_argument("--hard", action="store_true", help="phi = 1[right answer] (KL(q||sigma) is then infinite)")
    ap.add_argument("--twist-steps", type=int, default=4, help="CTL training rounds (0: no twisted SMC)")
    ap.add_argument("--twist-particles", type=int, default=8, help="particles per prompt while training the twist")
    add_run_options(ap)
    return ap.parse_args()


class ArithmeticPhi(Potential):
    """``phi = 1`` for the right number first, ``e^-wrong`` for another number, ``e^-none`` for no number."""

    needs_text = True
    name = "arithmetic"

    def __init__(self, golds, wrong: float, none: float):
        self.golds, self.wrong, self.none = list(golds), wrong, none

    def log_phi(self, completion_ids, texts, prompt_index):
        out = []
        for text, i in zip(texts, prompt_index.tolist()):
            if short_answer_reward(text, self.golds[i]) > 0:
                out.append(0.0)
            else:
                out.append(-self.wrong if extract_first_number(text) is not None else -self.none)
        return torch.tensor(out)


def make_potential(golds, args):
    if args.hard:
        return short_answer_potential(golds)  # log phi in {0, -inf}
    return ArithmeticPhi(golds, args.wrong, args.no_number)


def _num(x) -> str:
    return "-" if math.isnan(float(x)) else f"{float(x):.3f}"


def print_rows(name, b, seconds):
    for i in range(b.lower.shape[0]):
        print(f"{name if i == 0 else '':<16} {i:>3} {float(b.lower[i]):>8.3f}±{float(b.lower_se[i]):<6.3f}"
              f"{float(b.upper[i]):>8.3f}±{float(b.upper_se[i]):<6.3f}{float(b.gap[i]):>7.3f}"
              f"{_num(b.kl_q_sigma[i]):>9}{_num(b.kl_sigma_q[i]):>9}"
              f"{(f'{seconds:>7.0f}' if i == 0 else ''):>7}")


HEADER = f"{'method':<16} {'#':>3} {'lower':>15}{'upper':>15}{'gap':>7}{'KL(q|s)':>9}{'KL(s|q)':>9}{'sec':>7}"


def compare_bounds(model, ids, mask, phi, *, tokenizer, runs: int, particles: int, max_new_tokens: int,
                   twist=None, seed: int = 0):
    """Bounds for bootstrap and (if ``twist``) twisted SMC / IWAE, sharing one set of exact samples.

    ``phi <= 1`` (rejection sampling from ``p0``). Returns ``[(name, LogZBounds, seconds)]``.
    """
    t = time.perf_counter()
    exact, stats = rejection_samples(model, ids, phi, runs, mask, max_new_tokens=max_new_tokens,
                                     tokenizer=tokenizer, seed=seed, return_stats=True)
    print(f"rejection sampling: {runs} exact samples per prompt from {stats.proposals.tolist()} p0 draws "
          f"in {time.perf_counter() - t:.0f}s", flush=True)
    for i in range(ids.shape[0]):
        sample = tokenizer.decode(exact[i, 0], skip_special_tokens=True).strip()
        print(f"  [{i}] log mean phi over the p0 draws = {float(stats.log_z_mc[i]):.3f}; an exact sample: {sample!r}")
    common = dict(potential=phi, num_particles=particles, num_runs=runs, max_new_tokens=max_new_tokens,
                  exact_samples=exact, tokenizer=tokenizer, seed=seed + 1)
    # SMC rows resample at every step (the twisted-SMC paper's setting); their proposal is the IWAE
    # row's, so the proposal KLs are estimated once, on the IWAE rows.
    methods = [("bootstrap SMC", dict(ess_threshold=1.0, proposal_kl=False)),
               ("bootstrap IWAE", dict(ess_threshold=0.0))]
    if twist is not None:
        methods += [("twisted SMC", dict(ess_threshold=1.0, twist=twist, proposal_kl=False)),
                    ("twisted IWAE", dict(ess_threshold=0.0, twist=twist))]
    results = []
    for name, kw in methods:
        t = time.perf_counter()
        results.append((name, log_z_bounds(model, ids, mask, **{**common, **kw}), time.perf_counter() - t))
    return results


def print_bounds(results, title: str):
    print(f"\n{title}\n{HEADER}")
    for name, b, sec in results:
        print_rows(name, b, sec)


def main():
    args = parse_args()
    model, tok = load_model(args)
    problems = make_problems(args.problems, seed=args.seed, difficulty=args.difficulty)
    golds = [p.gold for p in problems]
    texts = [build_short_prompt(tok, p.question) for p in problems]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    phi = make_potential(golds, args)
    T = args.max_new_tokens

    head = None
    if args.twist_steps > 0:
        try:
            from tsmc_kernels.twist import MLPTwistHead, fit_twist
        except ImportError as exc:
            print(f"twisted SMC skipped (tsmc_kernels.twist is not importable: {exc}); bootstrap only")
        else:
            t = time.perf_counter()
            head = MLPTwistHead.for_model(model, seed=args.seed)
            hist = fit_twist(model, head, ids, phi, attention_mask=mask, loss="ctl", steps=args.twist_steps,
                             num_particles=args.twist_particles, max_new_tokens=T, tokenizer=tok, seed=args.seed + 2)
            head.eval()
            print(f"twist: MLPTwistHead, {args.twist_steps} CTL rounds in {time.perf_counter() - t:.0f}s, "
                  f"last loss {hist[-1]['loss']:.3f}")
    results = compare_bounds(model, ids, mask, phi, tokenizer=tok, runs=args.runs, particles=args.particles,
                             max_new_tokens=T, twist=head, seed=args.seed)

    kind = "1[right]" if args.hard else f"1 right / e^-{args.wrong:g} wrong number / e^-{args.no_number:g} no number"
    print_bounds(results, f"log Z bounds, phi = {kind}: {args.runs} runs x {args.particles} particles x {T} tokens "
                          "per bound")
    lo = torch.stack([b.lower for _, b, _ in results]).max(0).values
    up = torch.stack([b.upper for _, b, _ in results]).min(0).values
    print("\ntightest interval per problem: " + ", ".join(
        f"[{i}] {float(lo[i]):.3f} <= log Z <= {float(up[i]):.3f}" + (" (crossed)" if lo[i] > up[i] else "")
        for i in range(len(problems))))
    print("Each bound holds in expectation: with few runs an interval can cross (see the standard errors).\n"
          "KL(q|s), KL(s|q): one particle of the proposal q (shown on the IWAE rows; the SMC rows use the same q); "
          "log Z in them is log mean Zhat of the lower-bound runs (rough with few runs)"
          + ("; KL(q|s) = inf: q proposes wrong answers" if args.hard else ""))


if __name__ == "__main__":
    main()
