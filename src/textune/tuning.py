"""What trains in a run (`tuning.method`): the whole model, its head alone, or a PEFT adapter with the head.

Its own module because it sits above both `models` (which loads the model) and `adapters` (which wraps it for
PEFT and builds on `models`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from textune.config import TuningConfig
from textune.errors import TextuneError
from textune.models import HEAD_MODULE_NAMES

def apply_tuning(model: PreTrainedModel, tuning: TuningConfig) -> PreTrainedModel:
    """Choose what trains; return the model to train (PEFT methods wrap it).

    `full`: everything trains. `head`: freeze the encoder; the classification head trains, with BERT's pooler
    (dense + tanh on [CLS]) that the head reads, as the PEFT methods do (see `adapters.head_modules`):
    sentence-transformers checkpoints such as the packaged MiniLM ship that pooler untrained.
    `lora` (and its variants DoRA, rsLoRA), `adalora`, `qlora`, `prefix`, `ia3`: a PEFT model whose adapter and
    head train (see textune.adapters).
    """
    method = tuning.method
    if method in ("lora", "adalora", "qlora", "prefix", "ia3"):
        from textune.adapters import apply_peft  # PEFT: imported only for the runs that use it

        return apply_peft(model, tuning)
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "head":
        model.requires_grad_(False)
        head_names = HEAD_MODULE_NAMES
        trainable = [n for n, _ in model.named_children() if n in head_names]
        if not trainable:
            raise TextuneError(f"tuning.method head: {type(model).__name__} has no classification head named one "
                               f"of {head_names}; use tuning.method full")
        for n in trainable:
            getattr(model, n).requires_grad_(True)
        pooler = getattr(getattr(model, model.base_model_prefix, None), "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(True)
        return model
    raise TextuneError(f"tuning.method {method!r} is not supported here")



def optimizer_step_hook(model: torch.nn.Module, total_steps: int) -> Callable[[int], None] | None:
    """What the tuning method does after each optimizer step of a run of `total_steps` steps (AdaLoRA moves rank
    between layers), called by the loop with the step's index (from 0) before the gradients are cleared; None
    for the methods that do nothing there. See `adapters.optimizer_step_hook`."""
    if not getattr(model, "peft_config", None):  # not a PEFT model: no need to import PEFT
        return None
    from textune.adapters import optimizer_step_hook as peft_hook

    return peft_hook(model, total_steps)
