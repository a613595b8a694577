"""Twist heads: learned ``log psi_t(s_<t, v)`` for every vocabulary token (SPEC §3).

Every head is a :class:`torch.nn.Module` that plugs into :func:`tsmc_kernels.smc_generate` as
``twist=head``::

    head(hidden_states, completion_ids=None) -> log psi     # [M, H] -> [M, V], or [M, L, H] -> [M, L, V]

where ``hidden_states`` is the frozen base model's last hidden state (``hidden_states[-1]``) at
the position that predicts the next token. Three parameterisations:

* :class:`MLPTwistHead` — an MLP from the hidden state to ``V`` log-twists (the paper's head).
* :class:`EmbeddingTwistHead` — a small MLP ``g`` then ``g(h) @ W_out^T + b``, reusing the base
  model's output embedding ``W_out`` (frozen, held by reference and never saved: reload with
  ``from_pretrained(path, model=model)``). Few parameters: ``g`` plus a ``[V]`` bias.
* :class:`ModelTwistHead` — a separate small transformer (by default a copy of the base model's
  embeddings and first layers, :meth:`ModelTwistHead.from_model`) with a linear head. It reads
  **token ids**, not the base hidden states, so it needs the prompts: sample inside
  ``with head.bind(input_ids, attention_mask, num_particles): smc_generate(...)`` (it keeps its
  own KV cache and follows resampling by matching each row's tokens against the previous step).

All heads start at ``log psi ≈ 0`` (their last layer is zero), i.e. bootstrap SMC. With
``activation="logsigmoid"`` the output is ``log sigmoid(f)`` (so ``psi in (0, 1)``: what the
FUDGE loss trains; it starts at ``log 1/2``, a constant, still bootstrap SMC).

Teacher forcing (twist training, :mod:`.losses`) goes through :meth:`TwistHead.log_psi_rows` and
:meth:`TwistHead.log_psi_tokens`, which take :class:`TwistInputs` (the base hidden states and the
token ids of the whole sequences) so that id-based heads work too; ``log_psi_tokens`` computes
only the sampled token's column (a gather of the last layer's rows: no ``[M, L, V]`` tensor).

Saving: ``head.save_pretrained(dir)`` writes ``twist_config.json`` and ``twist_head.safetensors``;
``TwistHead.from_pretrained(dir, model=None)`` rebuilds the right class exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import NamedTuple

import torch
from torch import nn

from ..sampler.inputs import cache_kwarg, check_int, left_align, model_vocab, warn_caller

__all__ = ["TwistHead", "MLPTwistHead", "EmbeddingTwistHead", "ModelTwistHead", "TwistInputs", "HEADS",
           "CONFIG_NAME", "WEIGHTS_NAME", "model_vocab_size", "model_hidden_size", "bind_prompts"]

CONFIG_NAME = "twist_config.json"
WEIGHTS_NAME = "twist_head.safetensors"
ACTIVATIONS = ("none", "logsigmoid")
HEADS: dict[str, type] = {}


def register_head(name: str):
    def deco(cls):
        cls.head_type = name
        HEADS[name] = cls
        return cls
    return deco


class TwistInputs(NamedTuple):
    """Teacher-forced inputs of a head for ``M`` sequences of ``L`` completion positions.

    Position ``t`` (0-based) is the state that proposes completion token ``t``: the base model's
    last hidden state after the prompt and ``completion[:t]``.

    Attributes:
        hidden: ``[M, L, H]`` base-model last hidden states (detached).
        ids: int64 ``[M, P + L]`` prompt (left padded) then completion.
        mask: ``[M, P + L]`` attention mask (1 = token).
        prompt_len: ``P`` (padded prompt width): position ``t`` reads ``ids[:, : P + t]``.
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int

    def select(self, rows) -> "TwistInputs":
        """The inputs of a subset of rows (a slice or an index tensor)."""
        return TwistInputs(self.hidden[rows], self.ids[rows], self.mask[rows], self.prompt_len)


def model_vocab_size(model) -> int:
    """The width of the model's logits (rows of its output embedding, else ``config.vocab_size``)."""
    vocab = model_vocab(model)
    return vocab if vocab is not None else int(_text_config(model).vocab_size)


def model_hidden_size(model) -> int:
    cfg = _text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise ValueError(f"cannot find the hidden size of {type(model).__name__}")


def _refuse_model_sizes(cls, kwargs: dict, sizes: tuple[str, ...]) -> None:
    """``for_model`` takes these sizes from the model: a caller's value is an error, not ignored."""
    given = [k for k in sizes if k in kwargs]
    if given:
        raise ValueError(f"{cls.__name__}.for_model takes {', '.join(given)} from the model; "
                         f"build {cls.__name__}(...) directly to choose them")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with GELU between them (no final activation)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
    return nn.Sequential(*layers)


@contextlib.contextmanager
def seeded_init(seed: int | None):
    """Within the block, new layers draw their random initial weights from ``seed`` (the CPU
    generator, forked: left as it was; heads are built on the CPU, and the CUDA generators are not
    touched). ``None``: torch's global RNG, unchanged."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))  # not torch.manual_seed: it reseeds CUDA too
        yield


def _check_mlp_sizes(num_layers: int, **sizes) -> None:
    """``num_layers >= 1``; each of ``sizes`` None (the default width) or an int >= 1."""
    check_int("num_layers", num_layers, 1)
    for name, value in sizes.items():
        if value is not None:
            check_int(name, value, 1, " (or None: the hidden size)")


def _zero_(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


class TwistHead(nn.Module):
    """Base class: configuration, activation, save/load, compatibility checks.

    Subclasses implement :meth:`_raw` (``[..., H] -> [..., V]`` before the activation) and may
    override :meth:`_raw_tokens` (only the given tokens' columns).
    """

    head_type = "base"
    needs_ids = False  # True: reads token ids (bind the prompts before sampling)
    default_lr = 1e-3  # AdamW learning rate that suits the head (fit_twist's default)

    def __init__(self, *, vocab_size: int, hidden_size: int, activation: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_int("vocab_size", vocab_size, 1)
        check_int("hidden_size", hidden_size, 1)
        self.vocab_size, self.hidden_size, self.activation = int(vocab_size), int(hidden_size), activation
        self.trained_for: dict | None = None  # the model it was built for / attached to (saved with it)

    def remember(self, model) -> None:
        """Record ``model``'s type and name: saved with the head, checked when it is loaded on a model."""
        self.trained_for = _model_identity(model)

    # ------------------------------------------------------------------ config / save / load
    def get_config(self) -> dict:
        """JSON-serialisable constructor arguments."""
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "activation": self.activation}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``twist_config.json`` and ``twist_head.safetensors`` (the head's own parameters only)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = {"head_type": self.head_type, "format_version": 1, "dtype": _dtype_name(self.dtype),
                  **self.get_config(), **({"trained_for": self.trained_for} if self.trained_for else {})}
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, model=None, device=None, dtype: torch.dtype | None = None):
        """Load a head saved by :meth:`save_pretrained` (any head type when called on :class:`TwistHead`).

        Args:
            model: the base model; required by :class:`EmbeddingTwistHead` (its output embedding is
                re-attached), otherwise used to check the vocabulary and as the default device.
            device: default: the model's device, else CPU. dtype: default: the saved dtype.
        """
        from safetensors.torch import load_file

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved twist head")
        with open(path) as f:
            config = json.load(f)
        head_type = config.pop("head_type", None)
        config.pop("format_version", None)
        trained_for = config.pop("trained_for", None)
        saved_dtype = getattr(torch, config.pop("dtype", "float32"))
        if head_type not in HEADS:
            raise ValueError(f"unknown twist head type {head_type!r} in {path}; known: {sorted(HEADS)}")
        klass = HEADS[head_type]
        if cls is not TwistHead and not issubclass(klass, cls):
            raise ValueError(f"{directory} holds a {klass.__name__}, not a {cls.__name__}")
        head = klass._from_config(config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        head.load_state_dict(state, strict=True)
        if device is None:
            device = next(model.parameters()).device if model is not None else torch.device("cpu")
        head = head.to(device=device, dtype=dtype or saved_dtype)
        head.trained_for = trained_for
        if model is not None:
            _warn_on_other_model(head, model, directory)
            head.attach(model)
        elif getattr(klass, "needs_model", False):
            raise ValueError(f"{klass.__name__} reuses the base model's output embedding: "
                             f"load it with {klass.__name__}.from_pretrained(path, model=model)")
        return head.eval()

    @classmethod
    def _from_config(cls, config: dict):
        return cls(**config)

    # ------------------------------------------------------------------ model compatibility
    def attach(self, model) -> "TwistHead":
        """Check that ``model`` matches the head (vocabulary, hidden size); heads that reuse model
        weights also take their reference here. Returns ``self``."""
        self.check_compatible(model)
        self.remember(model)
        return self

    def check_compatible(self, model) -> None:
        """Raise ``ValueError`` if the head does not fit the base ``model``."""
        v = model_vocab_size(model)
        if v != self.vocab_size:
            raise ValueError(f"{type(self).__name__} has vocab_size {self.vocab_size} but the model's logits have "
                             f"{v} entries (vocab mismatch: a head trained for another model/tokenizer?)")
        if not self.needs_ids:
            h = model_hidden_size(model)
            if h != self.hidden_size:
                raise ValueError(f"{type(self).__name__} expects hidden size {self.hidden_size} but the model's is {h}")

    # ------------------------------------------------------------------ evaluation
    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        return nn.functional.logsigmoid(raw) if self.activation == "logsigmoid" else raw

    def _cast(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"{type(self).__name__} expects hidden states of size {self.hidden_size}, got "
                             f"{tuple(hidden.shape)} (a head for another model?)")
        if hidden.device != self.device:
            raise ValueError(f"hidden states are on {hidden.device} but the twist head is on {self.device}")
        return hidden.to(self.dtype)

    def _raw(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _raw_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._raw(hidden).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def forward(self, hidden_states: torch.Tensor, completion_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``log psi`` for every token: ``[M, H] -> [M, V]`` or ``[M, L, H] -> [M, L, V]`` (head dtype)."""
        return self._activate(self._raw(self._cast(hidden_states)))

    def log_psi_rows(self, inputs: TwistInputs) -> torch.Tensor:
        """Teacher forcing: ``[M, L, V]`` log-twist rows of every position."""
        return self(inputs.hidden)

    def log_psi_tokens(self, inputs: TwistInputs, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``[M, L]`` ``log psi_t(s_<t, tokens[:, t])`` (only those columns are computed)."""
        return self._activate(self._raw_tokens(self._cast(inputs.hidden), tokens))

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, activation={self.activation!r}"


@register_head("mlp")
class MLPTwistHead(TwistHead):
    """``log psi = MLP(h)``: ``num_layers`` linear layers ``H -> mlp_size -> ... -> V`` (GELU between).

    The last layer is zero at initialisation (``log psi = 0``). ``num_layers=1`` is a linear head.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int, mlp_size: int | None = None, num_layers: int = 2,
                 activation: str = "none", dtype: torch.dtype | None = None):
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, activation=activation)
        _check_mlp_sizes(num_layers, mlp_size=mlp_size)
        self.mlp_size, self.num_layers = int(mlp_size or hidden_size), int(num_layers)
        sizes = [hidden_size] + [self.mlp_size] * (num_layers - 1)
        self.trunk = _mlp(sizes) if num_layers > 1 else nn.Identity()
        self.act = nn.GELU() if num_layers > 1 else nn.Identity()
        self.out = nn.Linear(sizes[-1], vocab_size)
        _zero_(self.out)
        if dtype is not None:
            self.to(dtype)

    @classmethod
    def for_model(cls, model, *, seed: int | None = None, **kwargs) -> "MLPTwistHead":
        """A head sized for ``model`` (on its device); ``kwargs`` as the constructor; ``seed``: the
        random initial weights (default: torch's global RNG)."""
        _refuse_model_sizes(cls, kwargs, ("vocab_size", "hidden_size"))
        kwargs.setdefault("dtype", torch.float32)
        with seeded_init(seed):
            head = cls(vocab_size=model_vocab_size(model), hidden_size=model_hidden_size(model), **kwargs)
        head.remember(model)
        return head.to(next(model.parameters()).device)

    def get_config(self) -> dict:
        return {**super().get_config(), "mlp_size": self.mlp_size, "num_layers": self.num_layers}

    def _features(self, hidden):
        return self.act(self.trunk(hidden))

    def _raw(self, hidden):
        return self.out(self._features(hidden))

    def _raw_tokens(self, hidden, tokens):
        z = self._features(hidden)
        return (z * self.out.weight[tokens]).sum(-1) + self.out.bias[tokens]


@register_head("embedding")
class EmbeddingTwistHead(TwistHead):
    """``log psi = g(h) @ W_out^T + b``: a small MLP ``g: H -> E`` and the base model's output embedding.

    ``W_out`` (``[V, E]``) is the model's ``get_output_embeddings().weight``, used detached: it is
    neither trained nor saved (re-attach with ``from_pretrained(path, model=model)`` or
    :meth:`attach`). Trainable: ``g`` and the ``[V]`` bias ``b``; ``g``'s last layer is zero at init.
    """

    needs_model = True
    default_lr = 1e-4  # every token's log psi moves with g(h): Adam steps are large in function space

    def __init__(self, *, vocab_size: int, hidden_size: int, embedding_size: int | None = None,
                 mlp_size: int | None = None, num_layers: int = 2, activation: str = "none",
                 dtype: torch.dtype | None = None, model=None):
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, activation=activation)
        _check_mlp_sizes(num_layers, mlp_size=mlp_size, embedding_size=embedding_size)
        self.embedding_size = int(embedding_size or hidden_size)
        self.mlp_size, self.num_layers = int(mlp_size or hidden_size), int(num_layers)
        self.g = _mlp([hidden_size] + [self.mlp_size] * (num_layers - 1) + [self.embedding_size])
        _zero_(self.g[-1])
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self._w_out: tuple = ()  # (weight,) of the base model; a tuple so it is not registered
        if dtype is not None:
            self.to(dtype)
        if model is not None:
            self.attach(model)

    @classmethod
    def for_model(cls, model, *, seed: int | None = None, **kwargs) -> "EmbeddingTwistHead":
        """A head sized for ``model``, attached to its output embedding; ``kwargs`` as the constructor;
        ``seed``: the random initial weights (default: torch's global RNG)."""
        _refuse_model_sizes(cls, kwargs, ("vocab_size", "hidden_size", "embedding_size"))
        kwargs.setdefault("dtype", torch.float32)
        w = model.get_output_embeddings().weight
        with seeded_init(seed):
            head = cls(vocab_size=w.shape[0], hidden_size=model_hidden_size(model), embedding_size=w.shape[1],
                       **kwargs)
        return head.to(w.device).attach(model)

    def get_config(self) -> dict:
        return {**super().get_config(), "embedding_size": self.embedding_size, "mlp_size": self.mlp_size,
                "num_layers": self.num_layers}

    def attach(self, model) -> "EmbeddingTwistHead":
        self.check_compatible(model)
        emb = model.get_output_embeddings()
        if emb is None or getattr(emb, "weight", None) is None:
            raise ValueError(f"{type(model).__name__} has no output embedding to reuse")
        if emb.weight.shape[1] != self.embedding_size:
            raise ValueError(f"the model's output embedding has width {emb.weight.shape[1]} but the head was built "
                             f"for {self.embedding_size}")
        self._w_out = (emb.weight,)
        self.remember(model)
        return self

    @property
    def output_embedding(self) -> torch.Tensor:
        if not self._w_out:
            raise RuntimeError("EmbeddingTwistHead has no output embedding attached: build it with "
                               "EmbeddingTwistHead.for_model(model), load it with from_pretrained(path, model=model), "
                               "or call head.attach(model)")
        w = self._w_out[0]
        if w.device != self.device:
            raise ValueError(f"the model's output embedding is on {w.device} but the head is on {self.device}")
        return w.detach().to(self.dtype)

    def _raw(self, hidden):
        return nn.functional.linear(self.g(hidden), self.output_embedding, self.bias)

    def _raw_tokens(self, hidden, tokens):
        return (self.g(hidden) * self.output_embedding[tokens]).sum(-1) + self.bias[tokens]


@register_head("model")
class ModelTwistHead(TwistHead):
    """A separate small transformer over the token ids, with a linear head to ``V`` log-twists.

    Build it with :meth:`from_model` (a copy of the base model's embeddings, its first
    ``num_layers`` layers and final norm; all trainable) or from any HF config (``model_config``,
    a ``config.to_dict()``). It ignores the base model's hidden states and reads the prompt and the
    completion ids, so it must know the prompts of its rows: :func:`~tsmc_kernels.smc_generate`
    (and everything built on it: the bounds, training, evaluation) binds it to its own prompts for
    the call. To call the head directly, bind them yourself::

        with head.bind(input_ids, attention_mask, num_particles):
            log_psi = head(None, completion_ids)  # [B * num_particles, V]

    While bound it keeps a KV cache; at each call it matches every row's previous tokens with the
    rows of the previous call (resampling copies rows within a prompt) and reorders the cache, or
    recomputes from scratch if a row matches nothing.
    """

    needs_ids = True
    default_lr = 1e-4

    def __init__(self, *, model_config: dict, vocab_size: int, hidden_size: int | None = None,
                 activation: str = "none", dtype: torch.dtype | None = None):
        from transformers import AutoConfig, AutoModel

        cfg_dict = dict(model_config)
        model_type = cfg_dict.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
        width = _config_hidden_size(cfg)
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size or width, activation=activation)
        self.model_config = cfg.to_dict()
        self.backbone = AutoModel.from_config(cfg)
        self._cache_kw = cache_kwarg(self.backbone)
        self.out = nn.Linear(width, vocab_size)
        _zero_(self.out)
        if dtype is not None:
            self.to(dtype)
        self._bound = None
        self._cache = None
        self._prev = None

    @classmethod
    def from_model(cls, model, *, num_layers: int = 2, copy_weights: bool = True, activation: str = "none",
                   dtype: torch.dtype | None = torch.float32, seed: int | None = None) -> "ModelTwistHead":
        """A head whose backbone is the base model truncated to its first ``num_layers`` layers.

        Args:
            copy_weights: initialise the backbone from the base model (else random init).
            seed: the random initial weights (default: torch's global RNG).
        """
        cfg = _text_config(model).to_dict()
        layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", num_layers)))
        check_int("num_layers", num_layers, 1)
        if num_layers > layers:
            raise ValueError(f"num_layers={num_layers}: the base model has only {layers} layers to copy")
        cfg["num_hidden_layers"] = int(num_layers)
        for key in ("n_layer", "num_layers"):
            if key in cfg:
                cfg[key] = int(num_layers)
        # Per-layer lists (Qwen2's layer_types, ...) describe the kept first layers only.
        for key, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == layers and "layer" in key:
                cfg[key] = value[: int(num_layers)]
        cfg.pop("transformers_version", None)
        with seeded_init(seed):
            head = cls(model_config=cfg, vocab_size=model_vocab_size(model), hidden_size=model_hidden_size(model),
                       activation=activation)
        if copy_weights:
            src = model.base_model.state_dict()
            own = head.backbone.state_dict()
            shared = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
            head.backbone.load_state_dict(shared, strict=False)
        head.remember(model)
        head = head.to(next(model.parameters()).device)
        return head.to(dtype) if dtype is not None else head

    @classmethod
    def _from_config(cls, config: dict):
        return cls(**config)

    def get_config(self) -> dict:
        cfg = {k: v for k, v in self.model_config.items() if _jsonable(v)}
        cfg.pop("transformers_version", None)
        return {**super().get_config(), "model_config": cfg}

    # ------------------------------------------------------------------ prompts / cache
    @contextlib.contextmanager
    def bind(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_particles: int):
        """Context in which ``head(hidden, completion_ids)`` knows the prompts of the ``B * N`` rows."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Left-aligned like the sampler's prompts: the head reads each row's last column.
        input_ids, attention_mask = left_align(input_ids, attention_mask.reshape(input_ids.shape))
        N = int(num_particles)
        prompt = input_ids.repeat_interleave(N, 0).to(self.device)
        mask = attention_mask.to(device=self.device, dtype=torch.long).repeat_interleave(N, 0)
        group = torch.arange(input_ids.shape[0], device=self.device).repeat_interleave(N)
        old = (self._bound, self._cache, self._prev)
        self._bound, self._cache, self._prev = (prompt, mask, group), None, None
        try:
            yield self
        finally:
            self._bound, self._cache, self._prev = old

    def _backbone(self, ids, mask, position_ids, cache=None, **kw):
        """Last hidden states; ``cache`` (filled in place) goes under the keyword the backbone takes."""
        if cache is not None:
            kw[self._cache_kw] = cache
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, return_dict=True, **kw)
        return out.last_hidden_state

    @staticmethod
    def _positions(mask):
        return (mask.cumsum(1) - 1).clamp_min(0)

    def forward(self, hidden_states: torch.Tensor | None = None, completion_ids: torch.Tensor | None = None):
        """Sampling: ``[M, V]`` log-twists after the bound prompts and ``completion_ids [M, t]``."""
        if self._bound is None:
            raise RuntimeError("ModelTwistHead reads the prompts: call it inside `with head.bind(input_ids, "
                               "attention_mask, num_particles):` (smc_generate does this itself), or use "
                               "log_psi_rows for teacher forcing")
        if completion_ids is None:
            raise ValueError("ModelTwistHead needs completion_ids")
        from transformers import DynamicCache

        prompt, pmask, group = self._bound
        M, t = completion_ids.shape
        if M != prompt.shape[0]:
            raise ValueError(f"ModelTwistHead was bound to {prompt.shape[0]} rows but got {M}")
        completion_ids = completion_ids.to(self.device)
        src = self._match(completion_ids)
        if src is None:  # (re)compute the whole sequence
            ids = torch.cat([prompt, completion_ids], 1)
            mask = torch.cat([pmask, torch.ones_like(completion_ids)], 1)
            self._cache = DynamicCache(config=self.backbone.config)
            h = self._backbone(ids, mask, self._positions(mask), cache=self._cache, use_cache=True)
        else:
            if not bool((src == torch.arange(M, device=src.device)).all()):
                self._cache.reorder_cache(src)
            P = prompt.shape[1]
            mask = torch.cat([pmask, torch.ones(M, t, dtype=pmask.dtype, device=pmask.device)], 1)
            pos = (pmask.sum(1) + t - 1).unsqueeze(1)
            h = self._backbone(completion_ids[:, t - 1:], mask, pos, cache=self._cache, use_cache=True,
                               cache_position=torch.tensor([P + t - 1], device=self.device))
        self._prev = completion_ids.clone()
        return self._activate(self.out(h[:, -1]))

    def _match(self, completion_ids: torch.Tensor):
        """Cache row each row continues (``[M]``), or None to recompute."""
        prev = self._prev
        t = completion_ids.shape[1]
        if self._cache is None or prev is None or t == 0 or prev.shape[1] != t - 1:
            return None
        cur = completion_ids[:, : t - 1]
        M = cur.shape[0]
        own = torch.arange(M, device=cur.device)
        same = (cur == prev).all(1)
        if bool(same.all()):
            return own
        group = self._bound[2]
        eq = (cur[:, None, :] == prev[None, :, :]).all(-1) & (group[:, None] == group[None, :])
        if not bool(eq.any(1).all()):
            return None
        return torch.where(same, own, eq.float().argmax(1))

    # ------------------------------------------------------------------ teacher forcing
    def _features(self, inputs: TwistInputs) -> torch.Tensor:
        L = inputs.hidden.shape[1] if inputs.hidden is not None else inputs.ids.shape[1] - inputs.prompt_len
        ids = inputs.ids.to(self.device)
        mask = inputs.mask.to(device=self.device, dtype=torch.long)
        h = self._backbone(ids, mask, self._positions(mask), use_cache=False)
        P = inputs.prompt_len
        return h[:, P - 1: P - 1 + L]

    def log_psi_rows(self, inputs: TwistInputs) -> torch.Tensor:
        return self._activate(self.out(self._features(inputs)))

    def log_psi_tokens(self, inputs: TwistInputs, tokens: torch.Tensor) -> torch.Tensor:
        z = self._features(inputs)
        return self._activate((z * self.out.weight[tokens]).sum(-1) + self.out.bias[tokens])

    def check_compatible(self, model) -> None:
        super().check_compatible(model)


def _model_identity(model) -> dict:
    return {"model_type": getattr(_text_config(model), "model_type", "") or "",
            "name_or_path": str(getattr(model.config, "_name_or_path", "") or "")}


def _warn_on_other_model(head: "TwistHead", model, directory) -> None:
    """A head loaded on another kind or checkpoint of model than it was saved from still fits when
    the sizes match, but its twist was learned for other hidden states (and an embedding head takes
    this model's output embedding): a warning, not an error."""
    saved, now = head.trained_for, _model_identity(model)
    if not saved:
        return
    differs = [k for k in ("model_type", "name_or_path") if saved.get(k) and now.get(k) and saved[k] != now[k]]
    if differs:
        was = ", ".join(f"{k} {saved[k]!r}" for k in differs)
        got = ", ".join(f"{k} {now[k]!r}" for k in differs)
        warn_caller(f"the twist head in {directory} was trained for a model with {was}, not this one ({got}): "
                    "its twist may not fit this model's hidden states")


def _config_hidden_size(cfg) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise ValueError(f"cannot find the hidden size in {type(cfg).__name__}")


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def bind_prompts(head, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_particles: int):
    """``head.bind(...)`` for heads that read token ids, else a no-op context."""
    if getattr(head, "needs_ids", False):
        return head.bind(input_ids, attention_mask, num_particles)
    return contextlib.nullcontext(head)
