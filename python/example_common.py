"""Shared pieces of the task examples (toxicity, sentiment, infilling): the comparison table and
the CTL-trained twist head. Not part of the package; imported by the scripts next to it."""
from __future__ import annotations

import math
import time

import torch

HEADER = f"{'method':<22} {'tokens':>7} {'target rate':>12} {'log Zhat':>9} {'resamples':>9} {'sec':>6}  notes"


def summarise(name, out, texts, target, seconds, weighted=True, extra=""):
    """One table row of an :class:`~tsmc_kernels.SMCOutput`: tokens, target rate (weighted by the
    particle weights unless ``weighted=False``), mean finite log Zhat, resampling steps per run, seconds.

    ``target(texts) -> bool [B * N]`` says which decoded completions are target outputs.
    """
    B, N = out.log_weights.shape
    hit = target(texts).view(B, N).double()
    rate = ((out.weights.double() * hit).sum(1) if weighted else hit.mean(1)).mean().item()
    lz = out.log_z[torch.isfinite(out.log_z)]
    log_z = lz.mean().item() if lz.numel() else -math.inf
    resamples = out.resampled.sum(1).double().mean().item()
    return dict(method=name, tokens=out.tokens_decoded, rate=rate, log_z=log_z, resamples=resamples, seconds=seconds,
                extra=extra)


def format_row(r) -> str:
    return (f"{r['method']:<22} {r['tokens']:>7d} {r['rate']:>12.3f} {r['log_z']:>9.3f} {r['resamples']:>9.1f} "
            f"{r['seconds']:>6.1f}  {r['extra']}")


def print_table(rows, title, header=HEADER, fmt=format_row):
    print(f"\n{title}\n{header}")
    for r in rows:
        print(fmt(r))


def train_ctl_head(model, ids, mask, phi, args, tokenizer, smc_kwargs=None):
    """An ``MLPTwistHead`` trained by CTL for ``args.twist_steps`` rounds on two replicas of the prompt
    (so the cost does not grow with ``args.runs``). Returns ``(head in eval mode, history, seconds)``."""
    from tsmc_kernels.twist import MLPTwistHead, fit_twist

    t = time.perf_counter()
    head = MLPTwistHead.for_model(model)
    k = min(2, ids.shape[0])
    hist = fit_twist(model, head, ids[:k], phi, attention_mask=mask[:k], loss="ctl", steps=args.twist_steps,
                     lr=args.twist_lr, num_particles=args.particles, max_new_tokens=args.max_new_tokens,
                     tokenizer=tokenizer, smc_kwargs=smc_kwargs, seed=args.seed + 1)
    return head.eval(), hist, time.perf_counter() - t
