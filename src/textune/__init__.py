"""textune: fine-tune, evaluate and use pretrained Transformer models on text tasks.

The modules follow the pipeline: config -> data -> models -> train -> evaluate -> infer; `cli` drives them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
