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

import torch

from example_common import compare_samplers, example_parser, load_model, print_table
from tsmc_kernels.potentials import SentimentPotential

REQUEST = "Write a one-sentence movie review."


def parse_args():
    ap = example_parser(__doc__, max_new_tokens=20, every=2, inter_beta=2.0,
                        inter_help="phi_t = exp(inter_beta * score(partial text))")
    ap.add_argument("--request", default=REQUEST, help="the user message (chat template applied)")
    ap.add_argument("--polarity", default="negative", choices=["positive", "negative"])
    ap.add_argument("--beta", type=float, default=4.0, help="phi = exp(beta * score)")
    return ap.parse_args()


def main():
    args = parse_args()
    model, tok = load_model(args)
    prompt = tok.apply_chat_template([{"role": "user", "content": args.request}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok([prompt] * args.runs, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids, enc.attention_mask
    phi = SentimentPotential(args.polarity, beta=args.beta)

    def target(out, texts):
        return (phi.scores(texts) > 0.5).view(out.log_weights.shape)

    label = "target rate"
    rows, (out, texts), head = compare_samplers(
        model, tok, ids, mask, phi, args, values=target, label=label,
        inter=SentimentPotential(args.polarity, beta=args.inter_beta, scorer=phi.scorer),
        inter_desc=f"exp({args.inter_beta:g} * score(partial))")
    example = texts[int(out.weights.reshape(-1).argmax())]
    print_table(rows, f"sentiment ({args.polarity}): request {args.request!r}, {args.runs} runs x "
                      f"{args.particles} particles x {args.max_new_tokens} tokens, phi = exp({args.beta:g} * score)",
                label)
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
