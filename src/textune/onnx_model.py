"""An ONNX export (`textune export`) run by ONNX Runtime behind the model call the predictors make.

`OnnxModel` answers `model(input_ids=..., attention_mask=...)` like a transformers model, so every task's
predictor runs on an export unchanged; `textune.infer.load_trained_model` returns one for an export folder.
Writing exports is `textune.export`'s; this module only reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from textune.errors import ONNX_MODEL_FILE, TextuneError
from textune.models import load_tokenizer

INSTALL_HINT = "pip install 'textune[onnx]' (onnx and onnxruntime)"


def require(*packages: str) -> None:
    """Refuse in one line, with the install command, where ONNX's packages are missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise TextuneError(f"ONNX export and inference need {' and '.join(missing)}; run: {INSTALL_HINT}")


class OnnxOutput(dict):
    """The outputs of one call, by name, also as attributes (`out.logits`), as transformers' ModelOutput."""

    __getattr__ = dict.__getitem__


class OnnxModel:
    """An exported model on an ONNX Runtime CPU session, called as the predictors call a transformers model:
    `model(input_ids=..., attention_mask=..., token_type_ids=...)` -> `OnnxOutput` of torch tensors
    (`logits`, or `start_logits` and `end_logits`), with the model's `config`. Inputs the export does not
    take are ignored. `file`: another graph of the folder than model.onnx (export compares its fused graph)."""

    def __init__(self, folder: str | Path, file: str = ONNX_MODEL_FILE):
        require("onnxruntime")
        import onnxruntime as ort
        from transformers import AutoConfig

        options = ort.SessionOptions()
        # the thread count torch was given (predict, serve --threads) holds for the session too
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(Path(folder) / file), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = AutoConfig.from_pretrained(folder)
        self.device = torch.device("cpu")

    def __call__(self, **inputs) -> OnnxOutput:
        feed = {n: inputs[n].detach().cpu().numpy().astype(np.int64) for n in self.input_names}
        return OnnxOutput(zip(self.output_names, map(torch.from_numpy, self.session.run(self.output_names, feed))))

    def to(self, device) -> OnnxModel:  # the session stays on the CPU; predictors read `device` from it
        return self

    def eval(self) -> OnnxModel:
        return self


def load_onnx_model(folder: str | Path) -> tuple[OnnxModel, object]:
    """(OnnxModel, tokenizer) of an export folder."""
    return OnnxModel(folder), load_tokenizer(str(folder))
