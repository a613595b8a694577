"""Power-MH throughput (issue 7): :func:`tsmc_kernels.power.power_sample` vs regenerating every proposal.

The reference (what the public power-sampling code does): one chain per problem, and every MH
proposal is a fresh ``model.generate(prompt + x[:c], do_sample=True, temperature=1/alpha,
output_logits=True)`` (the prompt and the kept prefix are prefilled again for every proposal;
``log p0``, ``log q`` and the entropies are recomputed from the returned logits). Both sides run
the same algorithm: block-wise annealing, ``n_mcmc`` moves per block, the same cut rule and the
exact full-suffix acceptance ratio.

Model (``--model``): Qwen2.5-1.5B-shaped by default (hidden 1536, 28 layers, 12 heads, 2 KV heads,
vocab 151936), bf16 on CUDA, random init, EOS disabled (every completion runs to the length limit,
the worst case for both methods). Reported per configuration: wall time per problem, tokens
decoded (proposals included) and tokens/s.

    python bench/test_bench_power.py                             # paper sizes: 16 blocks x 192, 10 MH steps
    python bench/test_bench_power.py --blocks 4 --block-size 32 --n-mcmc 2 --chains 1 8 --problems 2 --cuda-graph
    python bench/test_bench_power.py --device cpu --model tiny --threads 1   # smoke test of the script on CPU
    pytest bench/test_bench_power.py                              # a small configuration; skips without CUDA

The paper sizes take hours for the ``generate`` reference (~100 ms per token on the lent H100);
``--reference-blocks K`` runs the reference on the first K blocks only and reports its tokens/s
and the per-problem time extrapolated from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


SHAPES = {
    # the target: Qwen2.5-1.5B
    "qwen2.5-1.5b": ("Qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936)),
    # the embedded model's shape (SmolLM2-135M): a CPU-sized comparison
    "smollm2-135m": ("Llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "tiny": ("Qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)),
}


def random_model(shape: str, device, dtype=torch.bfloat16):
    """A randomly initialised causal LM of one of :data:`SHAPES`, in eval mode, that never stops at EOS."""
    import transformers

    arch, kw = SHAPES[shape]
    cfg = getattr(transformers, f"{arch}Config")(max_position_embeddings=32768, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, f"{arch}ForCausalLM")(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None  # run every sequence to the length limit
    model.generation_config.pad_token_id = 0
    return model


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the generate() reference

@torch.no_grad()
def _propose_generate(model, prefix: torch.Tensor, n_new: int, alpha: float):
    """``model.generate`` from ``prefix`` ``[1, L]``: new tokens and their log p0, log q, entropy (lists)."""
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True, temperature=1.0 / alpha,
                         top_k=0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, prefix.shape[1]:]
    logits = torch.stack(out.logits, 0)[:, 0].float()  # [n, V], before temperature
    logp0 = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(logits * alpha, -1)
    ent = -(logp0.exp() * logp0).sum(-1)
    idx = new[:, None]
    return new.tolist(), logp0.gather(1, idx)[:, 0].tolist(), logq.gather(1, idx)[:, 0].tolist(), ent.tolist()


def _cut_probs(ent, cut, power):
    if cut == "uniform":
        return [1.0 / len(ent)] * len(ent)
    prev = [0.0] + ent[:-1]
    w = [max(h - p, 0.0) ** power for h, p in zip(ent, prev)]
    s = sum(w)
    return [x / s for x in w] if s > 0 else [1.0 / len(ent)] * len(ent)


@torch.no_grad()
def generate_reference(model, prompt: torch.Tensor, *, alpha: float, cut: str, cut_power: float, blocks: int,
                       block_size: int, n_mcmc: int, seed: int):
    """One chain for one problem (``prompt`` ``[1, P]``); every proposal is a fresh ``model.generate``."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    x, lp, lq, en = [], [], [], []
    decoded = accepted = 0
    for k in range(1, blocks + 1):
        limit = k * block_size
        pre = torch.cat([prompt, torch.tensor([x], dtype=torch.long, device=prompt.device).view(1, -1)], 1)
        t, a, b, e = _propose_generate(model, pre, limit - len(x), alpha)
        x, lp, lq, en = x + t, lp + a, lq + b, en + e
        decoded += len(t)
        for _ in range(n_mcmc):
            probs = _cut_probs(en, cut, cut_power)
            c = rnd.choices(range(len(x)), weights=probs)[0]
            pre = torch.cat([prompt, torch.tensor([x[:c]], dtype=torch.long, device=prompt.device).view(1, -1)], 1)
            t, a, b, e = _propose_generate(model, pre, limit - c, alpha)
            decoded += len(t)
            nx, nlp, nlq, nen = x[:c] + t, lp[:c] + a, lq[:c] + b, en[:c] + e
            pn = _cut_probs(nen, cut, cut_power)
            log_a = (alpha * (sum(a) - sum(lp[c:])) + sum(lq[c:]) - sum(b)
                     + math.log(pn[c] or 1e-300) - math.log(probs[c]))
            if math.log(rnd.random() or 1e-300) < log_a:
                x, lp, lq, en = nx, nlp, nlq, nen
                accepted += 1
    return x, decoded, accepted


# ----------------------------------------------------------------------------- runs

def run_power(model, prompts, *, chains, cuda_graph=False, **kw):
    from tsmc_kernels.power import power_sample

    device = prompts.device
    _sync(device)
    t = time.perf_counter()
    # eos_token_id=[]: no EOS, like the reference's generate() (a Llama config still names one).
    out = power_sample(model, prompts, num_chains=chains, cuda_graph=cuda_graph, eos_token_id=[], **kw)
    _sync(device)
    wall = time.perf_counter() - t
    B = prompts.shape[0]
    return {"method": "power_sample_graph" if cuda_graph else "power_sample", "problems": B, "chains": chains,
            "wall_s": round(wall, 3),
            "wall_s_per_problem": round(wall / B, 3), "tokens_decoded": out.tokens_decoded,
            "tokens_per_s": round(out.tokens_decoded / wall, 1), "forward_passes": out.forward_passes,
            "ms_per_forward": round(1e3 * wall / max(out.forward_passes, 1), 2),
            "acceptance": round(float(out.acceptance.nanmean()), 3) if kw["n_mcmc"] else None}


def run_reference(model, prompts, *, blocks, reference_blocks, **kw):
    device = prompts.device
    total_t, total_tok = 0.0, 0
    nb = min(blocks, reference_blocks or blocks)
    for i in range(prompts.shape[0]):
        _sync(device)
        t = time.perf_counter()
        _, decoded, _ = generate_reference(model, prompts[i:i + 1], blocks=nb, seed=i, **kw)
        _sync(device)
        total_t += time.perf_counter() - t
        total_tok += decoded
    B = prompts.shape[0]
    res = {"method": "generate_reference", "problems": B, "chains": 1, "blocks_run": nb,
           "wall_s": round(total_t, 3), "wall_s_per_problem": round(total_t / B, 3), "tokens_decoded": total_tok,
           "tokens_per_s": round(total_tok / total_t, 1)}
    if nb < blocks:
        # Tokens for the full schedule (uniform cut, no EOS): growth + n_mcmc * mean suffix per block.
        bs, n = kw["block_size"], kw["n_mcmc"]
        full = sum(bs + n * (k * bs + 1) / 2 for k in range(1, blocks + 1))
        res["extrapolated_wall_s_per_problem"] = round(full / res["tokens_per_s"], 1)
    return res


def _report(r: dict, results: list) -> None:
    """Keep a result, print it, and append it to ``$BENCH_JSONL`` at once (a run cut short keeps it)."""
    results.append(r)
    print(json.dumps(r), flush=True)
    if os.environ.get("BENCH_JSONL"):
        with open(os.environ["BENCH_JSONL"], "a") as f:
            f.write(json.dumps({"name": f"power-{r['method']}-{r['chains']}", "tag": "power", **r}) + "\n")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    model = random_model(args.model, device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V - 1, (args.problems, args.prompt_len), generator=g).to(device)
    kw = dict(alpha=args.alpha, cut=args.cut, cut_power=args.cut_power, n_mcmc=args.n_mcmc, block_size=args.block_size)
    results = []
    # warm-up (kernels, allocator)
    run_power(model, prompts[:1], chains=1, max_new_tokens=min(8, args.block_size), seed=0,
              **{**kw, "n_mcmc": 1, "block_size": min(8, args.block_size)})
    for graph in (False, True) if args.cuda_graph else (False,):
        for chains in args.chains:
            _report(run_power(model, prompts, chains=chains, cuda_graph=graph,
                              max_new_tokens=args.blocks * args.block_size, seed=0, **kw), results)
    if not args.skip_reference:
        r = run_reference(model, prompts, blocks=args.blocks, reference_blocks=args.reference_blocks, **kw)
        _report(r, results)
        base = r["tokens_per_s"]
        for x in results[:-1]:
            x["speedup_tokens_per_s_vs_generate"] = round(x["tokens_per_s"] / base, 2)
    return results


def _parser():
    ap = argparse.ArgumentParser(description="power_sample vs model.generate proposals")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=list(SHAPES), default="qwen2.5-1.5b", help="random-init model shape")
    ap.add_argument("--problems", type=int, default=1)
    ap.add_argument("--chains", type=int, nargs="+", default=[1, 16], help="chains per problem (one run each)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=192)
    ap.add_argument("--n-mcmc", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--cut", choices=["entropy", "uniform"], default="uniform")
    ap.add_argument("--cut-power", type=float, default=4.0)
    ap.add_argument("--reference-blocks", type=int, default=0, help="run the generate() reference on K blocks only")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true", help="also run power_sample(cuda_graph=True) (CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", help="also write the results to this file")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("bench_power: CUDA is not available; skipping (use --device cpu --model tiny for a smoke test)")
        return []
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else "cpu",
                "torch": torch.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return results


# ----------------------------------------------------------------------------- pytest entry (small sizes)

def test_power_vs_generate():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    res = main(["--blocks", "2", "--block-size", "32", "--n-mcmc", "2", "--chains", "1", "8", "--prompt-len", "128",
                "--cuda-graph"])
    assert res and all(r["tokens_decoded"] > 0 for r in res)


if __name__ == "__main__":
    main()
