"""power_sample (SPEC §5) on tiny models whose power target ``p0^alpha`` can be enumerated exactly.

Three kinds of checks:

* **exact**: the MH kernel the sampler implements (its cut distribution and acceptance ratio,
  :func:`tsmc_kernels.power._log_accept`) is built as a matrix over every completion and must
  leave ``p0^alpha`` invariant to rounding error; the same matrix with a wrong ratio must not.
* **statistical**: many chains (prompts x chains in one batched call) run long enough to mix; their
  final states must be within a total-variation tolerance of ``p0^alpha``. Each configuration
  was chosen (with the exact kernel) so that a broken ratio is visibly biased there: truncating
  the current suffix to the proposal's length, dropping the uniform cut's length correction,
  dropping the entropy cut's ``log sum w(x) - log sum w(x')`` correction — each fails at least one
  test below (checked by breaking the code on purpose). Truncation only biases the chain when
  acceptance does not saturate, which on these toy models needs ``alpha < 1`` (then shortening
  moves have ``A < 1``), hence ``alpha = 0.5`` in two tests.
* **oracle**: the KV-arena chain equals the re-decoding reference chain (same random numbers):
  same completions and accept decisions, with left padding, several blocks, compaction and growth.
"""
import math

import pytest
import torch

from tsmc_kernels import power
from tsmc_kernels.exact import enumerate_completions
from tsmc_kernels.models import tiny_random_model
from tsmc_kernels.power import PowerOutput, power_sample, power_sample_reference

from conftest import fresh_seed, fullgraph, no_host_sync, step_test_model

V, EOS, T = 5, 4, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(seed: int, scale: float = 1.0):
    """tiny_random_model(5) with its output layer scaled by ``scale`` (< 1: flatter next-token laws)."""
    m = tiny_random_model(V, seed=seed)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)
    return m



def tv_to_target(out: PowerOutput, model, prompt, alpha: float) -> float:
    ex = enumerate_completions(model, torch.tensor(prompt), out.block_ends[-1])
    B, C, Tp = out.completions.shape
    idx = ex.index(out.completions.reshape(B * C, Tp), out.lengths.reshape(-1))
    assert (idx >= 0).all(), "a chain is not a valid completion"
    est = torch.bincount(idx, minlength=len(ex.lengths)).double() / idx.numel()
    return 0.5 * (est - ex.target(alpha)).abs().sum().item()


# ----------------------------------------------------------------------------- the exact kernel

@torch.no_grad()
def exact_kernel(model, prompt, alpha, cut, cut_power, log_accept=None):
    """``(target [S], K [S, S])``: the MH transition matrix of one move over all completions of length <= T."""
    log_accept = log_accept or exact_ratio
    from tsmc_kernels import ops

    table, frontier = {}, [()]
    for _ in range(T):  # p0, q and entropy after every prefix
        lg = model(input_ids=torch.tensor([list(prompt) + list(k) for k in frontier])).logits[:, -1]
        for k, row in zip(frontier, lg):
            s = ops.twist_score(row.expand(V, V).contiguous(), None, torch.arange(V), temperature=1 / alpha)
            table[k] = (s.logp, s.logq, s.entropy[0])
        frontier = [k + (v,) for k in frontier for v in range(V) if v != EOS]
    states = []
    stack = [()]
    while stack:
        k = stack.pop()
        for v in range(V):
            (states if v == EOS or len(k) + 1 == T else stack).append(k + (v,))
    S = len(states)
    sc = power._Scores(*(torch.zeros(S, T) for _ in range(3)), torch.tensor([len(s) for s in states]))
    toks = torch.full((S, T), -1)
    for i, s in enumerate(states):
        toks[i, :len(s)] = torch.tensor(s)
        for t, v in enumerate(s):
            a, b, h = table[s[:t]]
            sc.logp[i, t], sc.logq[i, t], sc.ent[i, t] = a[v], b[v], h
    p_cut = torch.softmax(power._log_cut_weights(sc.ent, sc.length, cut, cut_power), 1)
    K = torch.zeros(S, S, dtype=torch.float64)
    for i in range(S):
        for c in range(int(sc.length[i])):
            if p_cut[i, c] == 0:
                continue
            js = ((toks[:, :c] == toks[i, :c]).all(1) & (sc.length > c)).nonzero()[:, 0]
            old = power._Scores(*(x[i:i + 1].expand(len(js), *x.shape[1:]) for x in sc))
            new = power._Scores(*(x[js] for x in sc))
            cc = torch.full((len(js),), c)
            la = log_accept(old, new, cc, alpha=alpha, cut=cut, cut_power=cut_power)
            K[i, js] += p_cut[i, c] * power._suffix_sum(new.logq, cc, new.length).exp() * la.clamp(max=0).exp()
    K[range(S), range(S)] += 1 - K.sum(1)
    return torch.softmax(alpha * sc.logp.double().sum(1), 0), K


def _at(lw, c):
    return lw.gather(1, c[:, None])[:, 0] - torch.logsumexp(lw, 1)


def exact_ratio(old, new, c, *, alpha, cut, cut_power):
    """The sampler's ``log A`` (``power._log_accept`` with both states' cut weights)."""
    return power._log_accept(old, new, c, power._log_cut_weights(old.ent, old.length, cut, cut_power),
                             power._log_cut_weights(new.ent, new.length, cut, cut_power), alpha=alpha)


def truncated_ratio(old, new, c, *, alpha, cut, cut_power):
    """The public code's bug: the current suffix truncated to the proposal's length."""
    end = torch.minimum(old.length, new.length)
    la = exact_ratio(power._Scores(old.logp, old.logq, old.ent, end), new, c, alpha=alpha, cut=cut,
                     cut_power=cut_power)
    return la + _at(power._log_cut_weights(old.ent, end, cut, cut_power), c) - _at(
        power._log_cut_weights(old.ent, old.length, cut, cut_power), c)


def ratio_without_cut_term(old, new, c, *, alpha, cut, cut_power):
    la = exact_ratio(old, new, c, alpha=alpha, cut=cut, cut_power=cut_power)
    return la - _at(power._log_cut_weights(new.ent, new.length, cut, cut_power), c) + _at(
        power._log_cut_weights(old.ent, old.length, cut, cut_power), c)


# Two toy targets: flat next-token laws (acceptance rarely saturates at alpha < 1) and a prompt
# after which EOS is nearly certain and the first entropy is small (the entropy-cut term matters).
FLAT, EOS_FIRST = (0, 0.5, [3]), (0, 1.0, [2, 3])


@pytest.mark.parametrize("cut,cut_power", [("uniform", 4.0), ("entropy", 4.0), ("entropy", 1.0)])
@pytest.mark.parametrize("alpha", [0.5, 4.0])
@pytest.mark.parametrize("toy_model", [FLAT, EOS_FIRST], ids=["flat", "eos-first"])
def test_exact_kernel_leaves_power_target_invariant(toy_model, alpha, cut, cut_power):
    seed, scale, prompt = toy_model
    target, K = exact_kernel(toy(seed, scale), prompt, alpha, cut, cut_power)
    # The diagonal is 1 - (moves away); where nearly every move is accepted it is ~0 and the fp32
    # proposal probabilities (summing to 1 within ~1e-7) can leave it a rounding error below 0.
    assert (K >= -1e-6).all() and torch.allclose(K.sum(1), torch.ones(len(K), dtype=K.dtype))
    assert (target @ K - target).abs().sum() < 1e-9


@pytest.mark.parametrize("broken,toy_model,alpha,cut", [
    (truncated_ratio, FLAT, 0.5, "uniform"), (truncated_ratio, FLAT, 0.5, "entropy"),
    (ratio_without_cut_term, EOS_FIRST, 1.0, "uniform"), (ratio_without_cut_term, EOS_FIRST, 1.0, "entropy"),
])
def test_exact_kernel_with_a_wrong_ratio_is_not_invariant(broken, toy_model, alpha, cut):
    """The invariance check has teeth: each known-wrong ratio moves the target by > 1% in one move."""
    seed, scale, prompt = toy_model
    target, K = exact_kernel(toy(seed, scale), prompt, alpha, cut, 4.0, broken)
    assert (target @ K - target).abs().sum() > 1e-2


# ----------------------------------------------------------------------------- statistical convergence

# (model seed, output scale, prompt, alpha, cut, cut_power, block_size, n_mcmc, tolerance)
CONVERGENCE = {
    "uniform-alpha0.5": (0, 0.5, [3], 0.5, "uniform", 4.0, T, 6, 0.055),
    "entropy-alpha0.5": (0, 0.5, [3], 0.5, "entropy", 4.0, T, 6, 0.055),
    "uniform-alpha1": (0, 1.0, [2, 3], 1.0, "uniform", 4.0, T, 10, 0.015),
    "entropy-alpha1-blocks": (0, 1.0, [2, 3], 1.0, "entropy", 4.0, 1, 4, 0.015),
    "uniform-alpha4": (0, 0.7, [0, 1, 2], 4.0, "uniform", 4.0, T, 30, 0.03),
    "entropy-alpha4-blocks": (0, 0.7, [0, 1, 2], 4.0, "entropy", 4.0, 2, 20, 0.03),
}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_chains_converge_to_power_target(name):
    seed, scale, prompt, alpha, cut, cut_power, block_size, n_mcmc, tol = CONVERGENCE[name]
    model = toy(seed, scale)
    out = power_sample(model, torch.tensor([prompt] * 32), num_chains=256, alpha=alpha, cut=cut,
                       cut_power=cut_power, max_new_tokens=T, block_size=block_size, n_mcmc=n_mcmc,
                       seed=fresh_seed())
    tv = tv_to_target(out, model, prompt, alpha)
    assert tv < tol, f"TV(chains, p0^alpha) = {tv:.4f} >= {tol}"
    assert out.acceptance.shape == (32, 256, len(out.block_ends)) and out.acceptance_rate is out.acceptance


# ----------------------------------------------------------------------------- cached chain == re-decoding chain

def checked_settle(settle, prompt_mask):
    """Wrap ``_Chains.settle``: after it, each row's unmasked committed arena columns must be exactly
    its prompt columns plus the columns of its fed tokens ``s_0 .. s_{L-1}`` (no stale or missing column)."""
    def wrapped(self):
        settle(self)
        arena, L = self.arena, self.scores.length
        n = int(arena.column)  # columns written so far (the host's counter moves after the step)
        chains = self.M // prompt_mask.shape[0]
        want = torch.zeros(self.M, n, dtype=torch.long)
        want[:, :arena.Pp] = prompt_mask[:, :arena.Pp].repeat_interleave(chains, 0)
        for m in range(self.M):
            want[m, self.col[m, :L[m]]] = 1
        assert torch.equal(arena.mask[:, :n], want)
        assert (arena.mask[:, n:] == 0).all()
    return wrapped


# Mistral: sliding-window layers whose window (18) just holds the arena (Pp + 2T + room = 3 + 14 + 1 columns).
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("cut", ["entropy", "uniform"])
def test_cached_chain_equals_redecoding_chain(arch, cut, monkeypatch):
    model = tiny_random_model(V, arch=arch, seed=1, sliding_window=18)
    ids = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2], [4, 4, 4, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])  # left padding; a 1-token prompt
    kw = dict(num_chains=4, max_new_tokens=7, block_size=3, n_mcmc=3, cut=cut, cut_power=2.0, alpha=2.0,
              top_k=4 if cut == "uniform" else 0, seed=fresh_seed())
    compactions = []
    orig = power._Arena.compact
    monkeypatch.setattr(power._Arena, "compact", lambda self, *a: compactions.append(1) or orig(self, *a))
    monkeypatch.setattr(power._Chains, "settle", checked_settle(power._Chains.settle, mask))
    a = power_sample(model, ids, mask, **kw)
    b = power_sample_reference(model, ids, mask, **kw)
    assert compactions, "the arena was never compacted: the test does not cover compaction"
    assert torch.equal(a.completions, b.completions)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.acceptance, b.acceptance)
    assert a.tokens_decoded == b.tokens_decoded
    torch.testing.assert_close(a.log_p0, b.log_p0, atol=1e-4, rtol=0)
    assert 0 < a.acceptance.mean() < 1, "the test should see both accepts and rejects"


def test_sliding_window_must_hold_the_run():
    """A window shorter than the arena (Pp + 2T + room columns) is refused, naming the numbers; the
    reference sampler (plain HF decoding) runs it."""
    model = tiny_random_model(V, arch="mistral", seed=1, sliding_window=17)
    ids = torch.tensor([[0, 1, 2, 3]])
    kw = dict(max_new_tokens=7, block_size=3, n_mcmc=1)
    with pytest.raises(NotImplementedError, match="spans 18 key/value columns.*sliding window of 17"):
        power_sample(model, ids, **kw)
    assert power_sample_reference(model, ids, **kw).completions.shape == (1, 1, 7)


def test_worst_case_cuts_fit_the_fixed_arena(monkeypatch):
    """Every cut at 0: each proposal re-decodes the whole completion, so the arena (a StaticCache of
    P - 1 + 2T + room(T) columns that never grows, of which P - 1 + 2 * limit + room(limit) are
    attended, limit = the widest running block's) compacts again and again, also in the middle of proposals; the chains stay exact."""
    monkeypatch.setattr(power, "_choose_cut", lambda log_w, u: torch.zeros(log_w.shape[0], dtype=torch.int64))
    compactions = []
    orig = power._Arena.compact
    monkeypatch.setattr(power._Arena, "compact", lambda self, *a: compactions.append(1) or orig(self, *a))
    widths = []
    widen = power._Arena.widen
    monkeypatch.setattr(power._Arena, "widen", lambda self, limit: widen(self, limit) or widths.append(self.capacity))
    model = tiny_random_model(V, seed=2)
    kw = dict(num_chains=3, max_new_tokens=6, block_size=2, n_mcmc=5, cut="uniform", seed=fresh_seed())
    ids = torch.tensor([[1, 2], [3, 3]])
    monkeypatch.setattr(power._Chains, "settle", checked_settle(power._Chains.settle, torch.ones_like(ids)))
    a, b = power_sample(model, ids, **kw), power_sample_reference(model, ids, **kw)
    assert len(compactions) >= 3
    assert sorted(set(widths)) == [1 + 2 * n + power._room(n) for n in (2, 4, 6)], "Pp + 2 * limit + room"
    assert torch.equal(a.completions, b.completions) and torch.equal(a.acceptance, b.acceptance)


def test_step_reads_no_python_counter(monkeypatch):
    """What CUDA graph replay needs: the step (decode, then settle the finished moves and start the
    next ones) takes every index from device tensors. With the host's column counter poisoned while
    each step runs, the chains are unchanged."""
    model = tiny_random_model(V, seed=1)
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = dict(num_chains=3, max_new_tokens=7, block_size=3, n_mcmc=3, cut="entropy", seed=fresh_seed())
    want = power_sample(model, ids, mask, **kw)
    step = power._Chains.step

    def poisoned(self):
        saved, self.arena.length = self.arena.length, -10**6
        try:
            step(self)
        finally:
            self.arena.length = saved
    monkeypatch.setattr(power._Chains, "step", poisoned)
    got = power_sample(model, ids, mask, **kw)
    assert torch.equal(want.completions, got.completions) and torch.equal(want.acceptance, got.acceptance)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_compiles_without_graph_breaks(monkeypatch, arch):
    """The step (HF forward on the arena, sampling, MH decisions, next moves) traces as one graph:
    nothing in it synchronises with the host, as CUDA graph capture requires; and the traced step
    gives the same chains."""
    model = step_test_model(V, arch, seed=1)
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = dict(num_chains=3, max_new_tokens=7, block_size=3, n_mcmc=2, cut="entropy", seed=fresh_seed())
    want = power_sample(model, ids, mask, **kw)
    monkeypatch.setattr(power._Chains, "step", fullgraph(power._Chains.step))
    got = power_sample(model, ids, mask, **kw)
    assert torch.equal(want.completions, got.completions) and torch.equal(want.acceptance, got.acceptance)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("cut", ["entropy", "uniform"])
def test_step_runs_without_host_sync(monkeypatch, arch, cut):
    """The captured step, run eagerly as a capture runs it (HF's own code takes other branches under
    dynamo): no op in it reads a device value on the host or makes a tensor from host data
    (``conftest._HostSyncGuard``). Several EOS ids, so that an EOS test that sorts would show."""
    model = step_test_model(V, arch, seed=1)
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = dict(num_chains=3, max_new_tokens=7, block_size=3, n_mcmc=2, cut=cut, eos_token_id=[V - 1, V - 2, 3],
              seed=fresh_seed())
    want = power_sample(model, ids, mask, **kw)
    monkeypatch.setattr(power._Chains, "step", no_host_sync(power._Chains.step))
    got = power_sample(model, ids, mask, **kw)
    assert torch.equal(want.completions, got.completions) and torch.equal(want.acceptance, got.acceptance)


@pytest.mark.gpu
@pytest.mark.parametrize("cut", ["entropy", "uniform"])
def test_cuda_graph_equals_eager(cuda_device, cut):
    model = step_test_model(V, "qwen2", seed=1).to(cuda_device)  # grouped-query: packed attention
    ids = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]], device=cuda_device)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], device=cuda_device)
    kw = dict(num_chains=4, max_new_tokens=12, block_size=4, n_mcmc=3, cut=cut, seed=fresh_seed())
    eager = power_sample(model, ids, mask, **kw)
    graph = power_sample(model, ids, mask, cuda_graph=True, **kw)
    assert torch.equal(eager.completions, graph.completions)
    assert torch.equal(eager.acceptance, graph.acceptance)
    assert eager.tokens_decoded == graph.tokens_decoded and eager.forward_passes == graph.forward_passes
    torch.testing.assert_close(eager.log_p0, graph.log_p0, atol=1e-5, rtol=0)


def test_padding_does_not_change_the_chain():
    """Left, right (a tokenizer's default, left-aligned first) and inner padding."""
    model = tiny_random_model(V, seed=1)
    kw = dict(num_chains=3, max_new_tokens=5, block_size=2, n_mcmc=2, seed=fresh_seed())
    plain = power_sample(model, torch.tensor([[1, 2, 3]]), **kw)
    for ids, mask in (([4, 4, 1, 2, 3], [0, 0, 1, 1, 1]), ([1, 2, 3, 4, 4], [1, 1, 1, 0, 0]),
                      ([1, 4, 2, 3], [1, 0, 1, 1])):
        padded = power_sample(model, torch.tensor([ids]), torch.tensor([mask]), **kw)
        assert torch.equal(plain.completions, padded.completions)
        torch.testing.assert_close(plain.log_p0, padded.log_p0, atol=1e-4, rtol=0)


def test_padding_is_inferred_without_a_mask():
    model = tiny_random_model(V, seed=1, eos_token_id=3)
    model.generation_config.pad_token_id = 4  # not the EOS id: marks padding as in generate
    kw = dict(num_chains=2, max_new_tokens=4, block_size=2, n_mcmc=1, seed=fresh_seed())
    ids = torch.tensor([[4, 4, 1, 2], [1, 2, 0, 1]])
    a, b = power_sample(model, ids, **kw), power_sample(model, ids, (ids != 4).long(), **kw)
    assert torch.equal(a.completions, b.completions)


# ----------------------------------------------------------------------------- outputs, EOS, determinism

def test_outputs_eos_and_log_p0():
    model = toy(3)
    prompt = torch.tensor([[0, 1, 2], [2, 2, 1]])
    out = power_sample(model, prompt, num_chains=64, max_new_tokens=4, block_size=2, n_mcmc=2, seed=1)
    B, C, Tp = out.completions.shape
    assert (B, C) == (2, 64) and Tp == int(out.lengths.max()) <= 4 and out.num_blocks == 2
    assert out.block_ends == [2, 4]
    assert torch.equal(out.sequences[:, :, :3], prompt[:, None].expand(2, 64, 3))
    assert torch.equal(out.sequences[:, :, 3:], out.completions)
    assert out.acceptance.shape == (2, 64, 2) and ((out.acceptance >= 0) & (out.acceptance <= 1)).all()
    assert out.best().shape == (2, 3 + Tp)

    class Digits:
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(map(str, row)) for row in rows]

    texts = out.texts(Digits())
    assert [len(t) for t in texts[1]] == out.lengths[1].tolist() and repr(out).startswith("PowerOutput(completions=int64")
    comps, lengths = out.completions.reshape(-1, Tp), out.lengths.reshape(-1)
    short = lengths < 4
    assert short.any(), "the toy model must produce EOS"
    for row, n in zip(comps, lengths):
        assert (row[: n - 1] != EOS).all()  # EOS only as the last token
        assert n == 4 or row[n - 1] == EOS
        assert (row[n:] == EOS).all()  # padded with the pad id (= EOS for the toy model)
    # log p0 is the teacher-forced probability of each completion
    ex = enumerate_completions(model, prompt[1], 4)
    idx = ex.index(out.completions[1], out.lengths[1])
    torch.testing.assert_close(out.log_p0[1].double(), ex.log_p0[idx], atol=1e-4, rtol=0)
    assert out.tokens_decoded >= int(out.lengths.sum())


def test_eos_chain_is_not_grown():
    model = toy(3)
    out = power_sample(model, torch.tensor([[0, 1, 2]]), num_chains=256, max_new_tokens=4, block_size=2, n_mcmc=0,
                       seed=3)
    ends_early = (out.completions[0, :, :2] == EOS).any(1)
    assert ends_early.any() and (out.lengths[0][ends_early] <= 2).all()
    assert (out.lengths[0][~ends_early] > 2).all()
    assert torch.isnan(out.acceptance).all()  # no MH moves
    assert out.tokens_decoded == int(out.lengths.sum())


def test_same_seed_same_chain_and_progress_bar(capsys):
    model = tiny_random_model(V, seed=1)
    kw = dict(num_chains=4, max_new_tokens=4, block_size=2, n_mcmc=2)
    a = power_sample(model, torch.tensor([[1, 2]]), seed=5, progress="power-entropy", **kw)
    assert capsys.readouterr().err.split("\r")[-1].startswith("power-entropy:")
    b = power_sample(model, torch.tensor([[1, 2]]), seed=5, **kw)
    c = power_sample(model, torch.tensor([[1, 2]]), seed=6, **kw)
    assert torch.equal(a.completions, b.completions) and torch.equal(a.acceptance, b.acceptance)
    assert not (torch.equal(a.completions, c.completions) and torch.equal(a.acceptance, c.acceptance))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=math.inf), "alpha"), (dict(alpha=1e31), "alpha"),
    (dict(cut="middle"), "cut rule"), (dict(cut_power=0.0), "cut_power"),
    (dict(block_size=0), "block_size"), (dict(n_mcmc=-1), "n_mcmc"), (dict(num_chains=0), "num_chains"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"), (dict(seed=-1), "seed"),
    (dict(cuda_graph=True), "CUDA device"),
])
def test_bad_arguments_raise(kwargs, match):
    model = tiny_random_model(V, seed=0)
    with pytest.raises(ValueError, match=match):
        power_sample(model, torch.tensor([[1, 2]]), **{"max_new_tokens": 2, **kwargs})


def test_numpy_and_torch_integers_are_ints():
    import numpy as np
    model = tiny_random_model(V, seed=0)
    ids = torch.tensor([[1, 2]])
    plain = power_sample(model, ids, num_chains=2, max_new_tokens=3, block_size=2, n_mcmc=2, top_k=3, seed=4)
    other = power_sample(model, ids, num_chains=np.int64(2), max_new_tokens=torch.tensor(3), block_size=np.int16(2),
                         n_mcmc=np.uint8(2), top_k=np.int32(3), seed=np.int64(4))
    assert torch.equal(plain.completions, other.completions) and torch.equal(plain.acceptance, other.acceptance)
    # **tok(...) of a tokenizer that returns token_type_ids (all 0) works as with generate.
    typed = power_sample(model, input_ids=ids, token_type_ids=torch.zeros_like(ids), num_chains=2, max_new_tokens=3,
                         block_size=2, n_mcmc=2, top_k=3, seed=4)
    assert torch.equal(plain.completions, typed.completions)
    with pytest.raises(ValueError, match="token_type_ids"):
        power_sample(model, ids, token_type_ids=torch.ones_like(ids), max_new_tokens=3)


def test_bad_inputs_raise():
    model = tiny_random_model(V, seed=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        power_sample(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        power_sample(model, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="only 0 .*and 1"):
        power_sample(model, torch.tensor([[1, 2]]), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="alpha must be a Python number"):
        power_sample(model, torch.tensor([[1, 2]]), alpha=torch.tensor(2.0))
    with pytest.raises(ValueError, match="vocabulary"):
        power_sample(model, torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        power_sample(model, torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        power_sample(model, [[1, 2]])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="the model is on"):
            power_sample(model, torch.tensor([[1, 2]], device="cuda"))


@pytest.mark.parametrize("sampler", ["power_sample", "power_sample_reference"])
def test_prompt_too_long_for_the_model(sampler):
    # GPT-2's learned positions would fail with an IndexError deep inside the model.
    model = tiny_random_model(V, arch="gpt2", max_positions=8)
    with pytest.raises(ValueError, match="exceeds the model's 8 positions"):
        getattr(power, sampler)(model, torch.tensor([[1, 2, 3, 1, 2, 3]]), max_new_tokens=3, n_mcmc=1)
    getattr(power, sampler)(model, torch.tensor([[1, 2, 3, 1, 2, 3]]), max_new_tokens=2, n_mcmc=1)  # fits
    # Padding takes no position: 2 real tokens + 6 new fit in 8 positions.
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.tensor([[0] * 5 + [1] * 2, [0] * 6 + [1]])
    out = getattr(power, sampler)(model, ids, mask, max_new_tokens=6, block_size=3, n_mcmc=2, eos_token_id=[])
    assert out.completions.shape == (2, 1, 6)


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("sampler", ["power_sample", "power_sample_reference"])
def test_bad_logits_are_an_error(sampler, bad):
    model = tiny_random_model(8, seed=0)

    def spoil(module, args, logits):
        if bad == "all -inf":
            return torch.full_like(logits, -math.inf)
        return logits.index_fill(-1, torch.tensor([3]), float(bad.lstrip("+")))
    model.lm_head.register_forward_hook(spoil)
    with pytest.raises(FloatingPointError, match=r"NaN, \+inf or all -inf logits"):
        getattr(power, sampler)(model, torch.tensor([[1, 2]]), max_new_tokens=4, block_size=2, n_mcmc=1)


@pytest.mark.parametrize("cut", ["entropy", "uniform"])
def test_one_settle_per_step_without_eos(monkeypatch, cut):
    """Without EOS ids every move decodes at least one token, so the step settles once: the same
    chains, tokens and forward passes as settling twice."""
    model = tiny_random_model(V, seed=1)
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = dict(num_chains=3, max_new_tokens=7, block_size=3, n_mcmc=2, cut=cut, eos_token_id=[], seed=fresh_seed())
    once = power_sample(model, ids, mask, **kw)

    def twice(self):
        self.decode_step()
        self.settle()
        self.settle()
    monkeypatch.setattr(power._Chains, "step", twice)
    both = power_sample(model, ids, mask, **kw)
    assert torch.equal(once.completions, both.completions) and torch.equal(once.acceptance, both.acceptance)
    assert once.forward_passes == both.forward_passes and once.tokens_decoded == both.tokens_decoded
