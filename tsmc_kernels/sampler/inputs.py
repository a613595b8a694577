"""Checks and defaults shared by every sampler that takes HF-style prompts (SMC, power MH, bounds)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import sys
import warnings
from collections.abc import Mapping

import torch

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def warn_caller(message: str, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame outside this package and the
    torch / contextlib decorators the samplers are wrapped in (not to a line inside the sampler)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR))
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def cache_kwarg(model) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` (transformers >= 5.24,
    which deprecates the old name) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def eval_mode(module):
    """Within the block ``module`` (a ``torch.nn.Module``; anything else passes) is in eval mode;
    every submodule's own mode is restored after."""
    if not isinstance(module, torch.nn.Module) or not module.training:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def in_eval_mode(sampler):
    """Decorator: run ``sampler(model, ..., twist=/head=...)`` with the model and the twist head in
    :func:`eval_mode`.

    The samplers need the model's inference distribution: in training mode dropout makes every
    forward pass random, so ``log p0``, the weights and the acceptance ratios would be noisy and a
    seed would not reproduce a run. A model found training is switched for the call, with a
    warning; a twist head (``twist=`` / ``head=``: a new module is in training mode) silently.
    """
    @functools.wraps(sampler)
    def wrapped(model, *args, **kwargs):
        if getattr(model, "training", False):
            warn_caller(f"{sampler.__name__}: the model is in training mode (dropout would make sampling "
                        "random); it runs in eval mode for this call. Call model.eval() first to silence this.")
        with eval_mode(model), eval_mode(kwargs.get("twist")), eval_mode(kwargs.get("head")):
            return sampler(model, *args, **kwargs)
    return wrapped


def check_int(name: str, value, low: int, why: str = "") -> int:
    """``value`` as a Python int ``>= low``: Python, numpy and 0-dim torch integers pass (not bools,
    floats or 1-element tensors); else ``ValueError`` (``why`` follows the bound in its message)."""
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dim() != 0):
            raise TypeError
        as_int = operator.index(value)
    except TypeError:
        as_int = None
    if as_int is None or as_int < low:
        raise ValueError(f"{name} must be an int >= {low}{why}, got {value!r}")
    return as_int


def check_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    why: str) -> None:
    """Check that the longest prompt (its real tokens: padding takes no position) plus ``max_new_tokens``
    fits the model's position limit (``max_position_embeddings`` or ``n_positions``, when the config
    has one). Past it, a model with a learned position table (GPT-2's ``wpe``, OPT's
    ``embed_positions``) would index out of range: ``ValueError``; a rotary model runs on with
    degrading quality: a warning, as ``model.generate`` gives. ``input_ids``, ``attention_mask``: ``[B, P]``."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(limit, int):
        return
    prompt_len = input_ids.shape[1]
    if attention_mask is not None and prompt_len + max_new_tokens > limit:
        prompt_len = int(attention_mask.sum(1).max())
    if prompt_len + max_new_tokens <= limit:
        return
    what = f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's {limit} positions"
    if _has_position_table(model, limit):
        raise ValueError(f"{what} ({why})")
    warn_caller(f"{what}: past them the model extrapolates its rotary positions and its outputs may degrade")


def _has_position_table(model, limit: int) -> bool:
    """Whether ``model`` holds a learned position embedding of ``limit`` rows (by its name: ``wpe``, ``*pos*``)."""
    return any(isinstance(m, torch.nn.Embedding) and m.num_embeddings >= limit
               and (name.rsplit(".", 1)[-1] == "wpe" or "pos" in name.rsplit(".", 1)[-1])
               for name, m in model.named_modules())


def eos_ids(model, eos_token_id=None) -> list[int]:
    """EOS ids: ``eos_token_id`` (an id, a list / tuple / tensor of ids, ``[]`` for none), else the
    model's generation config, else its config. Given ids must be integers in the vocabulary
    (``TypeError`` / ``ValueError`` otherwise: an id the model cannot sample would mean "no EOS")."""
    given = eos_token_id is not None
    if not given:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
        if eos_token_id is None:
            return []
    vocab = model_vocab(model)
    if not given:  # the config's ids: one the model cannot sample (a config reused at another vocab size) is no EOS
        return [int(e) for e in _id_items(eos_token_id) if vocab is None or 0 <= int(e) < vocab]
    return token_id_list("eos_token_id", eos_token_id, vocab)


def _id_items(ids) -> list:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return list(ids) if isinstance(ids, (list, tuple, set)) else [ids]


def token_id_list(name: str, ids, vocab: int | None) -> list[int]:
    """``ids`` (an id, a list / tuple / set / tensor of ids) as a list of ints in ``[0, vocab)``,
    else ``TypeError`` / ``ValueError`` naming ``name``."""
    return [_token_id(name, i, vocab) for i in _id_items(ids)]


def _token_id(name: str, value, vocab: int | None) -> int:
    """``value`` as an int id in ``[0, vocab)`` (ints, numpy and 0-dim torch integers), else
    ``TypeError`` / ``ValueError`` naming ``name``."""
    try:
        i = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be integer token ids, got {value!r}") from None
    if i < 0 or (vocab is not None and i >= vocab):
        raise ValueError(f"{name} {i} is outside the model's vocabulary [0, {vocab})")
    return i


def is_any_of(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Bool, shape of ``tokens``: whether each token is one of ``ids`` (int64 ``[K]``, K may be 0).

    A broadcast compare rather than ``torch.isin``, which sorts and calls ``unique`` on CUDA for
    longer id lists (a host synchronisation that CUDA-graph capture refuses)."""
    return (tokens.unsqueeze(-1) == ids).any(-1)


def model_vocab(model) -> int | None:
    """The size of the model's output vocabulary (rows of its output embedding), or None if unknown."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None and getattr(emb, "weight", None) is not None else None


def check_token_ids(name: str, ids: torch.Tensor, vocab: int | None) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``name`` unless ``ids`` is an integer tensor of ids in ``[0, vocab)``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
    if vocab is not None and ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"{name} contain ids outside the model's vocabulary [0, {vocab})")


def configured_pad_id(model) -> int | None:
    """The model's own pad id (generation config, else config), or None (also for an id outside the vocabulary)."""
    gen = getattr(model, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    vocab = model_vocab(model)
    if pad is not None and vocab is not None and not 0 <= int(pad) < vocab:
        pad = None  # a config reused at another vocabulary size
    return int(pad) if pad is not None else None


def pad_id(model, pad_token_id, eos: list[int]) -> int:
    """Padding id after EOS: ``pad_token_id`` (must be in the vocabulary), else the model's, else the
    first EOS id, else 0."""
    if pad_token_id is not None:
        return _token_id("pad_token_id", pad_token_id, model_vocab(model))
    pad = configured_pad_id(model)
    return pad if pad is not None else (eos[0] if eos else 0)


def _inferred_attention_mask(model, input_ids: torch.Tensor, pad_token_id) -> torch.Tensor | None:
    """As ``model.generate`` does without a mask: the pad id (``pad_token_id``, else the model's) marks
    padding, unless it is also an EOS id (then padding cannot be told from a prompt's EOS tokens: a
    warning when a row of a batch starts or ends with it). None: every token is real."""
    pad = _token_id("pad_token_id", pad_token_id, model_vocab(model)) if pad_token_id is not None \
        else configured_pad_id(model)
    if pad is None:
        return None
    is_pad = input_ids == pad
    if not bool(is_pad.any()):
        return None
    if pad in eos_ids(model):
        if input_ids.shape[0] > 1 and bool((is_pad[:, 0] | is_pad[:, -1]).any()):
            warn_caller(f"attention_mask is not given and the pad id {pad} is also an EOS id, so padding cannot be "
                        "told from EOS tokens: every token is treated as real. Pass the tokenizer's attention_mask.")
        return None
    return (~is_pad).long()


def check_prompts(model, input_ids, attention_mask=None, pad_token_id=None, token_type_ids=None):
    """Validate ``input_ids`` ``[B, P]`` (or ``[P]``, or a tokenizer's ``BatchEncoding`` / a dict with
    ``input_ids`` and maybe ``attention_mask``) and ``attention_mask`` against ``model``.

    Without ``attention_mask``, padding is inferred as ``model.generate`` infers it: tokens equal to
    the pad id (``pad_token_id``, else the model's) when that id is not also an EOS id.

    Raises ``TypeError``/``ValueError`` naming the argument: not a tensor, wrong rank or dtype,
    empty, on another device than the model, ids outside the vocabulary, a mask of another shape
    or device, a prompt that is all padding. Padding anywhere else than on the left (a tokenizer's
    right padding) is moved there (:func:`left_align`): the samplers continue every prompt after
    its last real token. ``token_type_ids`` (some tokenizers return them, so ``**tok(...)`` passes them)
    must be all 0, the segment every sampled token is fed as; a nonzero one raises ``ValueError``.
    Returns:
        ``(input_ids [B, P], attention_mask [B, P] or None)`` with a batch dimension, left-padded.
    """
    if isinstance(input_ids, Mapping):  # a tokenizer's BatchEncoding (or a dict) given whole
        if "input_ids" not in input_ids:
            raise TypeError(f"input_ids is a mapping without an 'input_ids' entry (keys {sorted(input_ids)})")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        if token_type_ids is None:
            token_type_ids = input_ids.get("token_type_ids")
        input_ids = input_ids["input_ids"]
    if token_type_ids is not None and bool(torch.as_tensor(token_type_ids).ne(0).any()):
        raise ValueError("token_type_ids: segment ids other than 0 are not supported (every sampled token is "
                         "fed as segment 0)")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor (or a tokenizer's BatchEncoding), got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, P] with B, P >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be integer token ids (int64 or int32), got {input_ids.dtype}")
    model_device = next(model.parameters()).device
    if input_ids.device != model_device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {model_device}")
    if attention_mask is None:
        attention_mask = _inferred_attention_mask(model, input_ids, pad_token_id)
        if attention_mask is not None and bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("input_ids has a prompt that is all padding (pad id everywhere, no attention_mask given)")
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"{tuple(input_ids.shape)}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("attention_mask has a prompt with no tokens (all padding)")
    if attention_mask is not None:
        input_ids, attention_mask = left_align(input_ids, attention_mask)
    check_token_ids("input_ids", input_ids, model_vocab(model))
    return input_ids, attention_mask


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Move each row's padding (``attention_mask == 0``) to the left, the real tokens keeping their order.

    ``input_ids``, ``attention_mask``: ``[B, P]``. Returns them as they are when every row is
    already left-padded, else new ``[B, P]`` tensors (a stable sort of the columns by the mask).
    """
    real = attention_mask != 0
    if bool((real[:, 1:] >= real[:, :-1]).all()):
        return input_ids, attention_mask
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)
