"""The result of :func:`tsmc_kernels.smc_generate`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def compact_repr(obj) -> str:
    """``Name(field=int64[2, 4, 9], ..., steps=9)``: tensors by dtype and shape, not by value."""
    def show(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
        return repr(v)
    fields = ", ".join(f"{f.name}={show(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
    return f"{type(obj).__name__}({fields})"


def decode_completions(tokenizer, completions: torch.Tensor, lengths: torch.Tensor, **decode_kw) -> list[list[str]]:
    """``completions`` int64 ``[B, N, T']`` cut at ``lengths`` ``[B, N]`` and decoded with
    ``tokenizer.batch_decode`` (``decode_kw``; default ``skip_special_tokens=True``): ``[B][N]`` strings."""
    decode_kw.setdefault("skip_special_tokens", True)
    B, N = lengths.shape
    rows = [completions[b, n, :int(lengths[b, n])].tolist() for b in range(B) for n in range(N)]
    texts = tokenizer.batch_decode(rows, **decode_kw)
    return [texts[b * N:(b + 1) * N] for b in range(B)]


class ZeroWeightWarning(UserWarning):
    """Warned by :func:`~tsmc_kernels.smc_generate` when every particle of a prompt has zero weight
    (its ``log_z`` is ``-inf``). Silence it with
    ``warnings.simplefilter("ignore", tsmc_kernels.ZeroWeightWarning)`` where that is expected (rare
    rewards); the library's own callers (bounds, twist training) do."""


@dataclass(repr=False)
class SMCOutput:
    """Particles, weights and diagnostics of one SMC run (``B`` prompts x ``N`` particles).

    Attributes:
        sequences: int64 ``[B, N, P + T']`` prompt then completion (like ``generate``; a
            right-padded prompt appears left-aligned).
        completions: int64 ``[B, N, T']`` completion ids, padded after EOS with the pad id.
        lengths: int64 ``[B, N]`` completion lengths (EOS included).
        log_weights: fp32 ``[B, N]`` normalised log weights (``logsumexp == 0`` per prompt;
            all ``-inf`` for a prompt whose particles all have zero weight).
        log_z: fp64 ``[B]`` the running ``log Zhat`` (``Zhat`` is unbiased for ``Z``).
        ess: fp32 ``[B, S]`` effective sample size after each reweighting; ``S = steps``, or
            ``steps + 1`` when ``sync_every > 1`` applied potentials after the last token.
        resampled: bool ``[B, S]`` whether the prompt resampled at that reweighting.
        ancestors: int64 ``[B, S, N]`` ancestor indices applied after each reweighting.
        log_phi: fp32 ``[B, N]`` final log potential of every particle.
        log_p0: fp32 ``[B, N]`` ``log p0(completion | prompt)``.
        log_q: fp32 ``[B, N]`` ``log`` of the proposal probability of each particle's tokens.
        tokens_decoded: number of (particle, step) tokens decoded for unfinished particles.
        steps: number of decoding steps run: ``T'`` (the longest completion), or up to
            ``sync_every - 1`` more when ``sync_every > 1`` noticed late that every particle had finished.
    """

    sequences: torch.Tensor
    completions: torch.Tensor
    lengths: torch.Tensor
    log_weights: torch.Tensor
    log_z: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    ancestors: torch.Tensor
    log_phi: torch.Tensor
    log_p0: torch.Tensor
    log_q: torch.Tensor
    tokens_decoded: int
    steps: int

    __repr__ = compact_repr

    def texts(self, tokenizer, **decode_kw) -> list[list[str]]:
        """The completions as text, ``[B][N]`` strings (each cut at its length; ``decode_kw`` go to
        ``tokenizer.batch_decode``, default ``skip_special_tokens=True``). ``sequences`` is
        ``[B, N, P + T']``: decode it with ``.flatten(0, 1)``."""
        return decode_completions(tokenizer, self.completions, self.lengths, **decode_kw)

    @property
    def ancestry(self) -> torch.Tensor:
        """int64 ``[B, S, N]``: :attr:`ancestors` (the issue's name for it)."""
        return self.ancestors

    @property
    def weights(self) -> torch.Tensor:
        """Normalised weights ``[B, N]`` (zeros for a dead prompt)."""
        return torch.exp(self.log_weights)

    def best_index(self) -> torch.Tensor:
        """int64 ``[B]``: the particle with the largest weight in each prompt."""
        return self.log_weights.argmax(dim=1)

    def best(self) -> torch.Tensor:
        """int64 ``[B, P + T']``: the highest-weight sequence of each prompt."""
        idx = self.best_index()
        return self.sequences[torch.arange(self.sequences.shape[0]), idx]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """int64 ``[B, P + T']``: one sequence per prompt drawn with probability ``W``.

        A prompt whose weights are all zero falls back to uniform.
        """
        w = self.weights.double().cpu()
        dead = w.sum(1) <= 0
        w[dead] = 1.0
        idx = torch.multinomial(w, 1, generator=generator)[:, 0].to(self.sequences.device)
        return self.sequences[torch.arange(self.sequences.shape[0], device=idx.device), idx]
