"""Packed grouped-query decode attention (``tsmc_kernels.sampler.attention``) against HF's ``sdpa``."""
import pytest
import torch

from tsmc_kernels import power_sample, smc_generate
from tsmc_kernels.models import tiny_random_model
from tsmc_kernels.sampler import attention
from tsmc_kernels.sampler.inputs import cache_kwarg

V = 11


def gqa_model(arch="qwen2", heads=6, kv_heads=2, seed=0):
    return tiny_random_model(V, arch=arch, hidden_size=24, num_heads=heads, num_kv_heads=kv_heads, seed=seed)


def decode_logits(model, ids, mask, steps, gen):
    """Prefill then ``steps`` single-token steps on a StaticCache with an explicit mask:
    list of ``[B, V]`` logits."""
    from transformers import StaticCache

    B, P = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=P + steps)
    full = torch.cat([mask, torch.ones(B, steps, dtype=mask.dtype)], 1)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache},
                cache_position=torch.arange(P), use_cache=True)
    logits = [out.logits[:, -1]]
    nxt = pos[:, -1:] + 1
    for t in range(steps):
        tok = torch.randint(0, V, (B, 1), generator=gen)
        out = model(input_ids=tok, attention_mask=full, position_ids=nxt + t, **{cache_kwarg(model): cache},
                    cache_position=torch.tensor([P + t]), use_cache=True)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("arch,heads,kv_heads", [("qwen2", 6, 2), ("llama", 4, 2), ("llama", 4, 1)])
@torch.no_grad()
def test_packed_decode_equals_hf_sdpa(gen, monkeypatch, arch, heads, kv_heads):
    model = gqa_model(arch, heads, kv_heads, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    assert model.config._attn_implementation == "sdpa"
    B, P, steps = 3, 5, 4
    ids = torch.randint(0, V, (B, P), generator=gen)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    want = decode_logits(model, ids, mask, steps, torch.Generator().manual_seed(seed))
    calls = []
    packed = attention.packed_sdpa_attention

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return packed(module, query, *args, **kwargs)
    monkeypatch.setattr(attention, "packed_sdpa_attention", spy)
    monkeypatch.setattr(attention, "_registered", False)  # register the spy
    with attention.packed_decode_attention(model):
        assert model.config._attn_implementation == attention.NAME
        got = decode_logits(model, ids, mask, steps, torch.Generator().manual_seed(seed))
    assert model.config._attn_implementation == "sdpa"
    assert calls.count(1) == steps * model.config.num_hidden_layers  # every decode step went through it
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    attention._registered = False
    attention._register()  # leave the real function registered for the other tests


def test_samplers_restore_the_model(monkeypatch):
    model = gqa_model()
    ids = torch.tensor([[1, 2, 3]])
    smc_generate(model, ids, num_particles=2, max_new_tokens=2, cache="static")
    power_sample(model, ids, num_chains=2, max_new_tokens=2, block_size=1, n_mcmc=1)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError):
        smc_generate(model, ids, num_particles=0)
    assert model.config._attn_implementation == "sdpa"


def test_off_switch_and_other_implementations(monkeypatch):
    model = gqa_model()
    monkeypatch.setenv("TSMC_PACKED_GQA", "0")
    with attention.packed_decode_attention(model):
        assert model.config._attn_implementation == "sdpa"
    monkeypatch.delenv("TSMC_PACKED_GQA")
    model.set_attn_implementation("eager")
    with attention.packed_decode_attention(model):
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_samplers_give_the_same_run(monkeypatch, arch):
    """Packed or not, the same particles and chains (same seed)."""
    model = gqa_model() if arch == "qwen2" else tiny_random_model(V, arch="gpt2", hidden_size=24, num_heads=6)
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    smc_kw = dict(num_particles=4, max_new_tokens=6, ess_threshold=1.0, cache="static", seed=5)
    pow_kw = dict(num_chains=2, max_new_tokens=6, block_size=3, n_mcmc=2, seed=5)
    packed = smc_generate(model, ids, mask, **smc_kw), power_sample(model, ids, mask, **pow_kw)
    monkeypatch.setenv("TSMC_PACKED_GQA", "0")
    plain = smc_generate(model, ids, mask, **smc_kw), power_sample(model, ids, mask, **pow_kw)
    assert torch.equal(packed[0].completions, plain[0].completions)
    torch.testing.assert_close(packed[0].log_z, plain[0].log_z, atol=1e-4, rtol=0)
    assert torch.equal(packed[1].completions, plain[1].completions)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_packed_decode_equals_hf_sdpa_on_cuda(cuda_device, gen, dtype):
    """On the GPU SDPA picks other kernels (memory-efficient / cuDNN with the mask): same logits."""
    model = gqa_model("qwen2", 6, 2).to(cuda_device, dtype)
    B, P, steps = 4, 7, 5
    ids = torch.randint(0, V, (B, P), generator=gen)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def run():
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=P + steps)
        g = torch.Generator().manual_seed(seed)
        d_ids, d_mask = ids.to(cuda_device), mask.to(cuda_device)
        full = torch.cat([d_mask, torch.ones(B, steps, dtype=d_mask.dtype, device=cuda_device)], 1)
        pos = (d_mask.cumsum(1) - 1).clamp_min(0)
        out = [model(input_ids=d_ids, attention_mask=d_mask, position_ids=pos, **{cache_kwarg(model): cache},
                     cache_position=torch.arange(P, device=cuda_device), use_cache=True).logits[:, -1]]
        for t in range(steps):
            tok = torch.randint(0, V, (B, 1), generator=g).to(cuda_device)
            out.append(model(input_ids=tok, attention_mask=full, position_ids=pos[:, -1:] + 1 + t,
                             **{cache_kwarg(model): cache}, cache_position=torch.tensor([P + t], device=cuda_device),
                             use_cache=True).logits[:, -1])
        return out
    want = run()
    with attention.packed_decode_attention(model):
        got = run()
    # bf16: rounding in another order; a wrong head mapping is off by the logits' own size (units).
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (0.1, 0.05)
    for w, g in zip(want, got):
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)
