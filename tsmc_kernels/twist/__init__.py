"""Twist learning (SPEC §3): heads (:mod:`.heads`), losses (:mod:`.losses`), training (:mod:`.trainer`).

    head = EmbeddingTwistHead.for_model(model, seed=0)     # or MLPTwistHead / ModelTwistHead.from_model
    history = fit_twist(model, head, prompts, potential, loss="ctl", steps=50, tokenizer=tok)
    out = smc_generate(model, ids, mask, twist=head, potential=potential, num_particles=16)
    head.save_pretrained("twist"); head = TwistHead.from_pretrained("twist", model=model)

``TwistTrainer`` does the same as a ``transformers.Trainer``. The trainer module imports
``transformers`` lazily (only when :class:`TwistTrainer` is used).
"""
from .heads import (HEADS, EmbeddingTwistHead, MLPTwistHead, ModelTwistHead, TwistHead,  # noqa: F401
                    TwistInputs, bind_prompts)
from .losses import (LOSSES, PrefixQuantities, TwistBatch, ctl_loss, dpg_loss, fudge_loss,  # noqa: F401
                     make_batch, prefix_quantities, sixo_loss, soft_q_loss, teacher_force, twist_loss)

__all__ = ["TwistHead", "MLPTwistHead", "EmbeddingTwistHead", "ModelTwistHead", "TwistInputs", "HEADS",
           "bind_prompts", "LOSSES", "TwistBatch", "PrefixQuantities", "teacher_force", "prefix_quantities",
           "make_batch", "twist_loss", "ctl_loss", "sixo_loss", "fudge_loss", "soft_q_loss", "dpg_loss",
           "fit_twist", "sample_batch", "TwistTrainer", "TwistModule", "PromptDataset", "PromptCollator",
           "tokenize_prompts", "IndexedPotential"]

_TRAINER = {"fit_twist", "sample_batch", "TwistTrainer", "TwistModule", "PromptDataset", "PromptCollator",
            "tokenize_prompts", "IndexedPotential"}


def __getattr__(name):
    if name in _TRAINER:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
