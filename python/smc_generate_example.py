"""The drop-in swap: ``model.generate(...)`` -> ``smc_generate(model, ...)``, on the embedded model (CPU).

    python python/smc_generate_example.py [--particles 8] [--max-new-tokens 24] [--threads N]

Two chat prompts, tokenised with right padding (a tokenizer's usual default; ``smc_generate``
left-aligns prompts itself), answered twice with the same budget: ``model.generate`` samples
``N`` completions per prompt from ``p0``; ``smc_generate`` targets ``sigma ∝ p0 * phi`` with the
indicator potential ``phi = 1[the answer contains a digit]`` and returns ``N`` weighted particles.
It prints, per prompt, the fraction of completions that satisfy ``phi`` (SMC: by weight), the SMC
estimate of ``log Z = log P_p0(phi)`` and the highest-weight answer. About a minute on a laptop CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from example_common import add_run_options, load_model
from tsmc_kernels import smc_generate
from tsmc_kernels.potentials import indicator

QUESTIONS = ["How many legs does a spider have?", "Name a year in which something important happened."]


def has_digit(texts, prompt_index):
    """The reward: 1 if the text contains a digit."""
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    add_run_options(ap)
    args = ap.parse_args(argv)
    model, tok = load_model(args)
    tok.padding_side = "right"  # on purpose: smc_generate handles either side
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    enc = tok(texts, return_tensors="pt", padding=True)
    N, T = args.particles, args.max_new_tokens
    phi = indicator(has_digit, name="has a digit")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    left = tok(texts, return_tensors="pt", padding=True, padding_side="left")  # generate() needs left padding
    plain = model.generate(**left, do_sample=True, max_new_tokens=T, num_return_sequences=N,
                           pad_token_id=tok.pad_token_id)
    t_plain = time.perf_counter() - t0
    plain_texts = tok.batch_decode(plain[:, left.input_ids.shape[1]:], skip_special_tokens=True)

    t0 = time.perf_counter()
    out = smc_generate(model, enc.input_ids, enc.attention_mask, num_particles=N, max_new_tokens=T, potential=phi,
                       tokenizer=tok, seed=args.seed, progress=True)
    t_smc = time.perf_counter() - t0

    print(f"\nmodel.generate: {t_plain:.1f} s; smc_generate: {t_smc:.1f} s ({out.tokens_decoded} tokens decoded)")
    for b, q in enumerate(QUESTIONS):
        plain_rate = sum(has_digit(plain_texts[b * N:(b + 1) * N], None)) / N
        smc_texts = tok.batch_decode(out.completions[b], skip_special_tokens=True)
        smc_rate = float((out.weights[b] * torch.tensor(has_digit(smc_texts, None))).sum())
        best = tok.decode(out.completions[b, out.best_index()[b]], skip_special_tokens=True)
        print(f"\n{q}\n  phi satisfied: generate {plain_rate:.2f}, smc (by weight) {smc_rate:.2f}; "
              f"log Zhat = {float(out.log_z[b]):.3f}\n  best SMC answer: {best.strip()!r}")


if __name__ == "__main__":
    main()
