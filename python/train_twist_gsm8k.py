"""Train a twist head for GSM8K with the HF Trainer (the recipe of the post this project started from).

The base model stays frozen: each training step samples completions for a batch of GSM8K questions
with twisted SMC under the current head, then takes a gradient step on the head (CTL by default).
The potential is ``phi = exp(beta * r)`` with ``r`` the summed rewards of the well-known GRPO demo
(correctness 2.0, integer 0.5, strict / soft format 0.5 each, XML count 0.5; see
:mod:`tsmc_kernels.tasks.gsm8k`). Checkpoints hold the head (``TwistHead.from_pretrained``) and
resume with ``--resume``.

    python python/train_twist_gsm8k.py --limit 256 --max-steps 200            # embedded SmolLM2-135M
    python python/train_twist_gsm8k.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --device cuda \\
        --particles 16 --max-new-tokens 256 --batch-size 4 --grad-accum 4
    python python/train_twist_gsm8k.py --resume latest                         # continue a run

Then sample with the head::

    head = TwistHead.from_pretrained("twist_gsm8k/final", model=model)
    out = smc_generate(model, ids, mask, twist=head, potential=phi, num_particles=16, tokenizer=tok)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "gsm8k", "train.jsonl"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model path/directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--data", default=DEFAULT_DATA, help="GSM8K jsonl (question, answer with '#### gold')")
    p.add_argument("--limit", type=int, default=None, help="use the first N questions (after shuffling with --seed)")
    p.add_argument("--head", default="embedding", choices=["embedding", "mlp", "model"])
    p.add_argument("--head-layers", type=int, default=2, help="MLP layers (embedding/mlp) or transformer layers (model)")
    p.add_argument("--loss", default="ctl", choices=["ctl", "sixo", "fudge", "soft_q", "dpg"])
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--beta", type=float, default=1.0, help="phi = exp(beta * reward)")
    p.add_argument("--mode", default="exp", choices=["exp", "indicator"],
                   help="indicator: phi = 1[reward > --threshold] (use with --loss fudge)")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--ess-threshold", type=float, default=0.0, help="resampling while sampling for training (0 = SIS)")
    p.add_argument("--output-dir", default="twist_gsm8k")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2, help="questions per device micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the head's default_lr (embedding 1e-4, mlp 1e-3, "
                   "model 1e-4)")
    p.add_argument("--bf16", action="store_true", help="mixed precision (autocast bf16)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' (in --output-dir)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_head(kind: str, model, layers: int, loss: str, seed: int):
    from tsmc_kernels.twist import EmbeddingTwistHead, MLPTwistHead, ModelTwistHead

    activation = "logsigmoid" if loss == "fudge" else "none"
    if kind == "embedding":
        return EmbeddingTwistHead.for_model(model, num_layers=layers, activation=activation, seed=seed)
    if kind == "mlp":
        return MLPTwistHead.for_model(model, num_layers=layers, activation=activation, seed=seed)
    return ModelTwistHead.from_model(model, num_layers=layers, activation=activation, seed=seed)


def main(argv=None):
    args = parse_args(argv)
    from transformers import TrainingArguments

    from tsmc_kernels.models import load_model
    from tsmc_kernels.tasks import gsm8k  # lazy: rewards, prompts and data loading
    from tsmc_kernels.twist import PromptDataset, TwistTrainer

    if not os.path.isfile(args.data):  # before loading a model, which can take minutes
        raise SystemExit(f"GSM8K data not found: {args.data} (pass --data path/to/train.jsonl)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device=device)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen base model (the trainer never optimises it anyway)

    problems = gsm8k.load_jsonl(args.data, limit=args.limit, seed=args.seed)
    prompts = [gsm8k.build_prompt(tokenizer, p.question) for p in problems]
    golds = [p.gold for p in problems]
    potential = gsm8k.gsm8k_potential(golds, mode=args.mode, beta=args.beta, threshold=args.threshold)
    dataset = PromptDataset(prompts, tokenizer)
    print(f"{len(dataset)} GSM8K questions from {args.data}; model {args.model or 'SmolLM2-135M (embedded)'} on {device}")

    head = build_head(args.head, model, args.head_layers, args.loss, args.seed)
    print(f"{type(head).__name__}: {head.num_trainable_parameters():,} trainable parameters; loss {args.loss}")

    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr or head.default_lr, lr_scheduler_type="constant",
        max_grad_norm=1.0, logging_steps=args.logging_steps, save_steps=args.save_steps, save_strategy="steps",
        bf16=args.bf16, use_cpu=device == "cpu", seed=args.seed, report_to=[], remove_unused_columns=False,
        dataloader_pin_memory=False)
    trainer = TwistTrainer(model, head, potential, targs, train_dataset=dataset, tokenizer=tokenizer, loss=args.loss,
                           num_particles=args.particles, max_new_tokens=args.max_new_tokens,
                           ess_threshold=args.ess_threshold)
    resume = args.resume
    if resume == "latest":
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    final = os.path.join(args.output_dir, "final")
    trainer.head.save_pretrained(final)
    print(f"saved the twist head to {final} (load with TwistHead.from_pretrained(path, model=model))")


if __name__ == "__main__":
    main()
