"""Parameter-efficient fine-tuning on PEFT: LoRA (with DoRA, rsLoRA, LoRA+), AdaLoRA, QLoRA, prefix tuning and IA3;
adapter runs; many adapters on one base.

A PEFT run saves only its adapter in RUN/model: `adapter_config.json` (which names the base model) and
`adapter_model.safetensors` (the adapter and the classification head, a few MB), beside the tokenizer and
the classifier's `config.json` (its labels). Loading it loads the base model first, then the adapter.
`merge_adapter` folds a LoRA/AdaLoRA/IA3 adapter into a plain transformers model. An `AdapterRegistry` is a folder
of named adapters trained on one base model; `AdapterPredictor` loads that base once and switches adapters.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from peft import (AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, PeftModel, PeftModelForQuestionAnswering,
                  PrefixTuningConfig, TaskType, get_peft_model)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    ModulesToSaveWrapper,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from textune.atomic import replace_atomically
from textune.config import QLORA_UNAVAILABLE, TuningConfig
from textune.errors import TextuneError
from textune.model_card import write_model_card
from textune.models import (HEAD_MODULE_NAMES, auto_model_class, copy_prediction_files, inference_device,
                            inference_max_length, load_classifier, load_tokenizer, resolve_model, resolve_run_model,
                            saved_run_config)
from textune.tasks import DEFAULT_TASK, SEQUENCE_HEAD, architecture_of, get_task, task_of

PEFT_METHODS = ("lora", "adalora", "qlora", "prefix", "ia3")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REGISTRY_INDEX = "registry.json"
# PEFT's names -> tuning.method (QLoRA, DoRA and rsLoRA save LORA adapters)
PEFT_TYPE_METHODS = {"LORA": "lora", "ADALORA": "adalora", "PREFIX_TUNING": "prefix", "IA3": "ia3"}
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # PEFT keys modules by adapter name: no dots


# ---------------------------------------------------------------- wrapping a model for training


def apply_peft(model: PreTrainedModel, tuning: TuningConfig) -> PeftModel:
    """Wrap a classifier for a PEFT `tuning.method` (see `PEFT_METHODS`); the classification head trains too.

    Raises:
        TextuneError: a target module the model does not have, or no default targets for its architecture;
            qlora without a CUDA GPU or bitsandbytes.
    """
    if tuning.method == "prefix":
        _accept_past_key_values(model)
    if tuning.method == "qlora":
        model = quantize_4bit(model, keep=head_modules(model))
    return _pass_every_input(get_peft_model(model, peft_config_for(model, tuning)))


def _pass_every_input(model: PeftModel) -> PeftModel:
    """PEFT's question-answering wrapper (peft 0.21) passes neither token_type_ids nor position_ids on to a
    LoRA/IA3 model: a BERT-style model would train with question and context both in segment 0, while its merged
    form reads them as two segments and answers otherwise. PEFT's generic forward passes every input on; give
    the wrapper that one. Prefix tuning keeps the wrapper's own (it adds the prefix's segment ids)."""
    if isinstance(model, PeftModelForQuestionAnswering) and not model.active_peft_config.is_prompt_learning:
        model.forward = types.MethodType(PeftModel.forward, model)
    return model


def peft_config_for(model: PreTrainedModel, tuning: TuningConfig) -> PeftConfig:
    """The PEFT config of `tuning` for this model: target modules checked, head saved with the adapter.

    PEFT's task type is the model's architecture's (`tasks.Architecture.peft_task_type`): a causal LM (textune
    pretrain, objective clm; instruction tuning) gets CAUSAL_LM, whose wrapper passes labels through and
    generates; its LM head stays frozen (tied to the embeddings in GPT-2/Llama)."""
    heads = head_modules(model)
    task = TaskType[(architecture_of([type(model).__name__]) or SEQUENCE_HEAD).peft_task_type]
    if tuning.method == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=tuning.num_virtual_tokens,
                                  modules_to_save=heads)
    if tuning.method in ("lora", "qlora", "adalora"):
        adalora = tuning.method == "adalora"
        targets = tuning.target_modules or _default_targets(
            model, TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING if adalora
            else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
        check_target_modules(model, targets)
        common = dict(task_type=task, lora_alpha=tuning.alpha, lora_dropout=tuning.dropout, target_modules=targets,
                      modules_to_save=heads)
        if adalora:
            # total_step 1 is a placeholder that PEFT's checks accept: the loop sets the real schedule when it
            # knows its number of steps (`optimizer_step_hook`).
            return AdaLoraConfig(init_r=tuning.r, target_r=tuning.target_r or max(1, tuning.r // 2), total_step=1,
                                 **common)
        return LoraConfig(r=tuning.r, use_dora=tuning.use_dora, use_rslora=tuning.use_rslora, **common)
    if tuning.method == "ia3":
        targets = tuning.target_modules or _default_targets(model, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
        check_target_modules(model, targets)
        # IA3 scales the input of feed-forward layers and the output of the others; PEFT knows which is which.
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
        return IA3Config(task_type=task, target_modules=targets,
                         feedforward_modules=[m for m in feedforward if m in targets], modules_to_save=heads)
    raise TextuneError(f"tuning.method {tuning.method!r} is not a PEFT method; expected one of {', '.join(PEFT_METHODS)}")


def optimizer_step_hook(model: torch.nn.Module, total_steps: int) -> Callable[[int], None] | None:
    """What the PEFT method of `model` does after each optimizer step of a run of `total_steps`, called with the
    step's index (from 0) before the gradients are cleared; None when it does nothing.

    AdaLoRA scores each rank of each layer by its weights times their gradients and moves the rank budget to
    the layers that matter (PEFT `update_and_allocate`). Its schedule is set here, where the number of steps is
    known, after the AdaLoRA paper: ranks stay put for the first 10% of steps while the scores settle, the
    budget falls from tuning.r to tuning.target_r per layer until 80%, and the last 20% train the final ranks.
    """
    if not isinstance(model, PeftModel) or not isinstance(model.active_peft_config, AdaLoraConfig):
        return None
    config = model.active_peft_config
    config.total_step, config.tinit, config.tfinal = total_steps, int(0.1 * total_steps), int(0.2 * total_steps)
    final = total_steps - config.tfinal

    def allocate(step: int) -> None:
        if step > final and config.rank_pattern is None:
            # A run resumed after the budget was fixed has lost the rank pattern (a checkpoint holds weights, not
            # the adapter's config): score this step's gradients as the last budgeting step, then fix it again.
            model.base_model.update_and_allocate(final - 1)
            step = final
        model.base_model.update_and_allocate(step)

    return allocate


def quantize_4bit(model: PreTrainedModel, keep: list[str]) -> PreTrainedModel:
    """QLoRA's base: the model's Linear layers (all but the modules named in `keep`, the head) replaced by
    bitsandbytes 4-bit NF4 layers on the GPU, the rest in float32 for training (PEFT
    `prepare_model_for_kbit_training`).

    The model the task loaded is quantised in place rather than loaded again with a `quantization_config`:
    whatever the task did to it (its head, resized embeddings, attention implementation) stays as it is.

    Raises:
        TextuneError: no CUDA GPU or no bitsandbytes (`config.QLORA_UNAVAILABLE`).
    """
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise TextuneError(QLORA_UNAVAILABLE)
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    # A causal LM's output layer stays as it is, as transformers' own 4-bit loading leaves it (often tied to the
    # embeddings, and what the loss is read through).
    output_layer = model.get_output_embeddings()
    for name, layer in list(model.named_modules()):
        if (type(layer) is not torch.nn.Linear or layer is output_layer
                or any(name == k or name.startswith(k + ".") for k in keep)):
            continue
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        quantized.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)  # quantised when moved to the GPU
        quantized.bias = layer.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    model.to("cuda")
    # What transformers' 4-bit loading marks a model with: PEFT reads it to give these layers its bitsandbytes
    # LoRA layer (instead of a plain one around them, which could not be merged).
    model.is_loaded_in_4bit = True
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def head_modules(model: PreTrainedModel) -> list[str]:
    """The modules that make up the classification head, trained in full and saved with the adapter.

    task_type SEQ_CLS makes PEFT train `classifier`/`score`; other head parts are named here. BERT's head
    reads the backbone's pooler (dense + tanh on [CLS]), which RoBERTa keeps inside `classifier`: train it
    with the head, as full fine-tuning does (sentence-transformers checkpoints such as the packaged MiniLM
    ship an untrained pooler).
    """
    heads = [n for n, _ in model.named_children() if n in HEAD_MODULE_NAMES]
    # The Linear layer itself, not BertPooler: PEFT's merge_and_unload expects a wrapped module with weights.
    pooler = f"{model.base_model_prefix}.pooler.dense"
    if isinstance(dict(model.named_modules()).get(pooler), torch.nn.Linear):
        heads.append(pooler)
    return heads


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Full names of the layers LoRA/IA3 can adapt (torch Linear, and GPT-2's Conv1D)."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must name a linear layer (exactly or as a dotted suffix, PEFT's matching rule)."""
    layers = linear_layer_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise TextuneError(f"tuning.target_modules: {', '.join(map(repr, missing))} is not a layer of "
                           f"{type(model).__name__}; its linear layers are named: {', '.join(names)}")


def _default_targets(model: PreTrainedModel, mapping: dict[str, list[str]]) -> list[str]:
    targets = mapping.get(model.config.model_type)
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear_layer_names(model)})
        raise TextuneError(f"tuning.target_modules: no default for model type {model.config.model_type!r}; "
                           f"set it to some of its linear layers: {', '.join(names)}")
    return list(targets)


def _accept_past_key_values(model: PreTrainedModel) -> None:
    """Let PEFT's prefix tuning find the encoder's key/value-cache argument.

    PEFT 0.21 passes the learned prefixes as `past_key_values` only to a backbone whose forward lists that
    parameter; transformers 5 renamed it `cache` (still accepting the old name), and PEFT 0.22 looks for the new
    name. Give the backbone instance a forward that lists both and passes the prefixes on as `cache`, so either
    PEFT finds its name. Nothing changes where the names match.
    """
    import inspect

    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        return
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return
    forward = backbone.forward

    def forward_with_prefix(*args, past_key_values=None, cache=None, **kwargs):
        return forward(*args, cache=cache if cache is not None else past_key_values, **kwargs)

    backbone.forward = forward_with_prefix


# ---------------------------------------------------------------- adapter folders: save, load, merge


def is_peft_model(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter_extras(model: PeftModel, folder: Path) -> None:
    """Beside PEFT's files: the classifier's config.json, so the folder says its labels and architecture."""
    base = model.get_base_model()
    base.config.architectures = [type(base).__name__]
    base.config.save_pretrained(folder)


def load_adapter_weights(model: PeftModel, folder: Path) -> None:
    """Put the adapter (and head) weights saved in `folder` back into `model`: the load-best-at-end path.

    An AdaLoRA adapter is saved cut to the ranks it had then (its config's rank_pattern), and PEFT cuts the
    model to its config's pattern before loading: make that the saved one, not the pattern the run ended with.
    """
    config = model.active_peft_config
    if isinstance(config, AdaLoraConfig):
        config.rank_pattern = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("rank_pattern")
    set_peft_model_state_dict(model, load_file(Path(folder) / ADAPTER_WEIGHTS))


def adapter_info(folder: str | Path) -> dict:
    """What an adapter folder says about itself: base model, PEFT type, labels."""
    folder = Path(folder)
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = raw.get("base_model_name_or_path")
    if not base:
        raise TextuneError(f"adapter {folder} does not name its base model (base_model_name_or_path in {ADAPTER_CONFIG})")
    labels, architectures = None, None
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder)
        labels = [config.id2label[i] for i in range(config.num_labels)]
        architectures = config.architectures
    return {"base_model": base, "peft_type": raw["peft_type"], "labels": labels, "architectures": architectures,
            "prompt_learning": raw["peft_type"] in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")}


def _base_path(info: dict, folder: Path) -> str:
    base = info["base_model"]
    if Path(base).is_absolute() and not Path(base).exists():
        raise TextuneError(f"adapter {folder} was trained on the base model {base}, which is no longer there; "
                           f"put the base back or edit base_model_name_or_path in {folder / ADAPTER_CONFIG}")
    return resolve_model(base)


def load_adapter_classifier(folder: str | Path, merge: bool = True):
    """Load base model + adapter from an adapter folder; return (model in eval mode, tokenizer).

    The model takes the config textune saved beside the adapter (labels, and what its task needs to predict:
    `problem_type`, a regression's `label_scale`), not the base's; its Auto class is its architecture's.

    Args:
        merge: fold LoRA/IA3 weights into the base (a plain transformers model, as fast as the base);
            prefix tuning cannot be folded and stays a PEFT model.
    """
    folder = Path(folder)
    info = adapter_info(folder)
    if info["labels"] is None:
        raise TextuneError(f"adapter {folder} has no config.json, so its labels are unknown; "
                           f"it was not saved by textune train")
    model = load_classifier(_base_path(info, folder), info["labels"],
                            auto_class=auto_model_class(info["architectures"]), like=folder)
    if info["prompt_learning"]:
        _accept_past_key_values(model)
    model = _pass_every_input(PeftModel.from_pretrained(model, folder))
    if merge and not info["prompt_learning"]:
        model = model.merge_and_unload()
    return model.eval(), load_tokenizer(str(folder))


def merge_adapter(run_or_model: str | Path, output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write base + LoRA/IA3 adapter as one plain transformers model folder (with named labels); return it.

    The default output is RUN/merged. It carries what the task's predictor reads besides the weights (its
    config.json's settings, and the run files of `Task.prediction_files`), so it predicts as the run does,
    wherever it is moved: it is both model and run folder.

    Raises:
        TextuneError: the folder holds a full model or a prefix-tuning adapter, or the output exists.
    """
    model_dir, run = resolve_run_model(run_or_model)
    if not is_adapter_dir(model_dir):
        raise TextuneError(f"{run_or_model} holds a full model, not an adapter: there is nothing to merge, "
                           f"use it as it is")
    if adapter_info(model_dir)["prompt_learning"]:
        raise TextuneError("prefix tuning adds learned keys and values at run time, which cannot be folded into "
                           "the weights; use the run itself (textune predict RUN)")
    target = Path(output) if output else (run or model_dir.parent) / "merged"
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise TextuneError(f"{target} already exists; pass --overwrite or choose another --output")
        if not (target / "config.json").is_file():
            raise TextuneError(f"{target} exists and is not a model folder; refusing to overwrite it")
    model, tokenizer = load_adapter_classifier(model_dir, merge=True)
    task = get_task(task_of(run or model_dir))
    with replace_atomically(target, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        copy_prediction_files(task.prediction_files, model_dir, run, tmp)
        if run is not None:  # a bare adapter folder has no run files to describe it with
            write_model_card(run, tmp)
    return target


# ---------------------------------------------------------------- many adapters on one base


def folder_size(path: Path, pattern: str = "*") -> int:
    """Bytes of the files under `path` matching `pattern`."""
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


class AdapterRegistry:
    """A folder of named adapters trained on one base model.

    Layout: REGISTRY/registry.json (the base model, the PEFT type, one entry per adapter) and REGISTRY/NAME/
    (a copy of the run's model folder). PEFT switches only between adapters of one type on a loaded base,
    so a registry holds one type.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / REGISTRY_INDEX
        if self.root.exists() and not index.is_file() and any(self.root.iterdir()):
            raise TextuneError(f"{self.root} is not an adapter registry (no {REGISTRY_INDEX}); choose another --registry")
        self.index = json.loads(index.read_text()) if index.is_file() else {"base_model": None, "peft_type": None,
                                                                             "adapters": {}}

    @property
    def base_model(self) -> str | None:
        return self.index["base_model"]

    def names(self) -> list[str]:
        return sorted(self.index["adapters"])

    def entry(self, name: str) -> dict:
        if name not in self.index["adapters"]:
            known = ", ".join(self.names()) or "none yet (add one with: textune adapters add RUN --name NAME)"
            raise TextuneError(f"no adapter {name!r} in registry {self.root}; it holds: {known}")
        return self.index["adapters"][name]

    def path(self, name: str) -> Path:
        self.entry(name)
        return self.root / name

    def add(self, run_or_model: str | Path, name: str | None = None, overwrite: bool = False) -> str:
        """Copy a run's adapter into the registry under `name` (default: the run folder's name); return the name.

        Raises:
            TextuneError: not an adapter, trained on another base, another PEFT type or another kind of head,
                or the name is taken.
        """
        model_dir, run = resolve_run_model(run_or_model)
        name = name or (run or model_dir).name
        if not ADAPTER_NAME.match(name):
            raise TextuneError(f"adapter name {name!r}: use letters, digits, '-' and '_' (no dots or spaces)")
        if not is_adapter_dir(model_dir):
            raise TextuneError(f"{run_or_model} holds a full fine-tuned model, not an adapter; only runs trained "
                               f"with tuning.method {', '.join(PEFT_METHODS)} can be added")
        info = adapter_info(model_dir)
        base = _normalise_base(info["base_model"])
        self._check_fits(run_or_model, info, base, name)
        if name in self.index["adapters"] and not overwrite:
            raise TextuneError(f"adapter {name!r} is already in registry {self.root}; pass --overwrite or choose "
                               f"another --name")
        self.root.mkdir(parents=True, exist_ok=True)
        task = task_of(run or model_dir)
        with replace_atomically(self.root / name, folder=True) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            # what the task predicts with besides the weights: the copy is both model and run folder
            copy_prediction_files(get_task(task).prediction_files, model_dir, run, tmp)
        entry = {"method": _method(info["peft_type"]), "task": task, "labels": info["labels"],
                 "architectures": info["architectures"], "source": str(Path(run or model_dir).resolve()),
                 "added": time.strftime("%Y-%m-%d %H:%M:%S"), **_run_settings(run)}
        self.index.update(base_model=base, peft_type=info["peft_type"])
        self.index["adapters"][name] = entry
        self._write()
        return name

    def _check_fits(self, run_or_model, info: dict, base: str, name: str) -> None:
        """Refuse an adapter that cannot share the registry's loaded base model with the adapters it holds."""
        if self.base_model is not None and base != self.base_model:
            raise TextuneError(f"adapter {run_or_model} was trained on the base model {base}, but registry "
                               f"{self.root} holds adapters for {self.base_model}; an adapter only works on the base "
                               f"it was trained on: use another --registry")
        if self.index["peft_type"] is not None and info["peft_type"] != self.index["peft_type"]:
            raise TextuneError(f"registry {self.root} holds {_method(self.index['peft_type'])} adapters and PEFT "
                               f"switches only between adapters of one type on a loaded base; put this "
                               f"{_method(info['peft_type'])} adapter in another --registry")
        # The base is loaded once, by the Auto class of the first adapter's architecture (a sequence classifier,
        # a token classifier, a question answerer): adapters of another kind of head cannot switch in on it.
        kind = architecture_of(info["architectures"]) or SEQUENCE_HEAD
        held = {(architecture_of(e.get("architectures")) or SEQUENCE_HEAD).auto_class
                for n, e in self.index["adapters"].items() if n != name}
        if held and kind.auto_class not in held:
            raise TextuneError(f"registry {self.root} holds adapters loaded with {', '.join(sorted(held))}, and "
                               f"{run_or_model} needs {kind.auto_class}: the registry loads its base once, with one "
                               f"kind of head; put this adapter in another --registry")

    def remove(self, name: str) -> None:
        self.entry(name)
        shutil.rmtree(self.root / name, ignore_errors=True)
        del self.index["adapters"][name]
        if not self.index["adapters"]:  # an empty registry takes adapters of any base again
            self.index.update(base_model=None, peft_type=None)
        self._write()

    def sizes(self) -> dict:
        """Bytes on disk: the base model's weights and folder, and each adapter's weights and folder."""
        base = Path(self.base_model) if self.base_model else None
        local = base is not None and base.is_dir()
        out = {"base": {"weights": (folder_size(base, "*.safetensors") or folder_size(base, "*.bin")) if local else None,
                        "folder": folder_size(base) if local else None},
               "adapters": {}}
        for name in self.names():
            out["adapters"][name] = {"weights": folder_size(self.root / name, ADAPTER_WEIGHTS),
                                     "folder": folder_size(self.root / name)}
        return out

    def _write(self) -> None:
        with replace_atomically(self.root / REGISTRY_INDEX) as tmp:
            tmp.write_text(json.dumps(self.index, indent=2))


def _method(peft_type: str) -> str:
    return PEFT_TYPE_METHODS.get(peft_type, peft_type.lower())


def _normalise_base(base: str) -> str:
    """The same base model written two ways (relative/absolute path) compares equal."""
    return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base


def _run_settings(run: Path | None) -> dict:
    """The run's max_length and text columns, so predictions tokenise as training did."""
    cfg = saved_run_config(run)
    if not cfg:
        return {}
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    return {"max_length": model.get("max_length"), "text_column": data.get("text_column"),
            "text_pair_column": data.get("text_pair_column")}


def base_model_of(run_or_model: str | Path) -> str:
    """The base model a run/adapter folder was trained on, or the model itself for a plain model or Hub id."""
    path = Path(run_or_model).expanduser()
    if path.exists():
        model_dir, _ = resolve_run_model(path)
        if is_adapter_dir(model_dir):
            return _normalise_base(adapter_info(model_dir)["base_model"])
    return _normalise_base(resolve_model(str(run_or_model)))


class AdapterPredictor:
    """The base model of a registry, loaded once, with its adapters switched in on demand.

    `AdapterPredictor("adapters").predict(["great film"], adapter="sst2")`. The first use of an adapter loads
    it (PEFT `load_adapter`); switching is PEFT `set_adapter`: the base is never reloaded. Each adapter keeps
    its own head, so adapters may have different labels. Predictions are made by the predictor of the
    adapter's task (`Task.load_predictor`'s class), wrapped around the PEFT model.
    """

    def __init__(self, registry: str | Path | AdapterRegistry, batch_size: int = 64, max_length: int | None = None,
                 device: str | None = None):
        self.registry = registry if isinstance(registry, AdapterRegistry) else AdapterRegistry(registry)
        if not self.registry.names():
            raise TextuneError(f"adapter registry {self.registry.root} is empty or missing; add an adapter with: "
                               f"textune adapters add RUN --name NAME --registry {self.registry.root}")
        self.run_dir = None
        self.device = inference_device(device)
        self.batch_size = batch_size
        self.requested_max_length = max_length
        self.tokenizer = load_tokenizer(resolve_model(self.registry.base_model), for_classifier=True)
        self.model: PeftModel | None = None
        self.adapter: str | None = None
        self.predictor = None  # the active adapter's task predictor
        self.task = self.registry.entry(self.registry.names()[0]).get("task", DEFAULT_TASK)
        self.label_names: list[str] = []
        self.max_length = inference_max_length(self.tokenizer, max_length)

    def check_base(self, run_or_model: str | Path) -> None:
        """Refuse a base model (or a run trained on one) other than the registry's."""
        base = base_model_of(run_or_model)
        if base != self.registry.base_model:
            raise TextuneError(f"{run_or_model} is (or was trained on) the base model {base}, but registry "
                               f"{self.registry.root} holds adapters for {self.registry.base_model}")

    def names(self) -> list[str]:
        return self.registry.names()

    def activate(self, name: str | None) -> None:
        """Make adapter `name` the active one, loading it on first use.

        Raises:
            TextuneError: `name` is None (each adapter has its own head: there is no adapter-less model)
                or not in the registry.
        """
        if name is None:
            raise TextuneError(f"name the adapter to predict with: one of {', '.join(self.registry.names())}")
        if name == self.adapter:
            return
        entry, folder = self.registry.entry(name), self.registry.path(name)
        if self.model is None:
            base = load_classifier(resolve_model(self.registry.base_model), entry["labels"],
                                   auto_class=auto_model_class(entry.get("architectures")), like=folder)
            if adapter_info(folder)["prompt_learning"]:
                _accept_past_key_values(base)
            self.model = _pass_every_input(PeftModel.from_pretrained(base, folder, adapter_name=name))
        elif name not in self.model.peft_config:
            _load_adapter_with_own_head(self.model, folder, name)
        self.model.set_adapter(name)
        self.model.to(self.device).eval()
        self.adapter, self.label_names = name, entry["labels"]
        self.task = entry.get("task", DEFAULT_TASK)
        self.max_length = inference_max_length(self.tokenizer, self.requested_max_length, entry.get("max_length"),
                                               config=self.model.config)
        predictor_class = type(get_task(self.task)).predictor_class
        # The loaded base's config is the first adapter's: the adapter's own copy says its labels, settings
        # and run files (thresholds, a regression's scale, QA windows and null threshold).
        self.predictor = predictor_class.around(self.model, self.tokenizer, self.batch_size, self.max_length,
                                                self.device, folder=folder)

    def _active(self, adapter: str | None):
        if adapter is not None:
            self.activate(adapter)
        if self.adapter is None:
            raise TextuneError(f"name the adapter to predict with: one of {', '.join(self.registry.names())}")
        return self.predictor

    def predict_proba(self, texts: list[str], text_pairs: list[str] | None = None, adapter: str | None = None):
        return self._active(adapter).predict_proba(texts, text_pairs)

    def predict(self, texts: list, text_pairs: list[str] | None = None, adapter: str | None = None) -> list[dict]:
        return self._active(adapter).predict(texts, text_pairs)


def _load_adapter_with_own_head(model: PeftModel, folder: Path, name: str) -> None:
    """PEFT `load_adapter`, for an adapter whose head may have another number of labels than the first one's.

    PEFT gives each adapter a copy of the loaded model's head, sized for the first adapter's labels; a head
    for another label count would not fit. So add the adapter, resize the Linear layers of its head copy to
    the saved shapes, then load the weights (PEFT's `ModulesToSaveWrapper.modules_to_save` holds the copies).
    """
    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = True
    model.add_adapter(name, config)
    saved = load_file(folder / ADAPTER_WEIGHTS)
    for wrapper_name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or name not in wrapper.modules_to_save:
            continue
        head = wrapper.modules_to_save[name]
        for sub_name, sub in list(head.named_modules()):
            key = ".".join(filter(None, [wrapper_name, sub_name, "weight"]))
            if not isinstance(sub, torch.nn.Linear) or key not in saved or saved[key].shape == sub.weight.shape:
                continue
            out_features, in_features = saved[key].shape
            resized = torch.nn.Linear(in_features, out_features, bias=sub.bias is not None)
            if sub_name:
                parent, _, child = sub_name.rpartition(".")
                setattr(head.get_submodule(parent), child, resized)
            else:
                wrapper.modules_to_save[name] = resized
    model.load_adapter(folder, adapter_name=name)
