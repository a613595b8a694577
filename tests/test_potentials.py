"""Potentials: toxicity, sentiment, infilling, regex / reward-function / tempered, composition, bad input.

Hand-written texts for the classifiers; a tiny random model and a character "tokenizer" for the
sampler-level checks (the infilling likelihood through ``smc_generate`` against a direct forward
pass, an intermediate format potential against exact enumeration).
"""
import math
import re
import sys

import pytest
import torch

from tsmc_kernels import smc_generate
from tsmc_kernels.exact import enumerate_completions
from tsmc_kernels.models import tiny_random_model
from tsmc_kernels.potentials import (InfillPotential, RegexPotential, RegexPrefixPotential, SentimentPotential,
                                     ToxicityPotential, as_potential, tempered, text_reward)
from tsmc_kernels.sampler.lm import ParticleLM

pytestmark = pytest.mark.filterwarnings("ignore:all particles")

OFFENSIVE = "You are a stupid fucking idiot, shut up."
CLEAN = "The weather is lovely today and the garden looks beautiful."
POSITIVE = "This movie was wonderful! Great acting, a beautiful story, I loved every minute."
NEGATIVE = "Terrible film. Boring, badly acted and far too long; I hated it."


def ids_for(texts):
    return torch.zeros(len(texts), 1, dtype=torch.int64)


class CharTokenizer:
    """ids 0..V-2 -> letters, V-1 = EOS (a special token)."""

    def __init__(self, vocab_size: int, letters: str = "abcdefghijklmnop"):
        self.letters, self.eos = letters[: vocab_size - 1], vocab_size - 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(self.letters[i] for i in row if i != self.eos) for row in ids]


# ----------------------------------------------------------------------------------- toxicity
@pytest.fixture(scope="module")
def toxicity():
    pytest.importorskip("profanity_check")
    return ToxicityPotential()


def test_toxicity_offensive_vs_clean(toxicity):
    texts = [OFFENSIVE, CLEAN]
    p = toxicity.probabilities(texts)
    assert p[0] > 0.9 and p[1] < 0.2
    lp = toxicity(ids_for(texts), texts=texts)
    assert torch.allclose(lp.double(), p.log(), atol=1e-6)
    hot = ToxicityPotential(beta=3.0)(ids_for(texts), texts=texts)
    assert torch.allclose(hot, 3 * lp, atol=1e-5)
    ind = ToxicityPotential(mode="indicator", threshold=0.5)(ids_for(texts), texts=texts)
    assert ind.tolist() == [0.0, -math.inf]
    clean = ToxicityPotential(target="clean", mode="indicator")(ids_for(texts), texts=texts)
    assert clean.tolist() == [-math.inf, 0.0]
    assert toxicity.needs_text


def test_toxicity_bad_classifier_output():
    texts = ["a", "b"]
    for bad in ([0.5, float("nan")], [0.5, 1.5], [0.5], ["x", "y"]):
        pot = ToxicityPotential(classifier=lambda t, bad=bad: bad, name="tox-stub")
        with pytest.raises(ValueError, match="tox-stub"):
            pot(ids_for(texts), texts=texts)
    with pytest.raises(ValueError, match="mode"):
        ToxicityPotential(mode="exp", classifier=lambda t: [0.5] * len(t))
    with pytest.raises(ValueError, match="beta"):
        ToxicityPotential(beta=-1, classifier=lambda t: [0.5] * len(t))


def test_toxicity_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    with pytest.raises(ImportError, match="pip install alt-profanity-check"):
        ToxicityPotential()


# ----------------------------------------------------------------------------------- sentiment
@pytest.fixture(scope="module")
def vader():
    pytest.importorskip("vaderSentiment")
    from tsmc_kernels.potentials.sentiment import vader_scorer
    return vader_scorer()


def test_sentiment_positive_vs_negative(vader):
    texts = [POSITIVE, NEGATIVE]
    pos = SentimentPotential("positive", scorer=vader)
    neg = SentimentPotential("negative", beta=2.0, scorer=vader)
    c = pos.compound(texts)
    assert c[0] > 0.5 and c[1] < -0.5
    assert torch.allclose(pos(ids_for(texts), texts=texts).double(), c, atol=1e-6)
    assert torch.allclose(neg(ids_for(texts), texts=texts).double(), -2 * c, atol=1e-6)
    ind = SentimentPotential("negative", mode="indicator", threshold=0.5, scorer=vader)
    assert ind(ids_for(texts), texts=texts).tolist() == [-math.inf, 0.0]


def test_sentiment_default_scorer_and_errors(monkeypatch):
    pytest.importorskip("vaderSentiment")
    assert SentimentPotential()(ids_for([POSITIVE]), texts=[POSITIVE]).item() > 0.5
    with pytest.raises(ValueError, match="polarity"):
        SentimentPotential("happy", scorer=lambda t: 0.0)
    for bad in (2.0, float("nan"), "x"):
        pot = SentimentPotential(scorer=lambda t, bad=bad: bad, name="senti-stub")
        with pytest.raises(ValueError, match="senti-stub"):
            pot(ids_for(["a"]), texts=["a"])
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        SentimentPotential()


# ----------------------------------------------------------------------------------- regex / rewards
def test_regex_modes():
    texts = ["<a>12</a>", "x <a>3</a>", "<a>no</a>"]
    ids = ids_for(texts)
    assert RegexPotential(r"<a>\d+</a>")(ids, texts=texts).tolist() == [0, 0, -math.inf]
    assert RegexPotential(r"<a>\d+</a>", how="match")(ids, texts=texts).tolist() == [0, -math.inf, -math.inf]
    assert RegexPotential(r"<a>\d+</a>", how="fullmatch")(ids, texts=texts).tolist() == [0, -math.inf, -math.inf]
    assert RegexPotential(r"no", negate=True)(ids, texts=texts).tolist() == [0, 0, -math.inf]
    assert RegexPotential(r"NO", re.IGNORECASE, negate=True, penalty=2.0)(ids, texts=texts).tolist() == [0, 0, -2]
    with pytest.raises(ValueError, match="invalid regular expression"):
        RegexPotential("(")
    with pytest.raises(ValueError, match="how"):
        RegexPotential("a", how="find")


def test_regex_prefix():
    pot = RegexPrefixPotential(r"<a>\d+</a>")
    texts = ["", "<a", "<a>12", "<a>12</a>", "<b", "<a>x", "<a>1\ufffd"]
    assert pot(ids_for(texts), texts=texts).tolist() == [0, 0, 0, 0, -math.inf, -math.inf, 0]
    # re flags are translated (ASCII differs between re and regex)
    assert RegexPrefixPotential(r"ab", re.IGNORECASE | re.ASCII)(ids_for(["A"]), texts=["A"]).item() == 0
    with pytest.raises(ValueError, match="invalid regular expression"):
        RegexPrefixPotential("(")


def test_text_reward():
    texts = ["aaa", "a", ""]
    ids = ids_for(texts)
    assert text_reward(len, beta=0.5)(ids, texts=texts).tolist() == [1.5, 0.5, 0.0]
    assert text_reward(len, mode="indicator", threshold=1)(ids, texts=texts).tolist() == [0, -math.inf, -math.inf]
    batched = text_reward(lambda ts: [t.count("a") for t in ts], batched=True)
    assert batched(ids, texts=texts).tolist() == [3, 1, 0]
    per_prompt = text_reward(lambda t, b: float(b), with_prompt_index=True)
    assert per_prompt(ids, texts=texts, prompt_index=torch.tensor([0, 1, 2])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="nanny.*NaN"):
        text_reward(lambda t: float("nan"), name="nanny")(ids, texts=texts)
    with pytest.raises(ValueError, match="short.*2 rewards"):
        text_reward(lambda ts: [1, 2], batched=True, name="short")(ids, texts=texts)
    with pytest.raises(ValueError, match="huge.*\\+inf"):
        text_reward(lambda t: math.inf, name="huge")(ids, texts=texts)
    with pytest.raises(ValueError, match="words.*not return numbers"):
        text_reward(lambda t: "many", name="words")(ids, texts=texts)


def test_tempered():
    base = as_potential(lambda c: torch.tensor([0.0, -1.0, -math.inf]))
    ids = torch.zeros(3, 1, dtype=torch.int64)
    assert tempered(base, 0.5)(ids).tolist() == [0.0, -0.5, -math.inf]
    assert tempered(base, 0.0)(ids).tolist() == [0.0, 0.0, 0.0]
    assert tempered(RegexPotential("a"), 0.5).needs_text
    with pytest.raises(ValueError, match="beta"):
        tempered(base, -1.0)


# ----------------------------------------------------------------------------------- composition / bad input
def test_composition_is_sum_of_logs_and_needs_text():
    texts = ["<a>1</a> good", "<a>x</a> bad"]
    ids = ids_for(texts)
    r1 = RegexPotential(r"<a>\d</a>", penalty=3.0)
    r2 = text_reward(lambda t: len(t) / 10)
    r3 = as_potential(lambda c: torch.tensor([-0.25, -0.5]))
    prod = r1 * r2 * r3
    assert prod.needs_text and len(prod.parts) == 3
    want = r1(ids, texts=texts) + r2(ids, texts=texts) + r3(ids)
    assert torch.allclose(prod(ids, texts=texts), want)
    model = tiny_random_model(6, seed=0)
    infill = InfillPotential(model, torch.tensor([0, 1]), [2, 3])
    assert not infill.needs_text
    assert (infill * r1).needs_text and not (infill * r3).needs_text
    with pytest.raises(ValueError, match="needs decoded text"):
        (infill * r1)(torch.zeros(2, 1, dtype=torch.int64))


def test_bad_texts_name_the_potential():
    pot = RegexPotential("a", name="fmt")
    with pytest.raises(ValueError, match="fmt.*needs decoded text"):
        pot(ids_for(["a"]))
    with pytest.raises(ValueError, match="fmt.*1 texts for 2 rows"):
        pot(ids_for(["a", "b"]), texts=["a"])
    with pytest.raises(ValueError, match="fmt.*texts\\[1\\] is bytes"):
        pot(ids_for(["a", "b"]), texts=["a", b"b"])


def test_sampler_errors_name_the_potential():
    V = 6
    model = tiny_random_model(V, seed=1)
    prompt = torch.tensor([[0, 1, 2]])

    class Broken(CharTokenizer):
        def batch_decode(self, ids, skip_special_tokens=True):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    pot = RegexPotential("a", name="needs-a")
    with pytest.raises(ValueError, match="needs-a.*tokenizer"):
        smc_generate(model, prompt, num_particles=2, max_new_tokens=2, potential=pot)
    with pytest.raises(ValueError, match="could not decode completions for potential 'needs-a'"):
        smc_generate(model, prompt, num_particles=2, max_new_tokens=2, potential=pot, tokenizer=Broken(V))
    with pytest.raises(ValueError, match="'blows-up' returned \\+inf"):
        smc_generate(model, prompt, num_particles=2, max_new_tokens=2, tokenizer=CharTokenizer(V),
                     potential=text_reward(lambda t: math.inf, name="blows-up"))


def test_a_function_taking_texts_gets_them():
    """``f(ids, texts)`` is a text potential without being told (it could not run on texts=None)."""
    from tsmc_kernels.potentials.base import CallablePotential

    def by_text(ids, texts):
        return torch.tensor([0.0 if "a" in t else -1.0 for t in texts])

    assert CallablePotential(by_text).needs_text
    assert not CallablePotential(lambda ids, texts=None: ids.sum(1).float()).needs_text
    assert not CallablePotential(lambda ids: ids.sum(1).float()).needs_text
    assert not CallablePotential(by_text, needs_text=False).needs_text  # an explicit choice wins
    V = 6
    model = tiny_random_model(V, seed=1)
    out = smc_generate(model, torch.tensor([[0, 1, 2]]), num_particles=4, max_new_tokens=3, potential=by_text,
                       tokenizer=CharTokenizer(V))
    texts = CharTokenizer(V).batch_decode(out.completions[0].tolist())
    torch.testing.assert_close(out.log_phi[0], by_text(None, texts))
    with pytest.raises(ValueError, match="by_text.*tokenizer"):
        smc_generate(model, torch.tensor([[0, 1, 2]]), num_particles=2, max_new_tokens=2, potential=by_text)


# ----------------------------------------------------------------------------------- intermediate potentials
def test_intermediate_regex_prefix_is_exact():
    """A prefix-format intermediate potential keeps E[Zhat] = Z and concentrates the particles."""
    V, T = 5, 4
    model = tiny_random_model(V, seed=0)
    tok = CharTokenizer(V)  # letters a b c d, EOS = 4
    final = RegexPotential(r"(a|bc)+", how="fullmatch")
    inter = RegexPrefixPotential(r"(a|bc)+")
    prompt = torch.tensor([0, 1, 2])
    ex = enumerate_completions(model, prompt, T)
    ex = ex.with_potential(final, texts=tok.batch_decode(ex.completions.tolist()))
    z = math.exp(ex.log_z)
    assert 0.02 < z < 0.2
    reps = prompt.repeat(400, 1)
    kw = dict(num_particles=8, max_new_tokens=T, potential=final, tokenizer=tok, seed=11)
    plain = smc_generate(model, reps, **kw)
    out = smc_generate(model, reps, intermediate_potential=inter, intermediate_every=1, **kw)
    for o in (plain, out):
        zhat = torch.exp(o.log_z)
        se = zhat.std().item() / math.sqrt(len(zhat))
        assert abs(zhat.mean().item() - z) < 4 * se + 1e-3, (zhat.mean().item(), z, se)
    # every weighted particle satisfies the format
    texts = tok.batch_decode(out.completions.reshape(-1, out.completions.shape[-1]).tolist())
    ok = torch.tensor([re.fullmatch(r"(a|bc)+", t) is not None for t in texts]).view(out.log_weights.shape)
    assert (out.weights[~ok] == 0).all()
    # the intermediate potential kills bad prefixes early, so fewer prompts die entirely
    assert torch.isfinite(out.log_z).sum() > 1.5 * torch.isfinite(plain.log_z).sum()


# ----------------------------------------------------------------------------------- infilling
def direct_suffix_logprob(model, prompt: torch.Tensor, completion: torch.Tensor, suffix: torch.Tensor) -> float:
    seq = torch.cat([prompt, completion, suffix]).unsqueeze(0)
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    K, L = suffix.numel(), seq.shape[1]
    return float(sum(lp[L - K - 1 + j, suffix[j]] for j in range(K)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_infill_through_smc_matches_direct_forward(arch):
    V, T, N = 9, 5, 6
    model = tiny_random_model(V, arch=arch, seed=4)
    eos = V - 1
    prompts = [torch.tensor([0, 3, 2, 5]), torch.tensor([1, 6])]
    P = max(p.numel() for p in prompts)
    ids = torch.zeros(2, P, dtype=torch.int64)
    mask = torch.zeros(2, P, dtype=torch.int64)
    for b, p in enumerate(prompts):  # left padding
        ids[b, P - p.numel():], mask[b, P - p.numel():] = p, 1
    suffixes = [[4, 4, 1], [2]]
    pot = InfillPotential(model, ids, suffixes, attention_mask=mask, beta=1.0)
    out = smc_generate(model, ids, mask, num_particles=N, max_new_tokens=T, potential=pot, seed=5)
    assert (out.lengths < out.steps).any() or out.steps < T  # some particle stopped at EOS
    for b in range(2):
        for n in range(N):
            L = int(out.lengths[b, n])
            comp = out.completions[b, n, :L]
            want = direct_suffix_logprob(model, prompts[b], comp, torch.tensor(suffixes[b]))
            assert abs(out.log_phi[b, n].item() - want) < 1e-4, (b, n, out.log_phi[b, n].item(), want)
            if L < out.steps:
                assert comp[-1] == eos
    # the potential on the padded completions directly gives the same numbers
    again = pot(out.completions.reshape(2 * N, -1), prompt_index=torch.arange(2).repeat_interleave(N))
    assert torch.allclose(again, out.log_phi.reshape(-1), atol=1e-5)
    chunked = InfillPotential(model, ids, suffixes, attention_mask=mask, max_batch_rows=4)
    assert torch.allclose(chunked(out.completions.reshape(2 * N, -1), prompt_index=torch.arange(2).repeat_interleave(N)),
                          again, atol=1e-5)
    hot = InfillPotential(model, ids, suffixes, attention_mask=mask, beta=2.0)
    assert torch.allclose(hot(out.completions.reshape(2 * N, -1), prompt_index=torch.arange(2).repeat_interleave(N)),
                          2 * again, atol=1e-5)


def test_infill_fixed_length_span_and_text_suffix():
    V, T = 7, 4
    model = tiny_random_model(V, seed=6)
    prompt = torch.tensor([[0, 1, 2]])
    pot = InfillPotential(model, prompt, torch.tensor([3, 5]), eos_token_id=[])
    out = smc_generate(model, prompt, num_particles=5, max_new_tokens=T, potential=pot, eos_token_id=[], seed=1)
    assert out.steps == T and (out.lengths == T).all()
    for n in range(5):
        want = direct_suffix_logprob(model, prompt[0], out.completions[0, n], torch.tensor([3, 5]))
        assert abs(out.log_phi[0, n].item() - want) < 1e-4

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [int(ch) for ch in s]}

    by_text = InfillPotential(model, ["012"], "35", tokenizer=Tok(), eos_token_id=[])
    c = out.completions[0]
    assert torch.allclose(by_text(c), pot(c), atol=1e-6)


@pytest.mark.parametrize("arch,cache", [("llama", "dynamic"), ("llama", "static"), ("llama", "none"),
                                        ("gpt2", "dynamic")])
def test_infill_from_kv_cache_matches_full_forward(arch, cache):
    """log_phi_cached (the sampler hook) equals the full forward on rows that just finished."""
    V, T, N = 9, 4, 3
    model = tiny_random_model(V, arch=arch, seed=7)
    ids = torch.tensor([[5, 0, 3, 2], [5, 5, 1, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    suffixes = [[4, 4, 1], [2]]
    pot = InfillPotential(model, ids, suffixes, attention_mask=mask, eos_token_id=[])
    g = torch.Generator().manual_seed(0)
    comps = torch.randint(0, V - 1, (2 * N, T), generator=g)
    lm = ParticleLM(model, ids, mask, num_particles=N, max_new_tokens=T, cache=cache)
    lm.prefill()
    rows = torch.arange(2 * N)
    for t in range(T):
        got = pot.log_phi_cached(lm, rows, comps[:, : t + 1], rows // N)
        want = pot(comps[:, : t + 1], prompt_index=rows // N)
        assert torch.allclose(got, want, atol=1e-4), (t, got, want)
        sub = rows[1::2]
        assert torch.allclose(pot.log_phi_cached(lm, sub, comps[sub, : t + 1], sub // N), want[1::2], atol=1e-4)
        lm.step(comps[:, t])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sampler_scores_infill_from_its_kv_cache(cache, monkeypatch):
    """smc_generate calls log_phi_cached for an InfillPotential; same run as the full forward."""
    V, N = 9, 4
    model = tiny_random_model(V, seed=7)
    ids = torch.tensor([[5, 0, 3, 2], [5, 5, 1, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pot = InfillPotential(model, ids, [[4, 4, 1], [2]], attention_mask=mask, eos_token_id=[8])
    kw = dict(num_particles=N, max_new_tokens=5, eos_token_id=[8], ess_threshold=0.8, cache=cache, seed=3)
    calls = []
    cached = InfillPotential.log_phi_cached
    monkeypatch.setattr(InfillPotential, "log_phi_cached", lambda self, *a: calls.append(1) or cached(self, *a))
    a = smc_generate(model, ids, mask, potential=pot, **kw)
    assert calls, "the sampler did not use the KV-cache hook"
    b = smc_generate(model, ids, mask, potential=lambda c, prompt_index: pot(c, prompt_index=prompt_index), **kw)
    assert torch.equal(a.completions, b.completions)
    torch.testing.assert_close(a.log_phi, b.log_phi, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.log_z, b.log_z, atol=1e-4, rtol=0)


def test_infill_bad_input():
    model = tiny_random_model(6, seed=0)
    with pytest.raises(ValueError, match="'infill'.*suffix is empty"):
        InfillPotential(model, torch.tensor([0, 1]), [])
    with pytest.raises(ValueError, match="'my-infill'.*suffix is empty"):
        InfillPotential(model, torch.tensor([[0, 1], [2, 3]]), [[1], []], name="my-infill")
    with pytest.raises(ValueError, match="'infill'.*needs tokenizer"):
        InfillPotential(model, torch.tensor([0, 1]), "abc")
    with pytest.raises(ValueError, match="'infill'.*vocabulary"):
        InfillPotential(model, torch.tensor([0, 1]), [9])
    with pytest.raises(ValueError, match="'infill'.*3 suffixes for 2 prompts"):
        InfillPotential(model, torch.tensor([[0, 1], [2, 3]]), [[1], [2], [3]])
    pot = InfillPotential(model, torch.tensor([0, 1]), [2])
    with pytest.raises(ValueError, match="'infill'.*prompt_index 1 out of range"):
        pot(torch.zeros(2, 2, dtype=torch.int64), prompt_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'infill'.*vocabulary"):
        pot(torch.full((1, 2), 7, dtype=torch.int64))


def test_reward_helpers_edge_values():
    from tsmc_kernels.potentials import from_reward, indicator

    ids, texts = torch.zeros(3, 1, dtype=torch.int64), ["a", "b", "c"]
    flat = from_reward(lambda t, i: [0.0, -math.inf, 2.0], beta=0.0)
    assert flat(ids, texts=texts).tolist() == [0.0, 0.0, 0.0]  # phi^0 = 1, also where r = -inf
    by_length = from_reward(lambda t: [float(len(s)) for s in t], beta=2.0)  # a one-argument reward: texts only
    assert by_length(ids, texts=["a", "bb", ""]).tolist() == [2.0, 4.0, 0.0]
    with pytest.raises(ValueError, match="returned NaN for row 1"):
        indicator(lambda t, i: [1.0, math.nan, 0.0])(ids, texts=texts)  # NaN is not "phi = 0"
    both = (lambda c: torch.full((c.shape[0],), -1.0)) * RegexPotential("b", penalty=2.0)  # callable * Potential
    assert both(ids, texts=texts).tolist() == [-3.0, -1.0, -3.0]
