"""Command line: ``python -m tsmc_kernels <command>`` (also installed as ``tsmc``).

Commands: ``run``, ``eval``, ``train-twist``, ``bounds``, ``bench``, ``demo``. Every command takes
``--model`` (a local HF directory or ``.gguf`` file; default: the embedded SmolLM2-135M-Instruct),
``--device``, ``--dtype`` and ``--seed``. Errors in the input (missing model or data file, a file
that is not JSONL, an unknown task) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """An input error reported as one line and exit status 2."""


@contextlib.contextmanager
def _input_errors():
    """The library's argument checks (``ValueError``: a bad particle count, temperature, ...) as :class:`CLIError`."""
    try:
        yield
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"--device {device}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is available (use --device cpu)")


def _check_output_file(path: str | None, flag: str) -> None:
    """Fail before any work when ``path`` cannot be written (its folder is missing)."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise CLIError(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (the commands' defaults differ), except None / False / empty ones."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=int, default=0, help="all randomness follows from it")


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arithmetic-short", help="gsm8k | arithmetic | arithmetic-short")
    p.add_argument("--data", default=None, help="GSM8K jsonl file (task gsm8k)")
    p.add_argument("--difficulty", default="easy", help="arithmetic tasks: easy | medium | hard")
    p.add_argument("-n", "--num-problems", type=int, default=8, help="problems of --task (seeded)")
    p.add_argument("--format-only", action="store_true", help="GSM8K: potential from the format rewards only")


def _check_at_least(args, **bounds) -> None:
    """``--flag`` values below their bound, before the model loads (``bounds``: attribute -> minimum)."""
    for name, low in bounds.items():
        value = getattr(args, name)
        if value < low:
            flag = "-n/--num-problems" if name == "num_problems" else f"--{name.replace('_', '-')}"
            raise CLIError(f"{flag} must be >= {low}, got {value}")


def _load_model(args):
    from .models import load_model
    try:
        return load_model(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)
    except (FileNotFoundError, ModuleNotFoundError, OSError, ValueError) as exc:  # ValueError: not a model folder
        raise CLIError(f"could not load --model {args.model}: {exc}" if args.model else str(exc)) from exc


def _load_task(args):
    from .tasks import get_task
    options = {}
    if args.task == "gsm8k":
        if not args.data:
            raise CLIError("task gsm8k needs --data PATH (a GSM8K jsonl file)")
        options["path"] = args.data
    elif args.task.startswith("arithmetic"):
        options["difficulty"] = args.difficulty
    _check_at_least(args, num_problems=1)
    try:
        task = get_task(args.task, **options)
        problems = task.problems(n=args.num_problems, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    potential_options = {}
    if args.format_only:
        if args.task == "arithmetic-short":
            raise CLIError("--format-only is for the GSM8K-format tasks (gsm8k, arithmetic): arithmetic-short's "
                           "only reward is the answer")
        potential_options["components"] = ("strict", "soft", "xml")
    return task, problems, potential_options


def _prompt_potential(spec: str | None, beta: float):
    """``--potential`` for free prompts: ``toxicity``, ``sentiment:positive|negative``, ``regex:PATTERN``."""
    if spec is None:
        return None
    from . import potentials
    kind, _, arg = spec.partition(":")
    try:
        if kind == "toxicity" and not arg:
            return potentials.ToxicityPotential(beta=beta)
        if kind == "sentiment" and arg in ("positive", "negative"):
            return potentials.SentimentPotential(arg, beta=beta)
        if kind == "regex" and arg:
            return potentials.tempered(potentials.RegexPotential(arg, penalty=1.0), beta)
    except (ImportError, ValueError) as exc:
        raise CLIError(f"--potential {spec}: {exc}") from exc
    raise CLIError(f"unknown --potential {spec!r}; expected toxicity, sentiment:positive, sentiment:negative "
                   "or regex:PATTERN")


def _load_head(path, model):
    if path is None:
        return None
    if not os.path.exists(path):
        raise CLIError(f"twist head not found: {path}")
    from .twist import TwistHead
    try:
        return TwistHead.from_pretrained(path, model=model)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"could not load the twist head {path}: {exc}") from exc


# ------------------------------------------------------------------------------------- commands

def cmd_run(args) -> int:
    from .sampler import smc_generate
    if args.potential and not args.prompt:
        raise CLIError("--potential is for --prompt (a task brings its own potential)")
    if args.prompt and args.format_only:
        raise CLIError("--format-only is for a task's problems, not --prompt (see --potential)")
    if args.method == "sample" and (args.head or args.potential):
        raise CLIError("--head / --potential are for --method smc (--method sample draws from the model as it is)")
    _check_at_least(args, particles=1, max_new_tokens=1)
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise CLIError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    _check_at_least(args, sync_every=1)
    for flag, value in (("--temperature", args.temperature), ("--alpha", args.alpha)):
        if not 0 < value < float("inf"):  # also NaN; before the model loads
            raise CLIError(f"{flag} must be a finite number > 0, got {value}")
    if not args.ess_threshold >= 0:
        raise CLIError(f"--ess-threshold must be >= 0, got {args.ess_threshold}")
    if args.method == "power":  # power MH targets p0^alpha: SMC's options would be ignored
        smc_only = [flag for flag, given in (("--potential", args.potential), ("--head", args.head),
                                             ("--temperature", args.temperature != 1.0),
                                             ("--ess-threshold", args.ess_threshold != 0.5),
                                             ("--sync-every", args.sync_every != 1)) if given]
        if smc_only:
            raise CLIError(f"{', '.join(smc_only)}: not used by --method power (it samples p0^alpha; "
                           "see --alpha, --cut, --block-size, --n-mcmc)")
    elif args.block_size is not None or args.n_mcmc is not None:
        raise CLIError("--block-size / --n-mcmc are for --method power")
    if args.prompt and not all(p.strip() for p in args.prompt):
        raise CLIError("--prompt must not be empty")
    prompt_potential = _prompt_potential(args.potential, args.beta)  # input errors before the model loads
    task_info = None if args.prompt else _load_task(args)
    model, tok = _load_model(args)
    if args.prompt:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   if args.chat and tok.chat_template else p for p in args.prompt]
        potential = prompt_potential
    else:
        task, problems, popts = task_info
        prompts = [task.build_prompt(tok, p.question) for p in problems]
        potential = task.potential([p.gold for p in problems], **popts)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    if args.method == "power":
        from .power import power_sample
        power_kw = {k: v for k, v in (("block_size", args.block_size), ("n_mcmc", args.n_mcmc)) if v is not None}
        with _input_errors():
            out = power_sample(model, enc.input_ids, enc.attention_mask, alpha=args.alpha, cut=args.cut,
                               num_chains=args.particles, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               progress=True, cuda_graph=args.cuda_graph, **power_kw)
        for b, prompt in enumerate(prompts):
            print(f"=== prompt {b}")
            for c in range(args.particles):
                text = tok.decode(out.completions[b, c], skip_special_tokens=True)
                print(f"[chain {c}] log p0 {float(out.log_p0[b, c]):.2f}: {text!r}")
        print(f"tokens decoded: {out.tokens_decoded}")
        return 0
    twist = _load_head(args.head, model)
    with _input_errors():
        out = smc_generate(model, enc.input_ids, enc.attention_mask, num_particles=args.particles,
                           max_new_tokens=args.max_new_tokens, potential=potential if args.method != "sample" else None,
                           twist=twist, tokenizer=tok, seed=args.seed, ess_threshold=args.ess_threshold,
                           temperature=args.temperature, cuda_graph=args.cuda_graph, sync_every=args.sync_every,
                           progress=True)
    for b in range(len(prompts)):
        print(f"=== prompt {b}: log Zhat {float(out.log_z[b]):.3f}, final ESS {float(out.ess[b, -1]):.2f}, "
              f"resampled {int(out.resampled[b].sum())}/{out.steps} steps")
        order = torch.argsort(out.log_weights[b], descending=True)
        for n in order.tolist():
            text = tok.decode(out.completions[b, n], skip_special_tokens=True)
            print(f"  w={float(out.weights[b, n]):.3f} log phi={float(out.log_phi[b, n]):.2f}: {text!r}")
    print(f"tokens decoded: {out.tokens_decoded}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import METHODS, evaluate
    _check_output_file(args.json, "--json")
    _check_at_least(args, particles=1, max_new_tokens=1)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if "twisted" in methods and not args.head:
        raise CLIError("--methods twisted needs a trained twist head (--head PATH; see tsmc train-twist)")
    task, problems, popts = _load_task(args)
    model, tok = _load_model(args)
    twist = _load_head(args.head, model)
    with _input_errors():
        report = evaluate(model, tok, args.task, problems, task=task, methods=methods, num_particles=args.particles,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, twist=twist, potential_options=popts,
                          power_options=dict(block_size=args.block_size, n_mcmc=args.n_mcmc))
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
        print(f"wrote {args.json}")
    return 0


def cmd_train_twist(args) -> int:
    from .twist import MLPTwistHead, fit_twist
    from .twist.losses import loss_needs
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # save_pretrained makes missing folders
        raise CLIError(f"--out {args.out}: exists and is not a folder")
    if not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    with _input_errors():
        spec = loss_needs(args.loss)  # an unknown loss name, before the model loads
    _check_at_least(args, particles=1, max_new_tokens=1, steps=1)
    task, problems, popts = _load_task(args)
    model, tok = _load_model(args)
    prompts = [task.build_prompt(tok, p.question) for p in problems]
    potential = task.potential([p.gold for p in problems], **popts)
    # FUDGE learns psi = sigmoid(f) in (0, 1); the other losses an unconstrained log psi.
    activation = "logsigmoid" if spec is loss_needs("fudge") else "none"
    head = MLPTwistHead.for_model(model, seed=args.seed, activation=activation)
    with _input_errors():
        fit_twist(model, head, prompts, potential, tokenizer=tok, loss=args.loss, num_particles=args.particles,
                  steps=args.steps, lr=args.lr, max_new_tokens=args.max_new_tokens, seed=args.seed, progress=True)
    head.save_pretrained(args.out)
    print(f"saved twist head to {args.out}")
    return 0


def cmd_bounds(args) -> int:
    from .bounds import log_z_bounds
    _check_at_least(args, particles=1, max_new_tokens=1, runs=2, max_proposals=1)
    task, problems, popts = _load_task(args)
    model, tok = _load_model(args)
    prompts = [task.build_prompt(tok, p.question) for p in problems]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    potential = task.potential([p.gold for p in problems], **{"mode": "indicator", **popts})
    try:
        with _input_errors():
            res = log_z_bounds(model, enc.input_ids, attention_mask=enc.attention_mask, potential=potential,
                               twist=_load_head(args.head, model), num_particles=args.particles, num_runs=args.runs,
                               max_new_tokens=args.max_new_tokens, tokenizer=tok, seed=args.seed,
                               max_proposals=args.max_proposals, progress=True)
    except RuntimeError as exc:  # too few exact samples is an input problem; anything else is a bug
        if not str(exc).startswith("rejection sampling"):
            raise
        raise CLIError(str(exc)) from exc
    print(res.summary())
    return 0


def cmd_bench(args) -> int:
    import subprocess
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(here, "bench")
    if not os.path.isdir(bench):
        raise CLIError("the bench/ folder is not next to the package (run from a source checkout)")
    return subprocess.call([sys.executable, "-m", "pytest", "-q", bench, *args.pytest_args])


def cmd_demo(args) -> int:
    from .demo import run_demo
    if args.data and not os.path.isfile(args.data):
        raise CLIError(f"GSM8K file not found: {args.data}")
    _check_output_file(args.out, "--out")
    _check_at_least(args, num_problems=1, particles=1)
    loaded = _load_model(args) if args.model or args.dtype else None  # else run_demo loads the default
    with _input_errors():
        return run_demo(data=args.data, out=args.out, seed=args.seed, device=args.device, loaded=loaded,
                        num_problems=args.num_problems, num_particles=args.particles)


# ------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .evaluate import METHODS
    from .twist.losses import LOSSES

    parser = argparse.ArgumentParser(prog="tsmc", description="Twisted SMC and power sampling for HF language models")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter, **kw)

    particles = "particles (SMC) or chains (power) per prompt"
    p = command("run", "sample with SMC / twisted SMC / power sampling and print the particles")
    _common(p)
    _task_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: problems of --task")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--potential", default=None,
                   help="with --prompt: toxicity | sentiment:positive | sentiment:negative | regex:PATTERN "
                        "(regex: phi = 1 on a match, e^-beta otherwise)")
    p.add_argument("--beta", type=float, default=1.0, help="inverse temperature of --potential")
    p.add_argument("--method", choices=["smc", "sample", "power"], default="smc",
                   help="sample: plain sampling from the model (SMC without potential or resampling)")
    p.add_argument("--head", default=None, help="a saved twist head (twisted SMC)")
    p.add_argument("--particles", type=int, default=8, help=particles)
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    p.add_argument("--ess-threshold", type=float, default=0.5, help="SMC: resample when ESS < this x particles")
    p.add_argument("--temperature", type=float, default=1.0, help="SMC: proposal temperature (the weights correct it)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the per-token step from CUDA graphs (SMC and power; CUDA only)")
    p.add_argument("--sync-every", type=int, default=1,
                   help="SMC: the host looks at the particles every K steps (potentials applied up to K late)")
    p.add_argument("--alpha", type=float, default=4.0, help="power: target p0^alpha")
    p.add_argument("--cut", choices=["entropy", "uniform"], default="entropy", help="power: where MH moves cut")
    p.add_argument("--block-size", type=int, default=None, help="power: tokens per block (default: 16 blocks)")
    p.add_argument("--n-mcmc", type=int, default=None, help="power: MH moves per block (default 10)")
    p.set_defaults(fn=cmd_run)

    p = command("eval", "compare samplers on a task at a comparable token budget")
    _common(p)
    _task_args(p)
    p.add_argument("--methods", default="sample,smc,power-uniform,power-entropy",
                   help=f"comma-separated, of {', '.join(METHODS)} (twisted needs --head)")
    p.add_argument("--head", default=None, help="a saved twist head, for the twisted method")
    p.add_argument("--particles", type=int, default=8, help=particles)
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    p.add_argument("--block-size", type=int, default=16, help="power methods: tokens per block")
    p.add_argument("--n-mcmc", type=int, default=2, help="power methods: MH moves per block")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(fn=cmd_eval)

    p = command("train-twist", "train a twist head (MLPTwistHead) by CTL or another loss on a task")
    _common(p)
    _task_args(p)
    p.add_argument("--loss", default="ctl", help=f"one of {', '.join(LOSSES)}")
    p.add_argument("--particles", type=int, default=8, help="particles per prompt while training")
    p.add_argument("--steps", type=int, default=20, help="sampling rounds (one gradient step each)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--max-new-tokens", type=int, default=16, help="completion length limit")
    p.add_argument("--out", required=True, help="folder to save the head in (TwistHead.from_pretrained loads it)")
    p.set_defaults(fn=cmd_train_twist)

    p = command("bounds", "bidirectional bounds on log Z for a task's indicator potential")
    _common(p)
    _task_args(p)
    p.add_argument("--head", default=None, help="a saved twist head: bounds for twisted SMC too")
    p.add_argument("--particles", type=int, default=8, help="particles per SMC run")
    p.add_argument("--runs", type=int, default=4, help="independent runs per bound (>= 2: standard errors)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="completion length limit")
    p.add_argument("--max-proposals", type=int, default=4096,
                   help="rejection-sampling budget per prompt for the exact target samples")
    p.set_defaults(fn=cmd_bounds)

    p = command("bench", "run the microbenchmarks (pytest-benchmark; meaningful on a GPU)",
                epilog="Every further argument goes to pytest, e.g. `tsmc bench -k twist_sample "
                       "--benchmark-json out.json`. Needs a source checkout (the bench/ folder).")
    p.set_defaults(fn=cmd_bench, pytest_args=[])

    p = command("demo", "the main job: eval on the embedded model, table + demo_report.png")
    p.add_argument("--data", default=None, help="GSM8K jsonl (optional: the GSM8K part is skipped without it)")
    p.add_argument("--out", default="demo_report.png", help="the plot (skipped without matplotlib)")
    p.add_argument("--model", default=None, help="another model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="all randomness follows from it")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("-n", "--num-problems", type=int, default=16, help="arithmetic problems (GSM8K: half as many)")
    p.add_argument("--particles", type=int, default=8, help="samples per problem for every method")
    p.set_defaults(fn=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for a command-line user (the library's file and line mean nothing to them)."""
    print(f"tsmc: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "bench":
        build_parser().parse_args(argv)  # reports the unknown arguments and exits with status 2
    args.pytest_args = extra
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            if hasattr(args, "device"):
                _check_device(args.device)
            return args.fn(args)
        except CLIError as exc:
            print(f"tsmc {args.command}: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
