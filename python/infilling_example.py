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

from example_common import compare_samplers, example_parser, load_model, print_table
from tsmc_kernels.potentials import InfillPotential, tempered

PREFIX = "Once upon a time, a little dog named Max lost his red ball in the park."
SUFFIX = " Max was so happy to have his ball back."


def parse_args():
    ap = example_parser(__doc__, max_new_tokens=12, every=3, inter_beta=0.5,
                        inter_help="tempering of the intermediate likelihood", bounds=False)
    ap.add_argument("--prefix", default=PREFIX)
    ap.add_argument("--suffix", default=SUFFIX)
    return ap.parse_args()


def main():
    args = parse_args()
    model, tok = load_model(args)
    enc = tok([args.prefix] * args.runs, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    no_eos = []  # a middle of exactly T tokens
    phi = InfillPotential(model, ids, args.suffix, attention_mask=mask, tokenizer=tok, eos_token_id=no_eos)
    label = "log p(o|c,s)"
    rows, (out, _), _ = compare_samplers(
        model, tok, ids, mask, phi, args, values=lambda out, texts: out.log_phi, label=label,
        inter=tempered(phi, args.inter_beta), inter_desc=f"p0(o | c, s_1:t)^{args.inter_beta:g}",
        smc_kwargs={"eos_token_id": no_eos})
    example = tok.decode(out.best()[0, ids.shape[1]:], skip_special_tokens=True)
    print_table(rows, f"infilling: {args.runs} runs x {args.particles} particles x {args.max_new_tokens} tokens; "
                      f"c = {args.prefix!r}, o = {args.suffix!r}", label)
    print(f"\nhighest-weight SMC + intermediate middle: {args.prefix}[{example}]{args.suffix}")


if __name__ == "__main__":
    main()
