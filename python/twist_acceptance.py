"""Acceptance check for twist learning on a real model (CPU is enough).

Trains a twist head with CTL for a few minutes on a task the base model rarely solves, then
compares twisted SMC under the trained head with bootstrap SMC at the same particle count, on the
same prompts and random seeds:

* the fraction of reward-earning particles (final particles, before weighting), and
* ``log Zhat`` (mean over independent runs; ``Zhat`` is unbiased for ``Z`` under both samplers, so
  a higher ``E[log Zhat]`` means a smaller gap ``log Z - E[log Zhat]``, i.e. a better sampler).

Default task: the short-answer arithmetic problems of :mod:`tsmc_kernels.tasks.arithmetic`
("answer with only the number"; reward 1 if the first number is right) with the potential
``phi = exp(beta * r)`` (finite everywhere, so ``log Zhat`` is always finite). ``--task digit``
uses a format reward instead: 1 if the completion's first non-space character is a digit.

    python python/twist_acceptance.py --threads 1           # embedded SmolLM2-135M, ~6-8 min of CPU time
    python python/twist_acceptance.py --task digit --train-seconds 120
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tsmc_kernels import smc_generate  # noqa: E402
from tsmc_kernels.potentials.base import RewardPotential  # noqa: E402
from tsmc_kernels.twist import EmbeddingTwistHead, MLPTwistHead, fit_twist, tokenize_prompts  # noqa: E402
from tsmc_kernels.twist.trainer import IndexedPotential  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--task", default="arithmetic-short", choices=["arithmetic-short", "digit"])
    p.add_argument("--difficulty", default="easy")
    p.add_argument("--prompts", type=int, default=8, help="training (and evaluation) prompts")
    p.add_argument("--particles", type=int, default=8, help="particles of the compared SMC runs")
    p.add_argument("--train-particles", type=int, default=16, help="particles per prompt while training")
    p.add_argument("--inner-steps", type=int, default=4, help="gradient steps per sampling round")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--beta", type=float, default=5.0, help="phi = exp(beta * reward)")
    p.add_argument("--head", default="embedding", choices=["embedding", "mlp"])
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (the embedding head is sensitive: "
                   "every token's log psi moves with g(h); ~1e-3 suits the MLP head)")
    p.add_argument("--train-seconds", type=float, default=300.0,
                   help="stop training after this much CPU time of this process (not wall time: robust to a busy machine)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--eval-runs", type=int, default=8, help="independent SMC runs per prompt for evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="save the trained head here")
    return p.parse_args(argv)


def build_task(args, tokenizer):
    if args.task == "digit":
        from tsmc_kernels.tasks import get_task
        task = get_task("arithmetic-short", difficulty=args.difficulty)
        problems = task.problems(n=args.prompts, seed=args.seed)
        texts = [task.build_prompt(tokenizer, p.question) for p in problems]

        def reward(completions, prompt_index):
            return [1.0 if c.strip()[:1].isdigit() else 0.0 for c in completions]

        reward.__name__ = "starts_with_digit"
        return texts, RewardPotential(reward, mode="exp", beta=args.beta)
    from tsmc_kernels.tasks import get_task
    task = get_task("arithmetic-short", difficulty=args.difficulty)
    problems = task.problems(n=args.prompts, seed=args.seed)
    texts = [task.build_prompt(tokenizer, p.question) for p in problems]
    return texts, task.potential([p.gold for p in problems], mode="exp", beta=args.beta)


@torch.no_grad()
def evaluate(model, head, ids, mask, potential, tokenizer, args) -> dict:
    """``eval_runs`` independent runs per prompt (identical prompts are independent SMC runs)."""
    R = args.eval_runs
    runs_pot = IndexedPotential(potential, torch.arange(ids.shape[0]).repeat_interleave(R))
    out = smc_generate(model, ids.repeat_interleave(R, 0), mask.repeat_interleave(R, 0),
                       num_particles=args.particles, max_new_tokens=args.max_new_tokens, potential=runs_pot,
                       twist=head, tokenizer=tokenizer, ess_threshold=0.5, seed=10_000 + args.seed)
    rewarded = out.log_phi > 0
    log_z = out.log_z.view(-1, R)  # [prompts, runs]
    return {
        "reward_frac": float(rewarded.float().mean()),
        "weighted_reward": float((out.weights * rewarded).sum(1).mean()),
        "mean_log_zhat": float(log_z.mean()),
        "log_mean_zhat": float((torch.logsumexp(log_z, 1) - math.log(R)).mean()),
        "per_prompt_log_zhat": log_z.mean(1).tolist(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tsmc_kernels.models import load_model
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"model loaded in {time.perf_counter() - t0:.0f} s")
    texts, potential = build_task(args, tokenizer)
    ids, mask = tokenize_prompts(tokenizer, texts)
    print(f"task {args.task}: {len(texts)} prompts of up to {ids.shape[1]} tokens, N = {args.particles} particles, "
          f"{args.max_new_tokens} new tokens, phi = exp({args.beta} r)")

    t0, c0 = time.perf_counter(), time.process_time()
    base = evaluate(model, None, ids, mask, potential, tokenizer, args)
    print(f"bootstrap evaluation: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")

    Head = EmbeddingTwistHead if args.head == "embedding" else MLPTwistHead
    head = Head.for_model(model, seed=args.seed)
    start, cpu0 = time.perf_counter(), time.process_time()

    def on_step(step, rec, head):
        cpu = time.process_time() - cpu0
        print(f"  round {step:3d}  loss {rec['loss']:.4f}  rewarded {rec['positive_frac']:.3f}  "
              f"log Zhat {rec['log_z']:.3f}  ess {rec['ess']:.2f}  ({rec['seconds']:.1f} s wall, {cpu:.0f} s CPU total)",
              flush=True)
        return cpu > args.train_seconds

    history = fit_twist(model, head, ids, potential, attention_mask=mask, loss="ctl",
                        num_particles=args.train_particles, inner_steps=args.inner_steps, steps=args.max_steps, lr=args.lr, max_new_tokens=args.max_new_tokens, tokenizer=tokenizer,
                        seed=args.seed, callback=on_step)
    print(f"trained {len(history)} rounds in {time.perf_counter() - start:.0f} s wall, "
          f"{time.process_time() - cpu0:.0f} s CPU ({head.num_trainable_parameters()} head parameters)")
    if args.save:
        head.save_pretrained(args.save)

    t0, c0 = time.perf_counter(), time.process_time()
    tw = evaluate(model, head, ids, mask, potential, tokenizer, args)
    print(f"twisted evaluation: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")

    runs = len(texts) * args.eval_runs
    print(f"\nSame prompts and seeds, N = {args.particles} particles, {runs} SMC runs each:")
    print(f"{'':28s}{'bootstrap':>12s}{'twisted':>12s}")
    for key, label in [("reward_frac", "reward-earning particles"), ("weighted_reward", "weighted reward"),
                       ("mean_log_zhat", "mean log Zhat"), ("log_mean_zhat", "log mean Zhat (per prompt)")]:
        print(f"{label:28s}{base[key]:12.4f}{tw[key]:12.4f}")
    better = tw["reward_frac"] > base["reward_frac"] and tw["mean_log_zhat"] > base["mean_log_zhat"]
    print("\nACCEPT" if better else "\nNOT ACCEPTED", "(twisted > bootstrap on both reward fraction and mean log Zhat)")
    return 0 if better else 1


if __name__ == "__main__":
    sys.exit(main())
