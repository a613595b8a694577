"""The public kernel API: validation, device dispatch and custom-op registration (SPEC §6).

Data flows one way through an SMC step::

    logits -> twist_sample -> normalize_log_weights -> resample -> kv_gather_ -> next step
                               (or the fused ``reweight`` = normalise + resample in one launch)

Every op is a ``torch.library`` custom op (namespace ``tsmc``) with a fake implementation, so
it traces under ``torch.compile`` and captures in CUDA graphs. ``step`` may be a Python int or
an int64 0-dim tensor on the data's device (a device counter keeps a captured graph replayable).

Backends, chosen per call by device (override with ``TSMC_BACKEND=reference|triton|native``):

* CUDA: Triton kernels (``tsmc_kernels.triton``); the KV gather uses the CUDA C++ kernel when the
  extension was built with CUDA.
* CPU: the C++ extension ``tsmc_kernels._C`` for twist sampling / scoring (fp64, the reference's
  arithmetic and noise), resampling and the gather, the PyTorch reference
  (:mod:`tsmc_kernels.reference`) for the rest. ``TSMC_BACKEND=triton`` with
  ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors (how CI tests them).

Value checks (NaN weights, ancestors out of range) synchronise with the host; they run when
``validate=True`` (the default) and never while a CUDA graph is being captured or under
``torch.compile``. Samplers pass ``validate=False``.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import operator
import os
import warnings
from typing import List, NamedTuple, Optional, Sequence

import torch

from . import reference, rng
from .reference import SCHEMES, NormalizeOutput, TwistSampleOutput

__all__ = ["twist_sample", "twist_score", "normalize_log_weights", "resample", "reweight", "kv_gather_", "ReweightOutput",
           "TwistSampleOutput", "NormalizeOutput", "SCHEMES", "backend_for", "native_available"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

def _load_extension():
    """The C++ extension, or None: a missing build or an ABI mismatch falls back to PyTorch."""
    if importlib.util.find_spec("tsmc_kernels._C") is None:
        return None
    try:
        return importlib.import_module("tsmc_kernels._C")
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(f"tsmc_kernels._C is present but could not be loaded ({exc}); rebuild it against this "
                      "torch with `pip install --no-build-isolation .` (`-e .` in a checkout). Using the PyTorch "
                      "reference on CPU.")
        return None


_C = _load_extension()


def native_available(cuda: bool = False) -> bool:
    """Whether the C++ extension (and, with ``cuda=True``, its CUDA kernels) is loaded."""
    return _C is not None and (not cuda or bool(getattr(_C, "with_cuda", False)))


def backend_for(device: torch.device, op: str = "") -> str:
    """``"triton"``, ``"native"`` or ``"reference"``: the backend an op uses on ``device``."""
    forced = os.environ.get("TSMC_BACKEND")
    if forced:
        if forced not in ("reference", "triton", "native"):
            raise ValueError(f"TSMC_BACKEND must be reference, triton or native, got {forced!r}")
        if forced == "native" and not native_available(device.type == "cuda"):
            return "reference"
        if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(f"TSMC_BACKEND=triton runs Triton kernels on {device.type} tensors only in Triton's "
                               "interpreter: set TRITON_INTERPRET=1 before importing tsmc_kernels, or use CUDA tensors")
        return forced
    if device.type == "cuda":
        if op == "kv_gather" and native_available(cuda=True):
            return "native"
        return "triton"
    if op in ("resample", "kv_gather", "twist_sample", "twist_score") and native_available():
        return "native"
    return "reference"


# ----------------------------------------------------------------------------- validation helpers

def _values_checkable() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_tensor(name: str, t, ndim: int | tuple, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def _as_int(name: str, value) -> int:
    """``value`` as an int (Python, numpy or 0-dim torch integers; not bools or floats), else ``TypeError``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


MIN_TEMPERATURE = 1e-30  # below it logits / T overflow fp32 (the kernels' arithmetic) from |logit| ~ 3e8 on


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``MIN_TEMPERATURE <= temperature < inf`` (NaN refused; an infinite
    temperature would give ``-inf / inf = NaN`` at ``-inf`` logits; a smaller one would overflow the
    fp32 scores ``logits / T`` to ``inf``: ``top_k=1`` is the greedy proposal)."""
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (logits / T would overflow fp32; top_k=1 "
                         f"samples greedily), got {temperature}")


def _check_proposal_options(temperature: float, top_k: int) -> None:
    """The proposal's temperature and top-k, as twist_sample and twist_score take them."""
    check_temperature(temperature)
    if _as_int("top_k", top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


def check_ess_threshold(ess_threshold: float) -> None:
    """Raise ``ValueError`` unless ``ess_threshold >= 0`` (NaN, which would never resample, included)."""
    if not ess_threshold >= 0:
        raise ValueError(f"ess_threshold must be >= 0, got {ess_threshold}")


def _step_tensor(step, device: torch.device, rows: int | None = None) -> torch.Tensor:
    """``step`` as an int64 0-dim tensor, or ``[rows]`` (one step per row) when ``rows`` allows it."""
    if isinstance(step, torch.Tensor):
        per_row = rows is not None and step.dim() == 1 and step.numel() == rows
        if not (step.numel() == 1 or per_row) or step.dtype not in (torch.int64, torch.int32):
            want = "a one-element integer tensor" + (f" or an integer tensor [{rows}]" if rows is not None else "")
            raise ValueError(f"step must be an int or {want}, got {step.dtype} {tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but the data is on {device}")
        return step.to(torch.int64) if per_row else step.reshape(()).to(torch.int64)
    step = _as_int("step", step)
    if not 0 <= step < 2 ** 63:  # an int64 counter
        raise ValueError(f"step must be in [0, 2**63), got {step}")
    return torch.full((), step, dtype=torch.int64, device=device)  # a fill: capturable, unlike torch.tensor


def _seed32(seed: int) -> int:
    return rng.fold_seed(_as_int("seed", seed))


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; expected one of {SCHEMES}")


# ----------------------------------------------------------------------------- twist_sample

@torch.library.custom_op("tsmc::twist_sample", mutates_args=())
def _twist_sample_op(logits: torch.Tensor, log_twist: Optional[torch.Tensor], temperature: float, top_k: int,
                     seed: int, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    backend = backend_for(logits.device, "twist_sample")
    if backend == "triton":
        from .triton.twist_sample import twist_sample_triton
        return tuple(twist_sample_triton(logits, log_twist, temperature=temperature, top_k=top_k, seed=seed, step=step))
    if backend == "native" and _native_twist_inputs(logits, log_twist):
        return tuple(_C.twist_sample(logits, log_twist, temperature, top_k, seed, step, None))
    out = reference.twist_sample(logits, log_twist, temperature=temperature, top_k=top_k, seed=seed, step=step)
    return tuple(t.contiguous() for t in out)


def _native_twist_inputs(logits: torch.Tensor, log_twist: torch.Tensor | None) -> bool:
    """The C++ CPU kernel reads fp32 (bf16 / fp16 widened exactly); fp64 inputs keep the reference."""
    return logits.device.type == "cpu" and all(t is None or t.dtype != torch.float64 for t in (logits, log_twist))


@_twist_sample_op.register_fake
def _(logits, log_twist, temperature, top_k, seed, step):
    M = logits.shape[0]
    f = lambda: logits.new_empty(M, dtype=torch.float32)  # noqa: E731
    return logits.new_empty(M, dtype=torch.int64), f(), f(), f(), f(), f()


def twist_sample(logits: torch.Tensor, log_twist: torch.Tensor | None = None, *, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0, step=0, validate: bool = True) -> TwistSampleOutput:
    """Fused twist scoring + Gumbel-max sampling, one pass over the vocabulary per row (SPEC §6.1).

    Args:
        logits: base-model logits ``[M, V]``, fp32/bf16/fp16.
        log_twist: ``log psi_t(s_<t, v)`` ``[M, V]`` (same device) or ``None`` for ``psi = 1``.
        temperature: proposal temperature ``> 0``; the proposal is
            ``q ∝ exp((log p0 + log psi) / temperature)``.
        top_k: restrict the proposal to entries ``>=`` its k-th largest (0 = off).
        seed: non-negative int; with ``step`` (int, int64 0-dim device tensor, or int64 ``[M]``: one
            step per row) keys the noise of row ``m`` (see :mod:`tsmc_kernels.rng`). The draw is the
            two-level Gumbel-max of :func:`tsmc_kernels.reference.gumbel_max` (a group of 2048
            token ids, then a token in it), the same on every backend.
            An int step must lie in ``[0, 2**63)``; a tensor step's value is not checked (that
            would synchronise with the host).
        validate: check shapes, devices and dtypes (never synchronises).
    Returns:
        :class:`TwistSampleOutput`: ``token`` int64 ``[M]``; ``logp``, ``logq``, ``log_zpi``,
        ``log_psi``, ``entropy`` fp32 ``[M]``. Rows with bad values, on every backend: a NaN or
        ``+inf`` logit gives token 0, NaN ``logp``, ``logq``, ``log_zpi``, ``entropy`` (``log_psi`` is
        ``log_twist[m, 0]``); a NaN or ``+inf`` twist gives token 0 and NaN ``logq``, ``log_zpi``
        (``logp``, ``log_psi``, ``entropy`` as usual); a row whose proposal has no finite entry
        (all ``-inf``) gives token 0 and ``logq = -inf``.
    """
    if validate:
        _check_tensor("logits", logits, 2, _FLOATS)
        if logits.shape[1] < 1:
            raise ValueError("logits must have a non-empty vocabulary dimension")
        if log_twist is not None:
            _check_tensor("log_twist", log_twist, 2, _FLOATS)
            if log_twist.shape != logits.shape:
                raise ValueError(f"log_twist shape {tuple(log_twist.shape)} does not match logits {tuple(logits.shape)}"
                                 " (vocab mismatch between the twist head and the model?)")
            _check_same_device("logits", logits, log_twist=log_twist)
        _check_proposal_options(temperature, top_k)
    step_t = _step_tensor(step, logits.device, rows=logits.shape[0])
    return TwistSampleOutput(*_twist_sample_op(logits, log_twist, float(temperature), int(top_k), _seed32(seed), step_t))


@torch.library.custom_op("tsmc::twist_score", mutates_args=())
def _twist_score_op(logits: torch.Tensor, log_twist: Optional[torch.Tensor], tokens: torch.Tensor, temperature: float,
                    top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend_for(logits.device, "twist_score") == "native" and _native_twist_inputs(logits, log_twist):
        step = torch.zeros(1, dtype=torch.int64)  # unused: no noise when scoring
        return tuple(_C.twist_sample(logits, log_twist, temperature, top_k, 0, step, tokens)[1:])
    out = reference.twist_score(logits, log_twist, tokens, temperature=temperature, top_k=top_k)
    return tuple(t.contiguous() for t in out[1:])


@_twist_score_op.register_fake
def _(logits, log_twist, tokens, temperature, top_k):
    M = logits.shape[0]
    return tuple(logits.new_empty(M, dtype=torch.float32) for _ in range(5))


def twist_score(logits: torch.Tensor, log_twist: torch.Tensor | None, tokens: torch.Tensor, *,
                temperature: float = 1.0, top_k: int = 0, validate: bool = True) -> TwistSampleOutput:
    """:func:`twist_sample`'s outputs for given ``tokens`` (int64 ``[M]``): teacher forcing, no randomness.

    Used by conditional SMC (a forced particle) and twist training. Shapes as in
    :func:`twist_sample`, and so are its values for rows with bad values (the given token is kept);
    a token outside the top-k has ``logq = -inf``. (CPU: the C++ kernel;
    CUDA: the PyTorch reference, since it runs on few rows or off the hot path.) ``validate``: also
    check that every token is in ``[0, V)`` (a host synchronisation; skipped under capture / compile).
    """
    _check_tensor("logits", logits, 2, _FLOATS)
    _check_tensor("tokens", tokens, 1, (torch.int64, torch.int32))
    if tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"tokens has {tokens.shape[0]} rows but logits has {logits.shape[0]}")
    if log_twist is not None:
        _check_tensor("log_twist", log_twist, 2, _FLOATS)
        if log_twist.shape != logits.shape:
            raise ValueError(f"log_twist shape {tuple(log_twist.shape)} does not match logits {tuple(logits.shape)}")
    _check_same_device("logits", logits, tokens=tokens, log_twist=log_twist)
    _check_proposal_options(temperature, top_k)
    if validate and _values_checkable() and tokens.numel() and bool(((tokens < 0) | (tokens >= logits.shape[1])).any()):
        raise ValueError(f"tokens must be in [0, {logits.shape[1]}) (the vocabulary of logits)")
    return TwistSampleOutput(tokens.long(), *_twist_score_op(logits, log_twist, tokens.long(), float(temperature), int(top_k)))


# ----------------------------------------------------------------------------- normalise / resample

def _check_weights(log_w, log_w_inc, validate: bool):
    _check_tensor("log_w", log_w, 2, _FLOATS)
    if log_w.shape[1] < 1:
        raise ValueError("log_w must have at least one particle per prompt")
    if log_w_inc is not None:
        _check_tensor("log_w_inc", log_w_inc, 2, _FLOATS)
        if log_w_inc.shape != log_w.shape:
            raise ValueError(f"log_w_inc shape {tuple(log_w_inc.shape)} does not match log_w {tuple(log_w.shape)} [B, N]")
        _check_same_device("log_w", log_w, log_w_inc=log_w_inc)
    if validate and _values_checkable():
        for name, t in (("log_w", log_w), ("log_w_inc", log_w_inc)):
            if t is not None and bool(torch.isnan(t).any()):
                raise ValueError(f"{name} contains NaN (a potential or twist produced NaN?)")
            if t is not None and bool(torch.isposinf(t).any()):
                raise ValueError(f"{name} contains +inf (a potential or twist produced +inf?)")


@torch.library.custom_op("tsmc::normalize_log_weights", mutates_args=())
def _normalize_op(log_w: torch.Tensor, log_w_inc: Optional[torch.Tensor], ess_threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend_for(log_w.device, "normalize") == "triton":
        from .triton.weights import normalize_triton
        return tuple(normalize_triton(log_w, log_w_inc, ess_threshold=ess_threshold))
    return tuple(t.contiguous() for t in reference.normalize_log_weights(log_w, log_w_inc, ess_threshold=ess_threshold))


@_normalize_op.register_fake
def _(log_w, log_w_inc, ess_threshold):
    B, N = log_w.shape
    return (log_w.new_empty(B, N, dtype=torch.float32), log_w.new_empty(B, dtype=torch.float32),
            log_w.new_empty(B, dtype=torch.float32), log_w.new_empty(B, dtype=torch.bool))


def normalize_log_weights(log_w: torch.Tensor, log_w_inc: torch.Tensor | None = None, *, ess_threshold: float = 0.5,
                          validate: bool = True) -> NormalizeOutput:
    """Add increments, normalise per prompt, ESS, ``log Zhat`` increment, resample decision (SPEC §6.2).

    Args:
        log_w: log weights ``[B, N]``; log_w_inc: increments ``[B, N]`` or ``None``.
        ess_threshold: resample where ``ESS < ess_threshold * N`` (``>= 1``: always; 0: never).
    Returns:
        :class:`NormalizeOutput`: ``log_w`` fp32 ``[B, N]`` (logsumexp 0 per prompt), ``ess`` fp32
        ``[B]``, ``log_z_inc`` fp32 ``[B]``, ``resample`` bool ``[B]``. A prompt whose weights are
        all ``-inf`` gets ``-inf`` weights, ``ess = 0``, ``log_z_inc = -inf`` and no resampling.
    """
    _check_weights(log_w, log_w_inc, validate)
    check_ess_threshold(ess_threshold)
    return NormalizeOutput(*_normalize_op(log_w, log_w_inc, float(ess_threshold)))


def _resample_impl(log_w: torch.Tensor, mask: torch.Tensor, scheme: str, seed: int, step: torch.Tensor,
                   keep_first: bool = False) -> torch.Tensor:
    if keep_first:  # conditional SMC (bounds): an analysis path, reference only
        return reference.resample(log_w, mask, scheme=scheme, seed=seed, step=step, keep_first=True)
    backend = backend_for(log_w.device, "resample")
    if backend == "triton" and scheme in ("systematic", "stratified", "multinomial"):
        from .triton.weights import resample_triton
        return resample_triton(log_w, mask, scheme=scheme, seed=seed, step=step)
    if backend == "native" and log_w.device.type == "cpu":
        return _C.resample(log_w.double().contiguous(), mask.contiguous(), scheme, seed, int(step))
    return reference.resample(log_w, mask, scheme=scheme, seed=seed, step=step)


@torch.library.custom_op("tsmc::resample", mutates_args=())
def _resample_op(log_w: torch.Tensor, resample_mask: torch.Tensor, scheme: str, seed: int,
                 step: torch.Tensor, keep_first: bool) -> torch.Tensor:
    return _resample_impl(log_w, resample_mask, scheme, seed, step, keep_first)


@_resample_op.register_fake
def _(log_w, resample_mask, scheme, seed, step, keep_first):
    return log_w.new_empty(log_w.shape, dtype=torch.int64)


def resample(log_w: torch.Tensor, resample_mask: torch.Tensor | None = None, *, scheme: str = "systematic",
             seed: int = 0, step=0, keep_first: bool = False, validate: bool = True) -> torch.Tensor:
    """Ancestor indices with the permutation property of SPEC §2 (SPEC §6.3).

    Args:
        log_w: log weights ``[B, N]`` (need not be normalised).
        resample_mask: bool ``[B]``, which prompts resample (``None``: all).
        scheme: ``"systematic"`` (default), ``"stratified"``, ``"multinomial"`` or ``"residual"``.
        seed, step: RNG key (prompt ``b`` uses row ``b`` of the resampling stream).
        keep_first: conditional SMC (SPEC §4): particle 0 always survives and the other N-1
            slots are multinomial draws from all N particles (``scheme`` is ignored).
    Returns:
        int64 ``[B, N]``: indices within each prompt's particles; ``a[j] == j`` whenever particle
        ``j`` has an offspring; the identity for prompts that do not resample or are all ``-inf``.
    """
    _check_weights(log_w, None, validate)
    _check_scheme(scheme)
    if resample_mask is None:
        resample_mask = torch.ones(log_w.shape[0], dtype=torch.bool, device=log_w.device)
    _check_tensor("resample_mask", resample_mask, 1, (torch.bool,))
    if resample_mask.shape[0] != log_w.shape[0]:
        raise ValueError(f"resample_mask has {resample_mask.shape[0]} prompts but log_w has {log_w.shape[0]} (B mismatch)")
    _check_same_device("log_w", log_w, resample_mask=resample_mask)
    return _resample_op(log_w, resample_mask, scheme, _seed32(seed), _step_tensor(step, log_w.device), bool(keep_first))


class ReweightOutput(NamedTuple):
    """Outputs of :func:`reweight` (one SMC weighting + resampling step)."""

    log_w: torch.Tensor  # fp32 [B, N], normalised; reset to -log N where the prompt resampled
    ess: torch.Tensor  # fp32 [B], before resampling
    log_z_inc: torch.Tensor  # fp32 [B]
    resampled: torch.Tensor  # bool [B]
    ancestors: torch.Tensor  # int64 [B, N]


@torch.library.custom_op("tsmc::reweight", mutates_args=())
def _reweight_op(log_w: torch.Tensor, log_w_inc: Optional[torch.Tensor], ess_threshold: float, scheme: str, seed: int,
                 step: torch.Tensor, keep_first: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if (not keep_first and backend_for(log_w.device, "reweight") == "triton"
            and scheme in ("systematic", "stratified", "multinomial")):
        from .triton.weights import reweight_triton
        return tuple(reweight_triton(log_w, log_w_inc, ess_threshold=ess_threshold, scheme=scheme, seed=seed, step=step))
    norm = _normalize_op(log_w, log_w_inc, ess_threshold)
    anc = _resample_impl(norm[0], norm[3], scheme, seed, step, keep_first)
    N = log_w.shape[1]
    new_w = torch.where(norm[3][:, None], torch.full_like(norm[0], -math.log(N)), norm[0])
    return new_w, norm[1], norm[2], norm[3], anc


@_reweight_op.register_fake
def _(log_w, log_w_inc, ess_threshold, scheme, seed, step, keep_first):
    B, N = log_w.shape
    return (log_w.new_empty(B, N, dtype=torch.float32), log_w.new_empty(B, dtype=torch.float32),
            log_w.new_empty(B, dtype=torch.float32), log_w.new_empty(B, dtype=torch.bool),
            log_w.new_empty(B, N, dtype=torch.int64))


def reweight(log_w: torch.Tensor, log_w_inc: torch.Tensor | None = None, *, ess_threshold: float = 0.5,
             scheme: str = "systematic", seed: int = 0, step=0, keep_first: bool = False,
             validate: bool = True) -> ReweightOutput:
    """Fused :func:`normalize_log_weights` + :func:`resample` + weight reset: one launch on CUDA.

    Args and shapes as in those two functions. Returns :class:`ReweightOutput` whose ``log_w``
    is already reset to uniform (``-log N``) for the prompts that resampled, and whose
    ``ancestors`` are the identity for the others.
    """
    _check_weights(log_w, log_w_inc, validate)
    _check_scheme(scheme)
    check_ess_threshold(ess_threshold)
    return ReweightOutput(*_reweight_op(log_w, log_w_inc, float(ess_threshold), scheme, _seed32(seed),
                                        _step_tensor(step, log_w.device), bool(keep_first)))


# ----------------------------------------------------------------------------- KV gather

@torch.library.custom_op("tsmc::kv_gather_", mutates_args=("tensors",))
def _kv_gather_op(tensors: List[torch.Tensor], ancestors: torch.Tensor) -> None:
    # Views with gaps between rows are split into dense-row views here, inside the op: traced by
    # torch.compile, that splitting would sort symbolic strides (dynamic shapes: a growing cache).
    tensors = [p for t in tensors for p in reference.dense_row_pieces(t)]
    if not tensors:
        return
    backend = backend_for(ancestors.device, "kv_gather")
    if backend == "native" and ancestors.device.type == "cuda":
        _C.kv_gather_cuda_(tensors, ancestors)
    elif backend == "native":
        _C.kv_gather_(tensors, ancestors)
    elif backend == "triton":
        from .triton.kv_gather import kv_gather_triton_
        kv_gather_triton_(tensors, ancestors)
    else:
        reference.kv_gather_(tensors, ancestors)


@_kv_gather_op.register_fake
def _(tensors, ancestors):
    return None


def kv_gather_(tensors: Sequence[torch.Tensor], ancestors: torch.Tensor, *, validate: bool = True) -> None:
    """Apply ancestors in place along dim 0 of every tensor, copying only rows with ``a[i] != i`` (SPEC §6.4).

    Args:
        tensors: tensors whose dim 0 has ``M = B * N`` rows (every layer's K and V ``[M, H, L, D]``,
            token buffers ``[M, T]``, masks), on the ancestors' device. Any dtype. Views are fine:
            one whose rows have gaps (``k[:, :, P:]``) is split into views with dense rows first.
        ancestors: int64 ``[B, N]`` (indices within each prompt) or ``[M]`` (global row indices),
            satisfying the permutation property (rows that are read are never written).
        validate: check the ancestors' range and permutation property (synchronises with the
            host). Unvalidated, the Triton and CUDA kernels copy nothing for a global row index
            outside ``[0, M)`` (they never read past the rows); the C++ CPU kernel and the
            reference raise.
    Returns:
        None; the tensors are modified in place. Zero work when ``a`` is the identity.
    """
    _check_tensor("ancestors", ancestors, (1, 2), (torch.int64, torch.int32))
    tensors = list(tensors)
    M = ancestors.numel()
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] != M:
            raise ValueError(f"tensors[{i}] has shape {tuple(t.shape)}; dim 0 must equal the {M} particle rows of ancestors")
        _check_same_device("ancestors", ancestors, **{f"tensors[{i}]": t})
    flat = reference.flat_ancestors(ancestors.long()).contiguous()
    if validate and _values_checkable():
        n = ancestors.shape[-1]
        if bool(((ancestors < 0) | (ancestors >= n)).any()):
            raise ValueError(f"ancestors out of range: every entry must lie in [0, {n})")
        moved = flat != torch.arange(M, device=flat.device)
        if bool(moved[flat[moved]].any()):
            raise ValueError("ancestors violate the permutation property: a row that is copied from is also overwritten")
    _kv_gather_op(tensors, flat)  # (returns at once when no tensor has a row piece to copy)
