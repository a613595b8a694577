"""Twist heads, losses and training on a tiny model whose optimal twist is known exactly.

The model has 5 tokens (EOS = 4), the prompt is [0, 1, 2] and completions have at most 3 tokens,
so :mod:`tsmc_kernels.exact` lists every completion and gives ``log Z`` and ``psi*_t``. B
identical prompts in one SMC call are B independent runs, so one call gives many replicas of
``log Zhat``.
"""
import math
import os
import warnings

import pytest
import torch

from tsmc_kernels import smc_generate
from tsmc_kernels.exact import enumerate_completions
from tsmc_kernels.models import tiny_random_model
from tsmc_kernels.twist import (EmbeddingTwistHead, MLPTwistHead, ModelTwistHead, TwistHead, bind_prompts,
                                ctl_loss, dpg_loss, fudge_loss, make_batch, sixo_loss, soft_q_loss, teacher_force,
                                twist_loss)
from tsmc_kernels.twist import fit_twist

V, T, EOS = 5, 3, 4
PROMPT = torch.tensor([0, 1, 2])
BIG = 1 << 16  # chunk size: one teacher-forced pass for the whole (tiny) batch
pytestmark = [pytest.mark.filterwarnings("ignore:all particles"), pytest.mark.usefixtures("one_thread")]


def potential(c: torch.Tensor) -> torch.Tensor:
    """phi = 1[completion contains token 2] * exp(0.7 * #3): zeros and a graded part."""
    return torch.where((c == 2).any(1), 0.0, -math.inf) + 0.7 * (c == 3).sum(1).float()


def positive_potential(c: torch.Tensor) -> torch.Tensor:
    """The same without zeros (phi = e^-4 instead of 0), so bootstrap log Zhat stays finite."""
    return torch.where((c == 2).any(1), 0.0, -4.0) + 0.7 * (c == 3).sum(1).float()


def indicator(c: torch.Tensor) -> torch.Tensor:
    return torch.where((c == 2).any(1), 0.0, -math.inf)


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(V, seed=3)


def make_head(kind: str, model, **kw):
    if kind == "mlp":
        return MLPTwistHead.for_model(model, **kw)
    if kind == "embedding":
        return EmbeddingTwistHead.for_model(model, **kw)
    return ModelTwistHead.from_model(model, num_layers=1, **kw)


def randomize_(head, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return head


# ----------------------------------------------------------------------------- exact psi*

def psi_error(model, head, ex) -> float:
    """sum_t sum_{s_1:t} sigma(s_1:t) (f_t - log psi*_t - c_t)^2 over prefixes with sigma > 0.

    ``c_t`` (the sigma-weighted mean offset) is removed: CTL identifies each psi_t up to a constant.
    """
    table = ex.optimal_twist().table
    marg = {}
    for key, p in zip(ex.keys(), ex.target().tolist()):
        for t in range(1, len(key) + 1):
            marg[key[:t]] = marg.get(key[:t], 0.0) + p
    d = teacher_force(model, PROMPT[None], None, ex.completions[None], ex.lengths[None], chunk_size=BIG)
    with torch.no_grad():
        f = head.log_psi_tokens(d["inputs"], d["tokens"])
    learned = {key[: t + 1]: float(f[i, t]) for i, key in enumerate(ex.keys()) for t in range(len(key))}
    err = 0.0
    for t in range(1, T + 1):
        ks = [k for k in marg if len(k) == t and marg[k] > 0]
        w = torch.tensor([marg[k] for k in ks], dtype=torch.float64)
        diff = torch.tensor([learned[k] - table[k] for k in ks], dtype=torch.float64)
        c = (w * diff).sum() / w.sum()
        err += float((w * (diff - c) ** 2).sum())
    return err


def log_z_replicas(model, head, pot, N, B=1024, seed=1234):
    out = smc_generate(model, PROMPT.repeat(B, 1), num_particles=N, max_new_tokens=T, potential=pot, twist=head,
                       ess_threshold=0.5, seed=seed)
    return out.log_z


def train_ctl(model, pot, steps=60):
    torch.manual_seed(0)  # the head's hidden layer is randomly initialised
    head = MLPTwistHead.for_model(model)
    hist = fit_twist(model, head, PROMPT.repeat(64, 1), pot, loss="ctl", num_particles=4, steps=steps, lr=1e-2,
                     max_new_tokens=T, chunk_size=BIG, seed=0)
    return head, hist


def test_ctl_learns_the_optimal_twist(model):
    ex = enumerate_completions(model, PROMPT, T).with_potential(potential)
    head0 = MLPTwistHead.for_model(model)
    err0 = psi_error(model, head0, ex)
    head, hist = train_ctl(model, potential)
    err1 = psi_error(model, head, ex)
    assert err1 < 0.4 * err0, f"weighted squared error to log psi*: {err0:.3f} -> {err1:.3f}"
    # Sampling with the learned twist: every replica finds a phi > 0 particle (bootstrap does not),
    # and log Zhat is close to log Z.
    boot = log_z_replicas(model, None, potential, N=2)
    tw = log_z_replicas(model, head, potential, N=2)
    assert torch.isneginf(boot).float().mean() > 0.1
    assert torch.isfinite(tw).all()
    assert ex.log_z - tw.mean().item() < 0.1
    assert hist[-1]["finite_frac"] > hist[0]["finite_frac"] + 0.3


@pytest.mark.parametrize("N", [2, 4])
def test_ctl_halves_the_log_z_gap(model, N):
    ex = enumerate_completions(model, PROMPT, T).with_potential(positive_potential)
    head, _ = _trained_positive(model)
    gap_boot = ex.log_z - log_z_replicas(model, None, positive_potential, N).mean().item()
    gap_tw = ex.log_z - log_z_replicas(model, head, positive_potential, N).mean().item()
    assert gap_boot > 0.1
    assert gap_tw < 0.5 * gap_boot, f"log Z - E log Zhat: bootstrap {gap_boot:.3f}, twisted {gap_tw:.3f}"


_CACHE = {}


def _trained_positive(model):
    if "pos" not in _CACHE:
        _CACHE["pos"] = train_ctl(model, positive_potential)
    return _CACHE["pos"]


# ----------------------------------------------------------------------------- loss gradients

def _case(seed=0, B=3, N=4, L=3, Vv=V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = B * N
    lengths = torch.randint(1, L + 1, (M,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    terminal = torch.arange(L)[None] == (lengths[:, None] - 1)
    log_w = torch.log_softmax(torch.randn(B, N, generator=g, dtype=dtype), 1)
    log_w[0, 1] = -math.inf  # a zero-weight particle
    f = (torch.randn(M, L, generator=g, dtype=dtype) - 1.0).requires_grad_()
    return dict(B=B, N=N, L=L, M=M, mask=mask, terminal=terminal, log_w=log_w, f=f, g=g)


def test_ctl_gradient_is_positive_minus_negative_expectation():
    c = _case()
    B, N, L = c["B"], c["N"], c["L"]
    log_w_base = torch.randn(c["M"], L, generator=c["g"], dtype=torch.float64)
    loss = ctl_loss(c["f"], c["mask"], c["log_w"], log_w_base)
    log_w_neg = log_w_base + c["f"].detach()
    (grad,) = torch.autograd.grad(loss, c["f"])
    W = torch.exp(c["log_w"])
    expected = torch.zeros(B, N, L, dtype=torch.float64)
    m = c["mask"].view(B, N, L)
    for b in range(B):
        for t in range(L):
            idx = m[b, :, t]
            if not idx.any():
                continue
            mass = W[b, idx].sum()
            wneg = torch.softmax(log_w_neg.view(B, N, L)[b, idx, t], 0)
            expected[b, idx, t] = -(W[b, idx] - mass * wneg) / B
    torch.testing.assert_close(grad.view(B, N, L), expected)
    assert loss.item() >= 0  # a sum of KL divergences
    torch.autograd.gradcheck(lambda f: ctl_loss(f, c["mask"], c["log_w"], log_w_base), (c["f"],))


def test_dpg_gradient_is_minus_grad_log_q():
    c = _case(1)
    B, L, M = c["B"], c["L"], c["M"]
    logits = torch.randn(M, L, V, generator=c["g"], dtype=torch.float64)
    tokens = torch.randint(0, V, (M, L), generator=c["g"])
    rows = torch.randn(M, L, V, generator=c["g"], dtype=torch.float64, requires_grad=True)
    f_tok = rows.gather(-1, tokens[..., None])[..., 0]
    log_q_rows = torch.log_softmax(torch.log_softmax(logits, -1) + rows.detach(), -1)
    loss = dpg_loss(f_tok, rows, log_q_rows, c["mask"], c["log_w"])
    (grad,) = torch.autograd.grad(loss, rows)
    # d/d rows of -sum W log q(s_t | s_<t) with q = softmax(log p0 + rows): -W (onehot - q).
    W = torch.exp(c["log_w"]).reshape(M, 1, 1) * c["mask"][..., None]
    expected = -W * (torch.nn.functional.one_hot(tokens, V) - log_q_rows.exp()) / B
    torch.testing.assert_close(grad, expected)
    # ... which is the gradient of the cross-entropy itself:
    rows2 = rows.detach().clone().requires_grad_()
    ce = -(W[..., 0] * torch.log_softmax(torch.log_softmax(logits, -1) + rows2, -1).gather(
        -1, tokens[..., None])[..., 0]).sum() / B
    torch.testing.assert_close(torch.autograd.grad(ce, rows2)[0], expected)


def test_sixo_fudge_soft_q_gradients_match_finite_differences():
    c = _case(2)
    mask, terminal, log_w = c["mask"], c["terminal"], c["log_w"]
    ref = torch.randn(8, c["L"], generator=c["g"], dtype=torch.float64, requires_grad=True)
    ref_mask = torch.rand(8, c["L"], generator=c["g"]) < 0.8
    torch.autograd.gradcheck(lambda f, r: sixo_loss(f, mask, log_w, r, ref_mask, 2), (c["f"], ref))
    log_phi = torch.log(torch.rand(c["M"], generator=c["g"], dtype=torch.float64))
    torch.autograd.gradcheck(lambda f: fudge_loss(torch.nn.functional.logsigmoid(f), mask, log_phi), (c["f"],))
    log_zpi = torch.randn(c["M"], c["L"], generator=c["g"], dtype=torch.float64)
    log_phi[0] = -math.inf
    torch.autograd.gradcheck(lambda f: soft_q_loss(f, mask, terminal, log_zpi, log_phi), (c["f"],))
    # soft-Q analytic: 2 (f - target) / M on valid positions; targets log phi (floored) / next log Zpi.
    loss = soft_q_loss(c["f"], mask, terminal, log_zpi, log_phi, log_phi_floor=-30.0)
    (grad,) = torch.autograd.grad(loss, c["f"])
    nxt = torch.cat([log_zpi[:, 1:], torch.zeros_like(log_zpi[:, :1])], 1)
    target = torch.where(terminal, log_phi.clamp_min(-30.0)[:, None].expand_as(nxt), nxt)
    torch.testing.assert_close(grad, 2 * (c["f"].detach() - target) * mask / c["M"])


@pytest.mark.parametrize("loss", ["ctl", "sixo", "fudge", "soft_q", "dpg"])
def test_twist_loss_gradient_through_the_head_matches_finite_difference(model, loss):
    """End to end (sampling -> one teacher-forced pass -> loss): autograd vs a central difference."""
    pot = indicator if loss == "fudge" else positive_potential
    head = MLPTwistHead.for_model(model, activation="logsigmoid" if loss == "fudge" else "none", dtype=torch.float64)
    randomize_(head, seed=1, scale=0.3)
    from tsmc_kernels.twist import sample_batch
    batch, _ = sample_batch(model, head, PROMPT.repeat(4, 1), None, pot, loss=loss, num_particles=4,
                            max_new_tokens=T, seed=5, chunk_size=BIG)
    # Stop-gradient parts (weights, soft-Q/DPG targets) are held at the current parameters, as in training.
    direction = {n: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                 for i, (n, p) in enumerate(head.named_parameters())}
    head.zero_grad()
    value = twist_loss(loss, head, batch)
    value.backward()
    analytic = sum((p.grad * direction[n]).sum() for n, p in head.named_parameters())

    frozen = _freeze_targets(loss, head, batch)
    eps = 1e-6
    vals = []
    for sgn in (1, -1):
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.add_(sgn * eps * direction[n])
            vals.append(float(frozen()))
            for n, p in head.named_parameters():
                p.sub_(sgn * eps * direction[n])
    numeric = (vals[0] - vals[1]) / (2 * eps)
    assert abs(numeric) > 1e-3
    assert abs(float(analytic) - numeric) < 1e-5 * max(1.0, abs(numeric)), (float(analytic), numeric)


def _freeze_targets(loss, head, batch):
    """The loss as a function of the head with its stop-gradient inputs frozen at the current head."""
    from tsmc_kernels.twist import prefix_quantities
    with torch.no_grad():
        pq0 = prefix_quantities(head, batch, rows=loss == "dpg", proposal=loss in ("soft_q", "dpg"))
    if loss in ("ctl", "sixo", "fudge"):
        return lambda: twist_loss(loss, head, batch)  # no stop-gradient on the current head
    if loss == "soft_q":
        def f():
            pq = prefix_quantities(head, batch)
            return soft_q_loss(pq.log_psi, pq.mask, pq.terminal, pq0.log_zpi, batch.log_phi)
        return f
    log_q_rows = torch.log_softmax(batch.logits.double(), -1) + pq0.log_psi_rows - pq0.log_zpi[..., None].double()

    def g():
        pq = prefix_quantities(head, batch, rows=True)
        return dpg_loss(pq.log_psi, pq.log_psi_rows, log_q_rows, pq.mask, batch.log_weights)
    return g


def test_loss_checks(model):
    head = MLPTwistHead.for_model(model)
    with pytest.raises(ValueError, match="logsigmoid"):
        fit_twist(model, head, PROMPT[None], indicator, loss="fudge", steps=1, max_new_tokens=T)
    with pytest.raises(ValueError, match="unknown twist loss"):
        fit_twist(model, head, PROMPT[None], indicator, loss="nope", steps=1, max_new_tokens=T)
    sig = MLPTwistHead.for_model(model, activation="logsigmoid")
    with pytest.raises(ValueError, match=r"phi in \[0, 1\]"):
        fit_twist(model, sig, PROMPT.repeat(4, 1), potential, loss="fudge", steps=1, num_particles=4,
                  max_new_tokens=T)


def test_fit_twist_argument_checks(model):
    head = MLPTwistHead.for_model(model)
    kw = dict(steps=1, max_new_tokens=T)
    for bad, match in ((dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(inner_steps=0), "inner_steps"),
                       (dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size")):
        with pytest.raises(ValueError, match=match):
            fit_twist(model, head, PROMPT.repeat(8, 1), potential, **{**kw, **bad})
    with pytest.raises(TypeError, match=r"has no option\(s\) \['log_phi_flor'\]"):  # a typo, before any sampling
        fit_twist(model, head, PROMPT[None], potential, loss="soft_q", loss_kwargs={"log_phi_flor": -5}, **kw)


def test_fit_twist_trains_under_no_grad_and_refuses_inference_mode(model):
    head = MLPTwistHead.for_model(model, seed=3)
    before = [p.detach().clone() for p in head.parameters()]
    with torch.no_grad():  # a caller's no_grad must not turn training into "does not require grad"
        fit_twist(model, head, PROMPT.repeat(4, 1), potential, num_particles=2, steps=1, lr=1e-2, max_new_tokens=T)
    assert any(not torch.equal(a, p) for a, p in zip(before, head.parameters()))
    with warnings.catch_warnings():  # and a round where a prompt earns nothing is a record, not a warning
        warnings.simplefilter("error")
        hist = fit_twist(model, head, PROMPT.repeat(2, 1), lambda c: torch.full((len(c),), -math.inf),
                         num_particles=2, steps=2, max_new_tokens=T)
    assert [h["log_z_finite_frac"] for h in hist] == [0.0, 0.0]
    fit_twist(model, head, [[0, 1, 2], [1, 2]], potential, num_particles=2, steps=1, max_new_tokens=T)  # ragged ids
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        fit_twist(model, head, PROMPT[None], potential, steps=1, max_new_tokens=T)


def test_fit_twist_infers_padding_like_the_samplers():
    """A padded prompt tensor without a mask: trained on the prompts smc_generate would sample."""
    from types import SimpleNamespace

    from tsmc_kernels.twist import PromptDataset

    m = tiny_random_model(V, seed=3)
    m.generation_config.pad_token_id = 3  # not the EOS id (4)
    P = torch.tensor([[3, 3, 0, 1, 2], [0, 1, 2, 1, 2]])
    kw = dict(num_particles=2, steps=2, lr=1e-2, max_new_tokens=T, seed=1)
    h1, h2 = MLPTwistHead.for_model(m, seed=0), MLPTwistHead.for_model(m, seed=0)
    a = fit_twist(m, h1, P, potential, **kw)
    b = fit_twist(m, h2, P, potential, attention_mask=(P != 3).long(), **kw)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert all(torch.equal(x, y) for x, y in zip(h1.parameters(), h2.parameters()))
    tok = SimpleNamespace(pad_token_id=3, eos_token_id=4)
    assert PromptDataset(P, tokenizer=tok).rows == [[0, 1, 2], [0, 1, 2, 1, 2]]


def test_fp16_heads_are_refused_before_adam_makes_them_nan():
    m16 = tiny_random_model(V, seed=0, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 trainable parameters"):
        fit_twist(m16, MLPTwistHead.for_model(m16, seed=0, dtype=torch.float16), PROMPT[None], potential, steps=1,
                  max_new_tokens=T)
    head = MLPTwistHead.for_model(m16, seed=0, dtype=torch.float32)  # the advice works
    fit_twist(m16, head, PROMPT.repeat(2, 1), potential, num_particles=2, steps=2, max_new_tokens=T)
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_what_is_not_a_twist_is_a_type_error(model):
    with pytest.raises(TypeError, match="head must be a TwistHead"):
        fit_twist(model, model, PROMPT[None], potential, steps=1, max_new_tokens=T)
    with pytest.raises(TypeError, match=r"takes 1 positional argument\(s\); a twist is called as twist\(hidden"):
        smc_generate(model, PROMPT[None], num_particles=2, max_new_tokens=T, twist=torch.nn.Linear(16, V))
    with pytest.raises(TypeError, match="twist must be a callable"):
        smc_generate(model, PROMPT[None], num_particles=2, max_new_tokens=T, twist="ctl")


def test_head_size_checks(model):
    for kw, match in ((dict(mlp_size=0), "mlp_size"), (dict(num_layers=0), "num_layers"), (dict(seed=1.5), "seed")):
        with pytest.raises((ValueError, TypeError), match=match):
            MLPTwistHead.for_model(model, **kw)
    with pytest.raises(ValueError, match="vocab_size"):
        MLPTwistHead(vocab_size=2.5, hidden_size=4)
    with pytest.raises(ValueError, match="embedding_size"):
        EmbeddingTwistHead(vocab_size=V, hidden_size=4, embedding_size=0)
    with pytest.raises(ValueError, match="num_layers"):
        ModelTwistHead.from_model(model, num_layers=0)
    with pytest.raises(ValueError, match="only 2 layers"):
        ModelTwistHead.from_model(model, num_layers=3)


@pytest.mark.parametrize("loss", ["sixo", "fudge", "soft_q", "dpg"])
def test_other_losses_train(model, loss):
    pot = indicator if loss == "fudge" else positive_potential
    head = MLPTwistHead.for_model(model, activation="logsigmoid" if loss == "fudge" else "none")
    hist = fit_twist(model, head, PROMPT.repeat(32, 1), pot, loss=loss, num_particles=4, steps=8, lr=1e-2,
                     max_new_tokens=T, chunk_size=BIG)
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert any(p.abs().sum() > 0 for p in head.out.parameters())


# ----------------------------------------------------------------------------- heads

@pytest.mark.parametrize("kind", ["mlp", "embedding", "model"])
def test_heads_start_at_zero_and_match_teacher_forcing(model, kind):
    head = make_head(kind, model)
    ids = PROMPT.repeat(3, 1)
    with bind_prompts(head, ids, None, 4):
        out0 = smc_generate(model, ids, num_particles=4, max_new_tokens=T, potential=potential, twist=head, seed=3)
    boot = smc_generate(model, ids, num_particles=4, max_new_tokens=T, potential=potential, seed=3)
    assert torch.equal(out0.completions, boot.completions)  # log psi = 0: bootstrap SMC
    # With random weights, the proposal used while sampling (KV cache, resampling every step)
    # equals the one recomputed by one teacher-forced pass.
    randomize_(head, seed=2)
    with bind_prompts(head, ids, None, 4):
        out = smc_generate(model, ids, num_particles=4, max_new_tokens=T, potential=potential, twist=head,
                           ess_threshold=1.0, seed=4)
    batch = make_batch(model, head, ids, None, out, chunk_size=BIG)
    torch.testing.assert_close((batch.log_q_sample * batch.mask).sum(1).view(3, 4), out.log_q, atol=1e-4, rtol=0)
    tok = head.log_psi_tokens(batch.inputs, batch.tokens)
    rows = head.log_psi_rows(batch.inputs)
    torch.testing.assert_close(tok, rows.gather(-1, batch.tokens[..., None])[..., 0], atol=1e-5, rtol=1e-5)
    if kind != "model":
        torch.testing.assert_close(head(batch.inputs.hidden), rows)
        assert head(batch.inputs.hidden[:, 0]).shape == (12, V)


@pytest.mark.parametrize("kind", ["mlp", "model"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_teacher_forcing_matches_sampling_with_padding(model, kind, padding):
    ids = torch.tensor([[0, 1, 2], [EOS, 3, 2], [EOS, EOS, 1]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    if padding == "right":  # both the sampler and teacher forcing left-align it
        ids, mask = torch.tensor([[0, 1, 2], [3, 2, EOS], [1, EOS, EOS]]), mask.flip(1)
    head = randomize_(make_head(kind, model), seed=5)
    with bind_prompts(head, ids, mask, 4):
        out = smc_generate(model, ids, mask, num_particles=4, max_new_tokens=T, potential=positive_potential,
                           twist=head, ess_threshold=1.0, seed=9)
    batch = make_batch(model, head, ids, mask, out, chunk_size=8)  # several chunks
    torch.testing.assert_close((batch.log_p0 * batch.mask).sum(1).view(3, 4), out.log_p0, atol=1e-4, rtol=0)
    torch.testing.assert_close((batch.log_q_sample * batch.mask).sum(1).view(3, 4), out.log_q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_model_head_from_other_architectures_runs_in_eval_mode(arch):
    """from_model keeps per-layer config lists (Qwen2's layer_types) as long as the kept layers (it
    raised); a new head is in training mode, and GPT-2's dropout made same-seed runs differ: the
    sampler runs the twist in eval mode (and restores its mode)."""
    m = tiny_random_model(V, arch=arch, seed=1)
    head = randomize_(ModelTwistHead.from_model(m, num_layers=1), seed=2, scale=0.3)
    assert head.training and head.backbone.config.num_hidden_layers == 1
    ids = torch.tensor([[0, 1, 2]])
    runs = []
    for _ in range(2):
        with head.bind(ids, None, 4):
            runs.append(smc_generate(m, ids, num_particles=4, max_new_tokens=T, twist=head, seed=3,
                                     potential=positive_potential))
    assert head.training
    assert torch.equal(runs[0].sequences, runs[1].sequences) and torch.equal(runs[0].log_z, runs[1].log_z)


def test_model_head_is_bound_by_the_sampler(model):
    """smc_generate binds a ModelTwistHead to its own prompts for the call: no binding, a binding left
    from another batch of the same size, or the bounds' repeated prompts all condition it right."""
    from tsmc_kernels.bounds import log_z_bounds

    head = randomize_(make_head("model", model), seed=2, scale=0.3)
    kw = dict(num_particles=4, max_new_tokens=T, twist=head, seed=3, potential=positive_potential)
    ids, mask = torch.cat([PROMPT, PROMPT[:1]])[None], torch.tensor([[1] * len(PROMPT) + [0]])  # right padding
    with head.bind(ids, mask, 4):
        want = smc_generate(model, ids, mask, **kw)
    with head.bind((ids + 1) % V, None, 4):  # stale
        stale = smc_generate(model, ids, mask, **kw)
    plain = smc_generate(model, ids, mask, **kw)
    assert head._bound is None  # restored
    for got in (stale, plain):
        assert torch.equal(want.sequences, got.sequences) and torch.equal(want.log_z, got.log_z)
    with pytest.raises(RuntimeError, match="bind"):  # a direct call still needs it
        head(None, torch.zeros(4, 1, dtype=torch.long))
    e = enumerate_completions(model, PROMPT, T).with_potential(positive_potential)
    b = log_z_bounds(model, PROMPT[None], potential=positive_potential, twist=head, num_particles=2, num_runs=8,
                     max_new_tokens=T, exact_samples=e, seed=1)
    assert torch.isfinite(b.lower).all() and torch.isfinite(b.upper).all()


@pytest.mark.parametrize("kind", ["mlp", "embedding", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(model, kind, dtype, tmp_path):
    head = randomize_(make_head(kind, model), seed=7).to(dtype)
    head.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["twist_config.json", "twist_head.safetensors"]
    loaded = TwistHead.from_pretrained(tmp_path, model=model)
    assert type(loaded) is type(head) and loaded.dtype == dtype
    a, b = head.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ex = enumerate_completions(model, PROMPT, T)
    d = teacher_force(model, PROMPT[None], None, ex.completions[None], ex.lengths[None], chunk_size=BIG)
    with torch.no_grad():
        x, y = head.log_psi_rows(d["inputs"]), loaded.log_psi_rows(d["inputs"])
    assert x.dtype == dtype and torch.equal(x, y)
    if kind == "embedding":
        # The output embedding is referenced, not saved.
        assert "weight" not in " ".join(k for k in a if k.startswith("bias"))
        assert all(v.shape != model.get_output_embeddings().weight.shape for v in a.values())
        with pytest.raises(ValueError, match="model=model"):
            TwistHead.from_pretrained(tmp_path)


def test_a_head_loaded_on_another_kind_of_model_warns(model, tmp_path):
    """Same sizes, other architecture: it loads (the sizes fit) with a warning naming both models."""
    head = MLPTwistHead.for_model(model, seed=0)
    head.save_pretrained(tmp_path)
    gpt2 = tiny_random_model(V, arch="gpt2", seed=3)
    with pytest.warns(UserWarning, match="trained for a model with model_type 'llama', not this one .*'gpt2'"):
        TwistHead.from_pretrained(tmp_path, model=gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TwistHead.from_pretrained(tmp_path, model=tiny_random_model(V, seed=4)).trained_for["model_type"] == "llama"


def test_vocab_mismatch_is_a_clear_error(model, tmp_path):
    other = tiny_random_model(V + 1, seed=3)
    head = MLPTwistHead.for_model(other)
    with pytest.raises(ValueError, match="vocab"):
        fit_twist(model, head, PROMPT[None], potential, steps=1, max_new_tokens=T)
    with pytest.raises(ValueError, match="vocab"):
        smc_generate(model, PROMPT[None], num_particles=2, max_new_tokens=T, twist=head)
    emb = EmbeddingTwistHead.for_model(other)
    emb.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab"):
        TwistHead.from_pretrained(tmp_path, model=model)


@pytest.mark.parametrize("cls, size", [(MLPTwistHead, "hidden_size"), (EmbeddingTwistHead, "embedding_size"),
                                       (EmbeddingTwistHead, "vocab_size")])
def test_for_model_refuses_the_sizes_it_takes_from_the_model(model, cls, size):
    with pytest.raises(ValueError, match=f"takes {size} from the model"):
        cls.for_model(model, **{size: 7})


def test_seeded_heads_are_reproducible_and_leave_the_global_rng(model):
    from tsmc_kernels.twist import ModelTwistHead

    builds = (lambda seed: MLPTwistHead.for_model(model, seed=seed),
              lambda seed: EmbeddingTwistHead.for_model(model, seed=seed),
              lambda seed: ModelTwistHead.from_model(model, copy_weights=False, seed=seed))
    for build in builds:
        state = torch.random.get_rng_state()
        a, b, c = build(3), build(3), build(4)
        assert torch.equal(torch.random.get_rng_state(), state)  # forked, not advanced
        pa, pb, pc = (torch.cat([p.detach().flatten() for p in h.parameters()]) for h in (a, b, c))
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_base_model_is_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for kind in ("mlp", "embedding"):
        head = make_head(kind, model)
        fit_twist(model, head, PROMPT.repeat(8, 1), potential, num_particles=4, steps=3, lr=1e-2, max_new_tokens=T,
                  chunk_size=BIG)
        assert any(p.abs().sum() > 0 for p in head.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- HF Trainer

def _trainer(model, out_dir, steps, eval_dataset=None, **kw):  # kw: TrainingArguments (overriding the ones here)
    from transformers import TrainingArguments

    from tsmc_kernels.twist import TwistTrainer
    args = TrainingArguments(**{**dict(output_dir=str(out_dir), max_steps=steps, save_steps=2, save_strategy="steps",
                                       per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                       learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                       disable_tqdm=True), **kw})
    head = MLPTwistHead.for_model(model, seed=0)
    return TwistTrainer(model, head, potential, args, train_dataset=PROMPT.repeat(32, 1), eval_dataset=eval_dataset,
                        num_particles=4, max_new_tokens=T, chunk_size=BIG)


def test_trainer_resumes_from_checkpoint(model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _trainer(model, tmp_path / "run", 4)
        full.train()
        final = {k: v.clone() for k, v in full.head.state_dict().items()}
        assert any(v.abs().sum() > 0 for v in final.values())
        logged = [h for h in full.state.log_history if "loss" in h]
        assert len(logged) == 4 and all("log_z" in h and "finite_frac" in h for h in logged)
        ckpt = tmp_path / "run" / "checkpoint-2"
        assert (ckpt / "twist_config.json").exists() and (ckpt / "model.safetensors").exists()
        resumed = _trainer(model, tmp_path / "run", 4)  # a fresh head
        resumed.train(resume_from_checkpoint=str(ckpt))
        assert resumed.state.global_step == 4
    again = resumed.head.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final), "resumed training differs from the full run"
    saved = TwistHead.from_pretrained(tmp_path / "run" / "checkpoint-4", model=model)
    assert all(torch.equal(final[k], saved.state_dict()[k]) for k in final)


def test_trainer_evaluation_leaves_training_as_it_was(model, tmp_path):
    """Evaluating between steps draws its own seeds: the trained head is bit for bit the one without evaluation."""
    heads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for extra in ({}, dict(eval_strategy="steps", eval_steps=1)):
            trainer = _trainer(model, tmp_path / f"run{len(heads)}", 3, save_strategy="no",
                               eval_dataset=PROMPT.repeat(8, 1) if extra else None, **extra)
            trainer.train()
            heads.append(trainer.head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_trainer_mixed_precision_reaches_the_head(model, tmp_path):
    """TrainingArguments(bf16=True) autocasts the head in compute_loss (accelerate only autocasts the
    wrapped module's forward, which the trainer never calls)."""
    dtypes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(model, tmp_path / "run", 1, bf16=True, save_strategy="no")
        trainer.head.trunk.register_forward_hook(lambda mod, args, y: dtypes.append((torch.is_grad_enabled(), y.dtype)))
        trainer.train()
    assert (True, torch.bfloat16) in dtypes, dtypes  # the loss's (grad-enabled) head calls ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.head.parameters())  # fp32 master weights


def test_training_weights_match_the_teacher_forced_pass(model):
    """Without resampling the batch's positive weights are softmax(sum log p0 + log phi - sum log q) of
    the teacher-forced pass that also gives CTL's negative weights, not the sampler's decode-time
    weights (equal in fp32; in bf16 the two passes differ, by up to ~0.2 nats on SmolLM2): a batch
    built from an output with wrong weights still gets the teacher-forced ones."""
    from dataclasses import replace

    from tsmc_kernels.twist import make_batch

    head = randomize_(MLPTwistHead.for_model(model), seed=1, scale=0.3)
    ids = PROMPT.repeat(2, 1)
    out = smc_generate(model, ids, num_particles=8, max_new_tokens=T, potential=positive_potential, twist=head,
                       ess_threshold=0.0, seed=5)
    want = make_batch(model, head, ids, None, out, chunk_size=BIG).log_weights
    torch.testing.assert_close(want, out.log_weights, atol=1e-4, rtol=0)  # fp32: the same as the sampler's
    wrong = replace(out, log_weights=torch.log_softmax(torch.randn(2, 8), 1))
    batch = make_batch(model, head, ids, None, wrong, chunk_size=BIG)
    lw = (torch.where(batch.mask, batch.log_p0 - batch.log_q_sample, 0.0).sum(1) + batch.log_phi).view(2, 8)
    torch.testing.assert_close(batch.log_weights, torch.log_softmax(lw, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.log_weights, want, atol=1e-6, rtol=0)
