"""Power sampling (``p0^alpha``, SPEC §5) with the embedded SmolLM2-135M-Instruct, on CPU.

    python python/power_sampling_example.py [--blocks 2] [--block-size 16] [--n-mcmc 2] [--chains 2] [--threads N]

A short run: the completion grows ``block-size`` tokens per block, and after every block each
chain makes ``n-mcmc`` Metropolis-Hastings moves (cut at an entropy jump, resample the suffix from
the model at temperature 1/alpha, accept with the exact full-suffix ratio). It prints the
completions, the per-block acceptance rates and how many tokens were decoded, next to plain
sampling at temperature 1/alpha (``n_mcmc=0``). Loading the model takes ~25 s; the run itself
a minute or two on a laptop CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from example_common import add_run_options, load_model
from tsmc_kernels.power import power_sample


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", default="What is 17 * 23? Think step by step, then give the answer.")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--cut", choices=["entropy", "uniform"], default="entropy")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--n-mcmc", type=int, default=2)
    ap.add_argument("--chains", type=int, default=2)
    add_run_options(ap)
    args = ap.parse_args(argv)
    model, tok = load_model(args)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")

    kw = dict(alpha=args.alpha, cut=args.cut, num_chains=args.chains, max_new_tokens=args.blocks * args.block_size,
              block_size=args.block_size, seed=args.seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    plain = power_sample(model, enc.input_ids, enc.attention_mask, n_mcmc=0, **kw)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = power_sample(model, enc.input_ids, enc.attention_mask, n_mcmc=args.n_mcmc, progress=True, **kw)
    t_mh = time.perf_counter() - t0

    print(f"\nprompt: {args.prompt!r}   alpha={args.alpha}, cut={args.cut}, {args.blocks} blocks x "
          f"{args.block_size} tokens, {args.n_mcmc} MH moves per block, {args.chains} chains")
    for c in range(args.chains):
        n = int(out.lengths[0, c])
        print(f"\n--- chain {c}: log p0 = {float(out.log_p0[0, c]):.2f} ({n} tokens), acceptance per block "
              f"{[round(a, 2) for a in out.acceptance[0, c].tolist()]}")
        print(tok.decode(out.completions[0, c, :n], skip_special_tokens=True))
    print(f"\n--- plain temperature-1/alpha sampling (n_mcmc=0), chain 0: log p0 = {float(plain.log_p0[0, 0]):.2f}")
    print(tok.decode(plain.completions[0, 0, :int(plain.lengths[0, 0])], skip_special_tokens=True))
    rate = out.acceptance.mean((0, 1))
    print(f"\nacceptance rate per block (all chains): {[round(a, 3) for a in rate.tolist()]}")
    print(f"mean log p0: power-MH {float(out.log_p0.mean()):.2f} vs plain {float(plain.log_p0.mean()):.2f}")
    print(f"tokens decoded: {out.tokens_decoded} (proposals included; plain sampling: {plain.tokens_decoded}), "
          f"{out.forward_passes} forward passes, {t_mh:.1f} s ({out.tokens_decoded / t_mh:.1f} tokens/s; "
          f"plain {t_plain:.1f} s)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
