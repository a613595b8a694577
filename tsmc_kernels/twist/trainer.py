"""Twist training: alternate twisted-SMC sampling under the current head and gradient steps on it.

Two front ends over the same step (:func:`sample_batch` then :func:`~.losses.twist_loss`):

* :func:`fit_twist` — a plain loop (Adam), returns a history of per-step metrics;
* :class:`TwistTrainer` — a ``transformers.Trainer`` (logging, checkpointing and resuming,
  gradient accumulation, mixed precision, ``TrainingArguments``). Its dataset is the prompts
  (:class:`PromptDataset`); the module it optimises and saves is a :class:`TwistModule` holding
  only the head, so the base model is never optimised nor saved.

The base model is frozen and untouched: it runs under ``no_grad`` (sampling and the one
teacher-forced pass of :mod:`.losses`) and its parameters are never handed to an optimizer.

Sampling for training uses ``ess_threshold=0`` by default (SIS with the twisted proposal): then
the final weights are ``softmax(log p0 + log phi - log q)`` and CTL's negative weights are exact.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Sequence

import torch
from torch import nn

from ..potentials.base import Potential, as_potential
from ..sampler.inputs import check_int, check_prompts
from ..sampler.output import ZeroWeightWarning
from ..sampler.smc import smc_generate
from .heads import TwistHead, bind_prompts
from .losses import check_loss_options, loss_needs, make_batch, twist_loss

__all__ = ["fit_twist", "sample_batch", "TwistTrainer", "TwistModule", "PromptDataset", "PromptCollator",
           "tokenize_prompts", "IndexedPotential"]


# ----------------------------------------------------------------------------- prompts

def tokenize_prompts(tokenizer, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids [B, P], attention_mask [B, P])`` for ``texts``.

    Special tokens (BOS) are added unless a text already starts with the tokenizer's BOS token
    (chat-templated prompts do).
    """
    rows = [_encode(tokenizer, t) for t in texts]
    return _left_pad(rows, _pad_token(tokenizer), device)


def _encode(tokenizer, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def _pad_token(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must have at least one token")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), P), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.as_tensor(list(r), dtype=torch.int64)
        mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def _as_prompt_tensors(model, prompts, attention_mask, tokenizer, device):
    """``(input_ids [B, P], attention_mask [B, P])`` from a tensor, a dict/BatchEncoding, id lists (ragged:
    left-padded) or strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer=")
        return tokenize_prompts(tokenizer, prompts, device)
    if isinstance(prompts, dict) or hasattr(prompts, "keys"):
        attention_mask = prompts.get("attention_mask", attention_mask)
        prompts = prompts["input_ids"]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(r, (list, tuple)) for r in prompts):
        if attention_mask is not None:
            raise ValueError("prompts given as lists of ids carry their own lengths: pass no attention_mask")
        return _left_pad(prompts, 0, device)  # ragged id lists, left-padded (the pad id is masked out)
    if isinstance(prompts, (list, tuple)):
        prompts = torch.as_tensor(prompts, dtype=torch.int64)
    if not isinstance(prompts, torch.Tensor):
        raise TypeError(f"prompts must be a tensor of ids, a dict with input_ids, or a list of strings; "
                        f"got {type(prompts).__name__}")
    ids = prompts.unsqueeze(0) if prompts.dim() == 1 else prompts
    if attention_mask is None:  # padding inferred as the samplers infer it (the pad id, unless it is EOS)
        ids, inferred = check_prompts(model, ids.to(device))  # (left-aligned when inferred)
        return ids, torch.ones_like(ids) if inferred is None else inferred
    return ids.to(device), attention_mask.reshape(ids.shape).to(device)


class IndexedPotential(Potential):
    """``potential`` seen through a minibatch: row ``prompt_index = b`` is scored as prompt ``index[b]``
    of the full prompt list (per-prompt targets such as gold answers keep working)."""

    def __init__(self, potential, index: torch.Tensor):
        self.inner = as_potential(potential)
        self.index = index.to(torch.int64).cpu()
        self.needs_text = self.inner.needs_text
        self.name = self.inner.name

    def log_phi(self, completion_ids, texts, prompt_index):
        mapped = self.index[prompt_index.cpu()].to(prompt_index.device)
        return self.inner(completion_ids, texts=texts, prompt_index=mapped)


# ----------------------------------------------------------------------------- one step

def _check(model, head, loss: str, loss_kwargs: dict | None):
    if not isinstance(head, TwistHead):
        raise TypeError(f"head must be a TwistHead (MLPTwistHead, EmbeddingTwistHead, ModelTwistHead), "
                        f"got {type(head).__name__}")
    head.check_compatible(model)
    check_loss_options(loss, loss_kwargs or {})
    if loss_needs(loss) is loss_needs("fudge") and getattr(head, "activation", "none") != "logsigmoid":
        raise ValueError("loss='fudge' learns psi = sigmoid(f) in (0, 1): build the head with activation='logsigmoid'")
    hp = {id(p) for p in head.parameters()}
    if any(id(p) in hp for p in model.parameters()):
        raise ValueError("the twist head shares parameters with the base model; the base model must stay frozen")
    if any(p.requires_grad and p.dtype == torch.float16 for p in head.parameters()):
        # Adam's eps (1e-8) is 0 in fp16: a zero gradient gives 0 / 0 = NaN in every such parameter.
        raise ValueError("the twist head has float16 trainable parameters, which Adam turns into NaN: build it in "
                         "float32 (e.g. MLPTwistHead.for_model(model, dtype=torch.float32), also for an fp16 model) "
                         "or bfloat16, and train with autocast for speed")


def sample_batch(model, head, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, potential, *,
                 loss: str = "ctl", num_particles: int = 16, max_new_tokens: int = 32, seed: int = 0,
                 ess_threshold: float = 0.0, tokenizer=None, chunk_size: int = 64, smc_kwargs: dict | None = None):
    """Sample with twisted SMC under ``head`` (and base rollouts if the loss needs them) and build the
    :class:`~.losses.TwistBatch`, everything under ``no_grad``. Returns ``(batch, smc_output)``."""
    spec = loss_needs(loss)
    kw = dict(num_particles=num_particles, max_new_tokens=max_new_tokens, potential=potential, tokenizer=tokenizer)
    kw.update(smc_kwargs or {})
    ess_threshold = kw.pop("ess_threshold", ess_threshold)
    seed = kw.pop("seed", seed)
    temperature, top_k = kw.get("temperature", 1.0), kw.get("top_k", 0)
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # A round where some prompt earns no reward is normal with rare rewards (not a warning per
            # round): the round's record reports it as log_z_finite_frac.
            warnings.simplefilter("ignore", ZeroWeightWarning)
            out = ref = None
            if spec.needs_twisted:
                with bind_prompts(head, input_ids, attention_mask, num_particles):
                    out = smc_generate(model, input_ids, attention_mask, twist=head, ess_threshold=ess_threshold,
                                       seed=seed, **kw)
            if spec.needs_ref:
                ref = smc_generate(model, input_ids, attention_mask, twist=None, ess_threshold=0.0,
                                   seed=seed + 1, **kw)
            batch = make_batch(model, head, input_ids, attention_mask, out, loss=loss, ref_out=ref,
                               chunk_size=chunk_size, temperature=temperature, top_k=top_k)
    finally:
        head.train(was_training)
    return batch, (out if out is not None else ref)


def _metrics(out) -> dict:
    finite = torch.isfinite(out.log_phi)
    lz = out.log_z
    lp = out.log_phi[finite]
    return {
        "finite_frac": float(finite.float().mean()),
        "positive_frac": float((out.log_phi > 0).float().mean()),
        "mean_log_phi": float(lp.mean()) if lp.numel() else -math.inf,
        "log_z": float(lz[torch.isfinite(lz)].mean()) if bool(torch.isfinite(lz).any()) else -math.inf,
        "log_z_finite_frac": float(torch.isfinite(lz).double().mean()),
        "ess": float(out.ess[:, -1].mean()),
    }


_EVAL_SEED_OFFSET = 0x5EED_E7A1  # evaluation seeds: another stream than training's


def _step_seed(seed: int, step: int, micro: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(step) * 1_009 + int(micro) * 2) % (2 ** 62)


def fit_twist(model, head, prompts, potential, *, loss: str = "ctl", num_particles: int = 16, steps: int = 100,
              lr: float | None = None, max_new_tokens: int = 32, tokenizer=None, attention_mask: torch.Tensor | None = None,
              batch_size: int | None = None, inner_steps: int = 1, ess_threshold: float = 0.0,
              weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, loss_kwargs: dict | None = None,
              smc_kwargs: dict | None = None, chunk_size: int = 64, seed: int = 0, progress: bool = False,
              callback=None) -> list[dict]:
    """Train ``head`` on ``prompts`` by alternating twisted SMC and gradient steps (Adam).

    Args:
        model: frozen HF causal LM (never modified). head: a :class:`~.heads.TwistHead` on its device.
        prompts: int64 ``[B, P]`` (with ``attention_mask``), a dict/BatchEncoding, lists of ids (may be
            ragged), or a list of strings (with ``tokenizer``). Several identical prompts are
            independent SMC runs.
        potential: final ``log phi``; ``prompt_index`` refers to the full prompt list.
        loss: ``"ctl"`` (default) | ``"sixo"`` | ``"fudge"`` | ``"soft_q"`` | ``"dpg"``.
        num_particles, max_new_tokens: of each SMC run. steps: sampling rounds.
        lr: AdamW learning rate (default: the head's ``default_lr``: 1e-3 for the MLP head, 1e-4
            for the embedding head (every output moves with ``g(h)``) and the model head).
        batch_size: prompts per round (a random subset; default all). inner_steps: gradient steps
            per round on the same samples.
        ess_threshold: resampling threshold while sampling for training (0 = SIS, exact CTL).
        loss_kwargs: options of the loss (``log_phi_floor``). smc_kwargs: more ``smc_generate``
            options (``temperature``, ``top_k``, ``eos_token_id``, ...).
        callback: ``callback(step, record, head)`` after every round; returning True stops training.
    The head trains in train mode: a :class:`~.heads.ModelTwistHead` copied from a model with dropout
    (GPT-2's 0.1) computes its loss with dropout on.

    Returns:
        history: one dict per round: ``step, loss``; of the round's samples (twisted SMC under the
        current head; for ``fudge``, which learns from base-model rollouts, those rollouts)
        ``finite_frac`` (particles with ``phi > 0``: the reward fraction of an indicator potential),
        ``positive_frac`` (``log phi > 0``), ``mean_log_phi`` (over finite values), ``log_z`` (mean
        finite ``log Zhat``), ``log_z_finite_frac``, ``ess`` (final mean); ``seconds``.
        ``mean_log_phi`` and ``log_z`` are ``-inf`` in a round where no particle has ``phi > 0``.
    """
    _check(model, head, loss, loss_kwargs)
    if torch.is_inference_mode_enabled():  # its tensors can never take part in autograd
        raise RuntimeError("fit_twist trains the head: call it outside torch.inference_mode()")
    check_int("steps", steps, 1)
    check_int("inner_steps", inner_steps, 1)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, " (or None: every prompt)")
    device = next(model.parameters()).device
    ids, mask = _as_prompt_tensors(model, prompts, attention_mask, tokenizer, device)
    B = ids.shape[0]
    pot = as_potential(potential) if potential is not None else None
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the twist head has no trainable parameters")
    lr = getattr(head, "default_lr", 1e-3) if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    rounds = range(steps)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc=f"twist/{loss}")
    head.train()
    for step in rounds:
        t0 = time.perf_counter()
        if batch_size is not None and batch_size < B:
            index = torch.randperm(B, generator=gen)[:batch_size].sort().values
        else:
            index = torch.arange(B)
        sub_pot = IndexedPotential(pot, index) if pot is not None else None
        batch, out = sample_batch(model, head, ids[index.to(device)], mask[index.to(device)], sub_pot, loss=loss,
                                  num_particles=num_particles, max_new_tokens=max_new_tokens,
                                  seed=_step_seed(seed, step), ess_threshold=ess_threshold, tokenizer=tokenizer,
                                  chunk_size=chunk_size, smc_kwargs=smc_kwargs)
        losses = []
        for _ in range(inner_steps):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when the caller runs under torch.no_grad()
                value = twist_loss(loss, head, batch, **(loss_kwargs or {}))
            if not torch.isfinite(value):
                raise FloatingPointError(f"twist loss {loss!r} is {float(value)} at step {step}")
            value.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(float(value.detach()))
        record = {"step": step, "loss": sum(losses) / len(losses), **_metrics(out),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if progress:
            rounds.set_postfix(loss=f"{record['loss']:.3g}", phi_gt_0=f"{record['finite_frac']:.2f}",
                               log_z=f"{record['log_z']:.2f}")
        if callback is not None and callback(step, record, head):
            break
    head.eval()
    return history


# ----------------------------------------------------------------------------- HF Trainer

class PromptDataset(torch.utils.data.Dataset):
    """Prompts as a dataset of ``{"input_ids": list[int], "prompt_index": int}`` items.

    ``prompts``: a list of strings (with ``tokenizer``), a list of id lists, or an int64 ``[B, P]``
    tensor with an optional ``attention_mask`` (padding is stripped; without a mask, the tokenizer's
    pad id marks padding when it is not its EOS id, as the samplers infer it).
    """

    def __init__(self, prompts, tokenizer=None, attention_mask: torch.Tensor | None = None):
        if isinstance(prompts, torch.Tensor):
            ids = prompts.unsqueeze(0) if prompts.dim() == 1 else prompts
            pad = getattr(tokenizer, "pad_token_id", None)
            if attention_mask is None and pad is not None and pad != getattr(tokenizer, "eos_token_id", None):
                attention_mask = (ids != pad).long()
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
            self.rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
        elif prompts and isinstance(prompts[0], str):
            if tokenizer is None:
                raise ValueError("prompts are strings: pass tokenizer=")
            self.rows = [_encode(tokenizer, t) for t in prompts]
        else:
            self.rows = [list(map(int, r)) for r in prompts]
        if not self.rows or any(len(r) == 0 for r in self.rows):
            raise ValueError("PromptDataset needs at least one prompt and no empty prompt")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "prompt_index": i}


class PromptCollator:
    """Left-pads :class:`PromptDataset` items into ``input_ids``, ``attention_mask``, ``prompt_index``."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = _left_pad([f["input_ids"] for f in features], self.pad_token_id)
        index = torch.tensor([int(f.get("prompt_index", i)) for i, f in enumerate(features)], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask, "prompt_index": index}


class TwistModule(nn.Module):
    """What :class:`TwistTrainer` optimises and checkpoints: the head only (``state_dict`` keys ``head.*``)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, input_ids=None, attention_mask=None, prompt_index=None):
        raise RuntimeError("TwistModule is trained by TwistTrainer.compute_loss (sampling + twist loss); "
                           "call the head itself as a twist")


def _trainer_base():
    from transformers import Trainer
    return Trainer


class TwistTrainer(_trainer_base()):
    """``transformers.Trainer`` for twist heads: each ``compute_loss`` samples with twisted SMC under
    the current head (``no_grad``) then returns the twist loss on the head.

    Args:
        base_model: the frozen HF causal LM (kept outside the optimised module; not moved, not saved).
        head: a :class:`~.heads.TwistHead` (on the base model's device).
        potential: final ``log phi``; ``prompt_index`` is the dataset index of each prompt.
        args: ``TrainingArguments`` (``per_device_train_batch_size`` = prompts per micro-batch; set
            ``learning_rate``, e.g. to ``head.default_lr``: HF's default 5e-5 is slow for the MLP head).
        train_dataset: a :class:`PromptDataset`, or anything :class:`PromptDataset` accepts.
        tokenizer: decodes text for potentials and tokenizes string prompts; saved with checkpoints.
        loss, loss_kwargs: see :mod:`.losses`. num_particles, max_new_tokens, ess_threshold,
        smc_kwargs: of the training-time SMC (see :func:`fit_twist`).
        Other keyword arguments go to ``transformers.Trainer``.

    Checkpoints hold ``model.safetensors`` (the :class:`TwistModule` state, which resumes) and the
    head in its own format (``twist_config.json`` + ``twist_head.safetensors``, for
    ``TwistHead.from_pretrained``). Extra metrics (``finite_frac``, ``log_z``, ``ess``, ...) are
    averaged over the logging interval and logged with the loss.
    """

    def __init__(self, base_model, head, potential, args=None, train_dataset=None, *, tokenizer=None,
                 loss: str = "ctl", loss_kwargs: dict | None = None, num_particles: int = 16,
                 max_new_tokens: int = 32, ess_threshold: float = 0.0, smc_kwargs: dict | None = None,
                 chunk_size: int = 64, eval_dataset=None, data_collator=None, **kwargs):
        from transformers import TrainingArguments

        _check(base_model, head, loss, loss_kwargs)
        if args is None:
            args = TrainingArguments(output_dir="twist_trainer_output", remove_unused_columns=False, report_to=[],
                                     learning_rate=getattr(head, "default_lr", 1e-3))
        if getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False  # our items carry prompt_index, which the loss reads
        if train_dataset is not None and not isinstance(train_dataset, torch.utils.data.Dataset):
            train_dataset = PromptDataset(train_dataset, tokenizer)
        if eval_dataset is not None and not isinstance(eval_dataset, torch.utils.data.Dataset):
            eval_dataset = PromptDataset(eval_dataset, tokenizer)
        pad = _pad_token(tokenizer) if tokenizer is not None else int(
            getattr(base_model.generation_config, "pad_token_id", None) or 0)
        super().__init__(model=TwistModule(head), args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator or PromptCollator(pad), processing_class=tokenizer, **kwargs)
        self.base_model = base_model
        self.potential = as_potential(potential) if potential is not None else None
        self.twist_loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self.num_particles, self.max_new_tokens = int(num_particles), int(max_new_tokens)
        self.ess_threshold, self.smc_kwargs, self.chunk_size = float(ess_threshold), dict(smc_kwargs or {}), chunk_size
        self.tokenizer_for_text = tokenizer
        self._stored: dict[str, list[float]] = {}
        self._micro = {True: (-1, 0), False: (-1, 0)}  # (step, micro-batch index), training and evaluation

    def _seed_for_call(self, training: bool) -> int:
        """The SMC seed of this micro-batch. Evaluation counts its own calls from another seed, so
        turning it on leaves the training samples (and the trained head) exactly as they were."""
        step = self.state.global_step
        last, k = self._micro[training]
        k = k + 1 if last == step else 0
        self._micro[training] = (step, k)
        return _step_seed(self.args.seed + (0 if training else _EVAL_SEED_OFFSET), step, k)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        head = self.accelerator.unwrap_model(model).head
        device = next(self.base_model.parameters()).device
        ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        index = inputs.get("prompt_index")
        index = torch.arange(ids.shape[0]) if index is None else index.cpu()
        pot = IndexedPotential(self.potential, index) if self.potential is not None else None
        batch, out = sample_batch(self.base_model, head, ids, mask, pot, loss=self.twist_loss_name,
                                  num_particles=self.num_particles, max_new_tokens=self.max_new_tokens,
                                  seed=self._seed_for_call(model.training), ess_threshold=self.ess_threshold,
                                  tokenizer=self.tokenizer_for_text, chunk_size=self.chunk_size,
                                  smc_kwargs=self.smc_kwargs)
        # The head is called here, not through the wrapped module's forward that accelerate autocasts:
        # TrainingArguments(bf16=True / fp16=True) applies through this context.
        with self.accelerator.autocast():
            loss = twist_loss(self.twist_loss_name, head, batch, **self.loss_kwargs)
        prefix = "" if model.training else "eval_"
        for k, v in _metrics(out).items():
            if math.isfinite(v):
                self._stored.setdefault(prefix + k, []).append(v)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        keys = [k for k in self._stored if k.startswith("eval_") == is_eval]
        for k in keys:
            vals = self._stored.pop(k)
            if vals:
                logs[k] = sum(vals) / len(vals)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            out = output_dir if output_dir is not None else self.args.output_dir
            self.accelerator.unwrap_model(self.model).head.save_pretrained(out)

    @property
    def head(self):
        return self.accelerator.unwrap_model(self.model).head
