"""Shared pieces of the task examples (toxicity, sentiment, infilling, bounds, power): the command
line, model loading, the equal-budget sampler comparison and its table, and the CTL-trained twist
head. Not part of the package; imported by the scripts next to it."""
from __future__ import annotations

import argparse
import math
import time

import torch


def example_parser(doc: str, *, max_new_tokens: int, every: int, inter_beta: float, inter_help: str,
                   bounds: bool = True) -> argparse.ArgumentParser:
    """The options every sampler comparison takes; a script adds its prompt and potential options."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--particles", type=int, default=16, help="particles per run (and plain samples per run)")
    ap.add_argument("--runs", type=int, default=2, help="independent runs (the prompt repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--every", type=int, default=every, help="intermediate potential every k tokens")
    ap.add_argument("--inter-beta", type=float, default=inter_beta, help=inter_help)
    ap.add_argument("--twist-steps", type=int, default=3, help="CTL training rounds (0: skip twisted SMC)")
    ap.add_argument("--twist-lr", type=float, default=1e-3, help="learning rate of the twist head")
    if bounds:
        ap.add_argument("--bounds-runs", type=_zero_or_at_least_two, default=8,
                        help="runs per bound for the bidirectional log Z bounds (0: skip; exact samples by rejection)")
    add_run_options(ap)
    return ap


def _zero_or_at_least_two(text: str) -> int:
    """``--bounds-runs``: checked while parsing, not after minutes of sampling (a bound's standard error needs 2 runs)."""
    value = int(text)
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no bounds) or >= 2 (standard errors need two runs), got {value}")
    return value


def add_run_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="a local HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def load_model(args):
    """Apply ``--threads`` and load ``--model`` (default: the embedded SmolLM2-135M-Instruct) on CPU;
    returns ``(model, tokenizer)``."""
    from tsmc_kernels.models import load_model as load

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load(args.model)
    print(f"model loaded in {time.perf_counter() - t0:.0f}s")
    return model, tok


def summarise(name, out, values, seconds, weighted=True, extra=""):
    """One table row of an :class:`~tsmc_kernels.SMCOutput`: tokens, the mean of ``values`` (float
    ``[B, N]``, one per particle; weighted by the particle weights unless ``weighted=False``), mean
    finite log Zhat, resampling steps per run, seconds."""
    v = values.double()
    score = ((out.weights.double() * v).sum(1) if weighted else v.mean(1)).mean().item()
    lz = out.log_z[torch.isfinite(out.log_z)]
    log_z = lz.mean().item() if lz.numel() else -math.inf
    resamples = out.resampled.sum(1).double().mean().item()
    return dict(method=name, tokens=out.tokens_decoded, score=score, log_z=log_z, resamples=resamples,
                seconds=seconds, extra=extra)


def header(label: str) -> str:
    return f"{'method':<22} {'tokens':>7} {label:>{len(label) + 1}} {'log Zhat':>9} {'resamples':>9} {'sec':>6}  notes"


def format_row(r, label: str) -> str:
    return (f"{r['method']:<22} {r['tokens']:>7d} {r['score']:>{len(label) + 1}.3f} {r['log_z']:>9.3f} "
            f"{r['resamples']:>9.1f} {r['seconds']:>6.1f}  {r['extra']}")


def print_table(rows, title, label: str):
    print(f"\n{title}\n{header(label)}")
    for r in rows:
        print(format_row(r, label))


def compare_samplers(model, tok, ids, mask, phi, args, *, values, label, inter, inter_desc, smc_kwargs=None):
    """p0 sampling, importance sampling, bootstrap SMC, SMC with an intermediate potential and (when
    ``args.twist_steps``) twisted SMC with a CTL-trained head, all at the same token budget.

    ``values(out, texts) -> float [B, N]`` scores every particle (the table shows its weighted mean
    under ``label``); ``inter`` is the intermediate potential, ``inter_desc`` its table note;
    ``smc_kwargs`` go to every ``smc_generate`` call and to the twist training. Rows are printed
    as they finish. Returns ``(rows, (out, texts) of the intermediate-potential run, head or None)``.
    """
    from tsmc_kernels import smc_generate

    common = dict(num_particles=args.particles, max_new_tokens=args.max_new_tokens, potential=phi, tokenizer=tok,
                  seed=args.seed, **(smc_kwargs or {}))

    def run(**kw):
        t = time.perf_counter()
        out = smc_generate(model, ids, mask, **common, **kw)
        sec = time.perf_counter() - t
        texts = tok.batch_decode(out.completions.reshape(-1, out.completions.shape[-1]), skip_special_tokens=True)
        return out, values(out, texts), sec, texts

    rows = []

    def add(row):  # progress: one line per finished method
        rows.append(row)
        print(format_row(row, label), flush=True)

    print(header(label), flush=True)
    out, v, sec, _ = run(ess_threshold=0.0)  # p0 samples, weights phi: plain sampling and IS at once
    add(summarise("p0 sampling", out, v, sec, weighted=False))
    add(summarise("importance sampling", out, v, 0.0, extra="same samples, weighted"))
    out, v, sec, _ = run(ess_threshold=0.5)
    add(summarise("bootstrap SMC", out, v, sec))
    out, v, sec, texts = run(ess_threshold=0.5, intermediate_potential=inter, intermediate_every=args.every)
    add(summarise("SMC + intermediate", out, v, sec, extra=f"{inter_desc} every {args.every} tokens"))
    intermediate = (out, texts)
    head = None
    if args.twist_steps > 0:
        head, hist, train_sec = train_ctl_head(model, ids, mask, phi, args, tok, smc_kwargs=smc_kwargs)
        out, v, sec, _ = run(ess_threshold=0.5, twist=head)
        add(summarise("twisted SMC (CTL)", out, v, sec,
                      extra=f"+{args.twist_steps} training rounds ({train_sec:.0f}s), last loss {hist[-1]['loss']:.3f}"))
    return rows, intermediate, head


def train_ctl_head(model, ids, mask, phi, args, tokenizer, smc_kwargs=None):
    """An ``MLPTwistHead`` trained by CTL for ``args.twist_steps`` rounds on two replicas of the prompt
    (so the cost does not grow with ``args.runs``). Returns ``(head in eval mode, history, seconds)``."""
    from tsmc_kernels.twist import MLPTwistHead, fit_twist

    t = time.perf_counter()
    head = MLPTwistHead.for_model(model, seed=args.seed)  # seeded: the same head (and table) on every run
    k = min(2, ids.shape[0])
    hist = fit_twist(model, head, ids[:k], phi, attention_mask=mask[:k], loss="ctl", steps=args.twist_steps,
                     lr=args.twist_lr, num_particles=args.particles, max_new_tokens=args.max_new_tokens,
                     tokenizer=tokenizer, smc_kwargs=smc_kwargs, seed=args.seed + 1)
    return head.eval(), hist, time.perf_counter() - t
