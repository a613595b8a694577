"""Sample negative movie reviews from SmolLM2-135M-Instruct: plain sampling vs SMC.

Target ``sigma(s) ∝ p0(s | c) * exp(beta * score(s))`` with ``score = -compound`` of the offline
VADER scorer (:class:`tsmc_kernels.potentials.SentimentPotential`, polarity ``"negative"``; the
instruct model mostly writes positive reviews). Every method gets the same token budget
(``runs x particles x max_new_tokens``):

* ``p0 sampling``: plain samples from the model; target rate = fraction with ``score > 0.5``;
* ``importance sampling``: the same samples weighted by ``phi`` (no extra tokens);
* ``bootstrap SMC``: ``smc_generate`` with the final potential only (resampling at EOS times);
* ``SMC + intermediate``: the VADER score of the partial text every ``k`` tokens, tempered, as a
  non-learned twist (``intermediate_potential=``, ``intermediate_every=k``);
* ``twisted SMC (CTL)``: an ``MLPTwistHead`` trained by contrastive twist learning
  (``tsmc_kernels.twist.fit_twist``) for a few rounds, if that module is available (its training
  tokens are reported separately).

For the SMC rows the target rate is ``sum_i W_i 1[score_i > 0.5]`` (an output drawn by weight).
``log Zhat`` estimates ``log E_p0[phi]`` (mean over runs; every estimator here is unbiased for ``Z``).

    .venv/bin/python python/sentiment_example.py [--particles 16 --runs 2 --max-new-tokens 20]
"""
from __future__ import annotations

import argparse
import time

import torch

from example_common import HEADER, format_row, print_table, summarise, train_ctl_head
from tsmc_kernels import smc_generate
from tsmc_kernels.models import load_default_model
from tsmc_kernels.potentials import SentimentPotential

REQUEST = "Write a one-sentence movie review."


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--request", default=REQUEST, help="the user message (chat template applied)")
    ap.add_argument("--polarity", default="negative", choices=["positive", "negative"])
    ap.add_argument("--particles", type=int, default=16, help="particles per run (and plain samples per run)")
    ap.add_argument("--runs", type=int, default=2, help="independent runs (the prompt repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--beta", type=float, default=4.0, help="phi = exp(beta * score)")
    ap.add_argument("--every", type=int, default=2, help="intermediate potential every k tokens")
    ap.add_argument("--inter-beta", type=float, default=2.0, help="phi_t = exp(inter_beta * score(partial text))")
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
    prompt = tok.apply_chat_template([{"role": "user", "content": args.request}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok([prompt] * args.runs, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids, enc.attention_mask
    phi = SentimentPotential(args.polarity, beta=args.beta)

    def target(texts):
        return phi.scores(texts) > 0.5

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
    inter = SentimentPotential(args.polarity, beta=args.inter_beta, scorer=phi.scorer)
    out, texts, sec = run(ess_threshold=0.5, intermediate_potential=inter, intermediate_every=args.every)
    add(summarise("SMC + intermediate", out, texts, target, sec,
                  extra=f"exp({args.inter_beta:g} * score(partial)) every {args.every} tokens"))
    best = max(range(len(texts)), key=lambda i: out.weights.reshape(-1)[i].item())
    example = texts[best]

    head = None
    if args.twist_steps > 0:
        head, hist, train_sec = train_ctl_head(model, ids, mask, phi, args, tok)
        out, texts, sec = run(ess_threshold=0.5, twist=head)
        add(summarise("twisted SMC (CTL)", out, texts, target, sec,
                      extra=f"+{args.twist_steps} training rounds ({train_sec:.0f}s), "
                            f"last loss {hist[-1]['loss']:.3f}"))

    print_table(rows, f"sentiment ({args.polarity}): request {args.request!r}, {args.runs} runs x "
                      f"{args.particles} particles x {args.max_new_tokens} tokens, phi = exp({args.beta:g} * score)")
    print(f"\nhighest-weight SMC + intermediate sample: {example!r}")

    if args.bounds_runs > 0:  # phi <= 1: exact target samples by rejection sampling from p0
        from bounds_example import compare_bounds, print_bounds
        bounded = phi * (lambda c: torch.full((c.shape[0],), -args.beta))  # phi e^-beta <= 1, same target
        results = compare_bounds(model, ids[:1], mask[:1], bounded, tokenizer=tok, runs=args.bounds_runs,
                                 particles=args.particles, max_new_tokens=args.max_new_tokens, twist=head,
                                 seed=args.seed)
        print_bounds(results, f"sentiment: bidirectional bounds on log Z' = log Z - {args.beta:g} "
                              f"(phi' = phi e^-{args.beta:g} <= 1, the same target)")


if __name__ == "__main__":
    main()
