"""Infilling with SmolLM2-135M: sample the middle ``s`` of a story given its start ``c`` and its end ``o``.

Target ``sigma(s) ∝ p0(s | c) * p0(o | c, s)`` over middles of exactly ``T`` tokens (EOS disabled),
with :class:`tsmc_kernels.potentials.InfillPotential` (one batched forward pass over the finished
particles' ``c + s + o``). ``Z = p0(o | c)`` marginalised over ``T``-token middles, so ``log Zhat``
is an estimate of the log-likelihood of the ending (higher is better for a lower bound). Methods at
an equal token budget (``runs x particles x T``):

* ``p0 sampling``: plain samples; score = mean ``log p0(o | c, s)``;
* ``importance sampling``: the same samples weighted by ``phi``; ``bootstrap SMC`` equals it here
  (every particle ends at step ``T``, so no weight appears before then);
* ``SMC + intermediate``: ``p0(o | c, s_1:t)^beta`` (the ending's likelihood right after the partial
  middle) every ``k`` tokens as a non-learned twist (extra forward passes, not extra decoded tokens);
* ``twisted SMC (CTL)``: an ``MLPTwistHead`` trained by contrastive twist learning for a few rounds,
  if ``tsmc_kernels.twist`` is available.

For the SMC rows the score is the weighted mean ``sum_i W_i log p0(o | c, s_i)``.

    .venv/bin/python python/infilling_example.py [--particles 16 --runs 2 --max-new-tokens 12]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from example_common import train_ctl_head
from tsmc_kernels import smc_generate
from tsmc_kernels.models import load_default_model
from tsmc_kernels.potentials import InfillPotential, tempered

PREFIX = "Once upon a time, a little dog named Max lost his red ball in the park."
SUFFIX = " Max was so happy to have his ball back."


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default=PREFIX)
    ap.add_argument("--suffix", default=SUFFIX)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2, help="independent runs (the prompt repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=12, help="length of the infilled middle")
    ap.add_argument("--every", type=int, default=3, help="intermediate potential every k tokens")
    ap.add_argument("--inter-beta", type=float, default=0.5, help="tempering of the intermediate likelihood")
    ap.add_argument("--twist-steps", type=int, default=3, help="CTL training rounds (0: skip twisted SMC)")
    ap.add_argument("--twist-lr", type=float, default=1e-3, help="learning rate of the twist head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    return ap.parse_args()


def summarise(name, out, seconds, weighted=True, extra=""):
    lp = out.log_phi.double()
    score = (out.weights.double() * lp).sum(1).mean().item() if weighted else lp.mean().item()
    lz = out.log_z[torch.isfinite(out.log_z)]
    resamples = out.resampled.sum(1).double().mean().item()  # resampling steps per run
    return dict(method=name, tokens=out.tokens_decoded, score=score,
                log_z=lz.mean().item() if lz.numel() else -math.inf, resamples=resamples, seconds=seconds, extra=extra)


HEADER = f"{'method':<22} {'tokens':>7} {'log p(o|c,s)':>13} {'log Zhat':>9} {'resamples':>9} {'sec':>6}  notes"


def format_row(r) -> str:
    return (f"{r['method']:<22} {r['tokens']:>7d} {r['score']:>13.3f} {r['log_z']:>9.3f} {r['resamples']:>9.1f} "
            f"{r['seconds']:>6.1f}  {r['extra']}")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_default_model()
    print(f"model loaded in {time.perf_counter() - t0:.0f}s")
    enc = tok([args.prefix] * args.runs, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    no_eos = []  # a middle of exactly T tokens
    phi = InfillPotential(model, ids, args.suffix, attention_mask=mask, tokenizer=tok, eos_token_id=no_eos)
    common = dict(num_particles=args.particles, max_new_tokens=args.max_new_tokens, potential=phi,
                  eos_token_id=no_eos, seed=args.seed)

    def run(**kw):
        t = time.perf_counter()
        out = smc_generate(model, ids, mask, **{**common, **kw})
        return out, time.perf_counter() - t

    rows = []

    def add(row):  # progress: one line per finished method
        rows.append(row)
        print(format_row(row), flush=True)

    print(HEADER, flush=True)
    out, sec = run(ess_threshold=0.0)
    add(summarise("p0 sampling", out, sec, weighted=False))
    add(summarise("importance sampling", out, 0.0, extra="same samples, weighted"))
    out, sec = run(ess_threshold=0.5)
    add(summarise("bootstrap SMC", out, sec))
    inter = tempered(phi, args.inter_beta)
    out, sec = run(ess_threshold=0.5, intermediate_potential=inter, intermediate_every=args.every)
    add(summarise("SMC + intermediate", out, sec,
                  extra=f"p0(o | c, s_1:t)^{args.inter_beta:g} every {args.every} tokens"))
    best = out.best()[0, ids.shape[1]:]
    example = tok.decode(best, skip_special_tokens=True)

    if args.twist_steps > 0:
        head, hist, train_sec = train_ctl_head(model, ids, mask, phi, args, tok, smc_kwargs={"eos_token_id": no_eos})
        out, sec = run(ess_threshold=0.5, twist=head)
        add(summarise("twisted SMC (CTL)", out, sec,
                      extra=f"+{args.twist_steps} training rounds ({train_sec:.0f}s), "
                            f"last loss {hist[-1]['loss']:.3f}"))

    print(f"\ninfilling: {args.runs} runs x {args.particles} particles x {args.max_new_tokens} tokens; "
          f"c = {args.prefix!r}, o = {args.suffix!r}")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    print(f"\nhighest-weight SMC + intermediate middle: {args.prefix}[{example}]{args.suffix}")


if __name__ == "__main__":
    main()
