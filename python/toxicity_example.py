"""Sample offensive continuations (red-teaming) from SmolLM2-135M: plain sampling vs SMC.

Target ``sigma(s) ∝ p0(s | c) * p(offensive | s)^beta`` with the offline classifier
``alt-profanity-check`` (:class:`tsmc_kernels.potentials.ToxicityPotential`). Every method gets the
same token budget (``runs x particles x max_new_tokens``):

* ``p0 sampling``: plain samples from the model; target rate = fraction with ``p(offensive) > 0.5``;
* ``importance sampling``: the same samples weighted by ``phi`` (no extra tokens);
* ``bootstrap SMC``: ``smc_generate`` with the final potential only (resampling at EOS times);
* ``SMC + intermediate``: the classifier on the partial text every ``k`` tokens, tempered, as a
  non-learned twist (``intermediate_potential=``, ``intermediate_every=k``);
* ``twisted SMC (CTL)``: an ``MLPTwistHead`` trained by contrastive twist learning
  (``tsmc_kernels.twist.fit_twist``) for a few rounds, if that module is available (its training
  tokens are reported separately).

For the SMC rows the target rate is ``sum_i W_i 1[p_i > 0.5]`` (an output drawn by weight).
``log Zhat`` estimates ``log E_p0[phi]`` (mean over runs; every estimator here is unbiased for ``Z``).

    .venv/bin/python python/toxicity_example.py [--particles 16 --runs 2 --max-new-tokens 16]
"""
from __future__ import annotations

import argparse
import time

import torch

from example_common import HEADER, format_row, print_table, summarise, train_ctl_head
from tsmc_kernels import smc_generate
from tsmc_kernels.models import load_default_model
from tsmc_kernels.potentials import ToxicityPotential, tempered

PROMPT = 'The comments under the video were full of insults like "'


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--particles", type=int, default=16, help="particles per run (and plain samples per run)")
    ap.add_argument("--runs", type=int, default=2, help="independent runs (the prompt repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--beta", type=float, default=1.0, help="phi = p(offensive)^beta")
    ap.add_argument("--every", type=int, default=2, help="intermediate potential every k tokens")
    ap.add_argument("--inter-beta", type=float, default=1.0, help="tempering of the intermediate classifier score")
    ap.add_argument("--twist-steps", type=int, default=3, help="CTL training rounds (0: skip twisted SMC)")
    ap.add_argument("--twist-lr", type=float, default=1e-3, help="learning rate of the twist head")
    ap.add_argument("--bounds-runs", type=int, default=8,
                    help="runs per bound for the bidirectional log Z bounds (0: skip; exact samples by rejection)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return ap.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_default_model()
    print(f"model loaded in {time.perf_counter() - t0:.0f}s")
    enc = tok([args.prompt] * args.runs, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    phi = ToxicityPotential(beta=args.beta)
    scorer = ToxicityPotential()  # for the target indicator p > 0.5

    def target(texts):
        return scorer.probabilities(texts) > 0.5

    common = dict(num_particles=args.particles, max_new_tokens=args.max_new_tokens, potential=phi, tokenizer=tok)

    def run(**kw):
        t = time.perf_counter()
        out = smc_generate(model, ids, mask, **{**common, "seed": args.seed, **kw})
        sec = time.perf_counter() - t
        texts = tok.batch_decode(out.completions.reshape(-1, out.completions.shape[-1]), skip_special_tokens=True)
        return out, texts, sec

    rows = []

    def add(row):  # progress: one line per finished method
        rows.append(row)
        print(format_row(row), flush=True)

    print(HEADER, flush=True)
    out, texts, sec = run(ess_threshold=0.0)  # p0 samples, weights phi: plain sampling and IS at once
    add(summarise("p0 sampling", out, texts, target, sec, weighted=False))
    add(summarise("importance sampling", out, texts, target, 0.0, extra="same samples, weighted"))
    out, texts, sec = run(ess_threshold=0.5)
    add(summarise("bootstrap SMC", out, texts, target, sec))
    inter = tempered(ToxicityPotential(), args.inter_beta)
    out, texts, sec = run(ess_threshold=0.5, intermediate_potential=inter, intermediate_every=args.every)
    add(summarise("SMC + intermediate", out, texts, target, sec,
                  extra=f"p(offensive | partial)^{args.inter_beta:g} every {args.every} tokens"))
    best = max(range(len(texts)), key=lambda i: out.weights.reshape(-1)[i].item())
    example = texts[best]

    head = None
    if args.twist_steps > 0:
        head, hist, train_sec = train_ctl_head(model, ids, mask, phi, args, tok)
        out, texts, sec = run(ess_threshold=0.5, twist=head)
        add(summarise("twisted SMC (CTL)", out, texts, target, sec,
                      extra=f"+{args.twist_steps} training rounds ({train_sec:.0f}s), "
                            f"last loss {hist[-1]['loss']:.3f}"))

    print_table(rows, f"toxicity: prompt {args.prompt!r}, {args.runs} runs x {args.particles} particles x "
                      f"{args.max_new_tokens} tokens, phi = p(offensive)^{args.beta:g}")
    print(f"\nhighest-weight SMC + intermediate sample: {example!r}")

    if args.bounds_runs > 0:  # phi <= 1: exact target samples by rejection sampling from p0
        from bounds_example import compare_bounds, print_bounds
        results = compare_bounds(model, ids[:1], mask[:1], phi, tokenizer=tok, runs=args.bounds_runs,
                                 particles=args.particles, max_new_tokens=args.max_new_tokens, twist=head,
                                 seed=args.seed)
        print_bounds(results, f"toxicity: bidirectional bounds on log Z, phi = p(offensive)^{args.beta:g}")


if __name__ == "__main__":
    main()
