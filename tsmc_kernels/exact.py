"""Exact answers on tiny models by enumeration: the target, ``log Z``, the optimal twist.

For a vocabulary of a few tokens and a few new tokens every completion can be listed, so the
target ``sigma ∝ p0 * phi``, its partition function and the optimal twist
``psi*_t(s_1:t) = E_p0[phi | s_1:t]`` are computable exactly. Tests, bounds (exact target
samples) and the power sampler's checks use this module.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .potentials.base import as_potential


@dataclass
class Enumeration:
    """Every completion of one prompt.

    Attributes:
        completions: int64 ``[S, T]`` padded after EOS with the pad id.
        lengths: int64 ``[S]`` (EOS included).
        log_p0: fp64 ``[S]`` ``log p0(completion | prompt)``; sums to 1 in probability.
        log_phi: fp64 ``[S]`` (zeros until :meth:`with_potential`).
        prompt: int64 ``[P]`` the prompt's tokens (what :func:`enumerate_completions` was given).
    """

    completions: torch.Tensor
    lengths: torch.Tensor
    log_p0: torch.Tensor
    log_phi: torch.Tensor
    eos: tuple
    pad: int
    vocab_size: int
    prompt: torch.Tensor | None = None

    def keys(self) -> list[tuple]:
        """Completions as tuples without padding (dictionary keys)."""
        return [tuple(c[:n].tolist()) for c, n in zip(self.completions, self.lengths)]

    def with_potential(self, potential, *, texts=None, prompt_index: int = 0) -> "Enumeration":
        """A copy with ``log_phi`` evaluated by ``potential`` (protocol of :mod:`tsmc_kernels.potentials`;
        ``texts``: the completions decoded, for a text potential; ``prompt_index``: the prompt's index
        the potential sees, for per-prompt potentials)."""
        fn = as_potential(potential)
        log_phi = fn(self.completions, texts=texts,
                     prompt_index=torch.full((len(self.lengths),), int(prompt_index), dtype=torch.int64))
        return dataclasses.replace(self, log_phi=log_phi.double())

    @property
    def log_z(self) -> float:
        """``log Z = log sum p0 phi``."""
        return float(torch.logsumexp(self.log_p0 + self.log_phi, 0))

    def target(self, alpha: float = 1.0) -> torch.Tensor:
        """fp64 ``[S]``: ``sigma ∝ p0^alpha * phi`` normalised."""
        lw = alpha * self.log_p0 + self.log_phi
        return torch.softmax(lw, 0)

    def index(self, completions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``[K]``: the enumeration index of each row of ``completions [K, T']`` (-1 if absent)."""
        table = {k: i for i, k in enumerate(self.keys())}
        out = []
        for r, row in enumerate(completions.tolist()):
            n = int(lengths[r]) if lengths is not None else _length(row, self.eos)
            out.append(table.get(tuple(row[:n]), -1))
        return torch.tensor(out, dtype=torch.int64)

    def optimal_twist(self) -> "TableTwist":
        """The optimal twist ``psi*`` as a callable twist for :func:`tsmc_kernels.smc_generate`."""
        num, den = {}, {}
        p0phi = torch.exp(self.log_p0 + self.log_phi).tolist()
        p0 = torch.exp(self.log_p0).tolist()
        for key, a, b in zip(self.keys(), p0phi, p0):
            for t in range(1, len(key) + 1):
                num[key[:t]] = num.get(key[:t], 0.0) + a
                den[key[:t]] = den.get(key[:t], 0.0) + b
        table = {k: (math.log(num[k] / den[k]) if num[k] > 0 else -math.inf) for k in num}
        return TableTwist(table, self.vocab_size)


def _length(row: list, eos: tuple) -> int:
    """Up to the first EOS, else the whole row (the pad id may be a completion's last real token)."""
    for i, v in enumerate(row):
        if v in eos:
            return i + 1
    return len(row)


class TableTwist:
    """A twist given by a table ``prefix tuple -> log psi`` (missing entries: ``default``).

    Called as ``twist(hidden [M, H], completion_ids [M, t]) -> [M, V]``; row ``m``'s entry ``v`` is
    ``table[(*completion_ids[m], v)]``. Rows are assumed to belong to one prompt.
    """

    def __init__(self, table: dict, vocab_size: int, default: float = 0.0):
        self.table, self.vocab_size, self.default = table, vocab_size, default

    @classmethod
    def random(cls, vocab_size: int, depth: int, *, seed: int, scale: float = 1.0) -> "TableTwist":
        """A valid but deliberately bad twist: ``log psi ~ N(0, scale^2)`` for every prefix of up to
        ``depth`` tokens (a test input: SMC must stay exact under any twist)."""
        g = torch.Generator().manual_seed(seed)
        table, frontier = {}, [()]
        for _ in range(depth):
            nxt = []
            for k in frontier:
                for v, x in enumerate((scale * torch.randn(vocab_size, generator=g)).tolist()):
                    table[k + (v,)] = x
                    nxt.append(k + (v,))
            frontier = nxt
        return cls(table, vocab_size)

    def __call__(self, hidden: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        out = torch.tensor([[self.table.get((*row, v), self.default) for v in range(V)]
                            for row in completion_ids.tolist()], dtype=torch.float32).reshape(-1, V)
        return out.to(hidden.device)


@torch.no_grad()
def enumerate_completions(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id=None,
                          pad_token_id: int | None = None) -> Enumeration:
    """List every completion of ``prompt_ids`` (int64 ``[P]``) up to ``max_new_tokens`` with its ``log p0``.

    Cost: one batched forward per depth over all live prefixes (``V**T`` at most): tiny models only.
    """
    from .sampler.inputs import eos_ids, pad_id

    eos = tuple(eos_ids(model, eos_token_id))
    pad = pad_id(model, pad_token_id, list(eos))
    prompt = prompt_ids.reshape(1, -1)
    live = [((), 0.0)]
    done = []
    for t in range(max_new_tokens):
        ids = torch.tensor([list(prompt[0].tolist()) + list(k) for k, _ in live], dtype=torch.int64)
        logp = torch.log_softmax(model(input_ids=ids.to(prompt.device)).logits[:, -1].double(), -1).cpu()
        V = logp.shape[1]
        nxt = []
        for (k, lp), row in zip(live, logp.tolist()):
            for v in range(V):
                item = (k + (v,), lp + row[v])
                (done if (v in eos or t == max_new_tokens - 1) else nxt).append(item)
        live = nxt
        if not live:
            break
    T = max(len(k) for k, _ in done)
    comps = torch.full((len(done), T), pad, dtype=torch.int64)
    for i, (k, _) in enumerate(done):
        comps[i, : len(k)] = torch.tensor(k)
    lengths = torch.tensor([len(k) for k, _ in done])
    log_p0 = torch.tensor([lp for _, lp in done], dtype=torch.float64)
    return Enumeration(comps, lengths, log_p0, torch.zeros_like(log_p0), eos, pad, V, prompt[0].cpu().clone())
