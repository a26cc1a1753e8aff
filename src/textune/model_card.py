"""The model card: README.md in a saved model folder, in the Hugging Face Hub's format, written from the run folder.

YAML metadata first (base model, library, pipeline tag, tags, data, and a `model-index` with the final
metrics, rendered by `huggingface_hub.ModelCardData`), then what a reader of the model needs: results, data,
hyper-parameters, the learning curve, textune's diagnosis, intended use and limits. It reads only the run's
files (config.yaml, metrics.json, history.jsonl, data_stats.json), so it needs no torch and can be written
again for any finished run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from textune.diagnose import diagnose_curves, load_history, run_baselines, run_label_counts, selection_from_config
from textune.errors import TextuneError
from textune.models import saved_run_config
from textune.tasks import TASKS, architecture_of

# The Hub model the packaged default (model.name empty: textune.models.DEFAULT_MODEL_PACKAGE) holds.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: the folder holds an adapter, not a whole model
SPLITS = ("validation", "test")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def base_model_id(name: str | None) -> str | None:
    """model.name as a Hub id for `base_model`, or None when it is a local folder (the Hub would reject it)."""
    if name is None:
        return DEFAULT_BASE_MODEL
    if Path(name).expanduser().exists() or not HUB_ID.match(name):
        return None
    return name


def scalar_metrics(results: dict) -> dict[str, float]:
    """The numbers of one split's metrics (not confusion matrices or per-class tables)."""
    return {k: v for k, v in (results or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_sources(config: dict) -> list[str]:
    """What the run trained and was evaluated on: the Hub/named data set, or the data (or corpus) files' names."""
    data, pretrain = config.get("data") or {}, config.get("pretrain") or {}
    if data.get("name"):
        return [data["name"]]
    files = [data.get(k) for k in ("train", "validation", "test")] + [pretrain.get(k) for k in ("corpus", "validation")]
    return [Path(f).name for f in files if f]


def pipeline_tag(task: str, model_dir: Path) -> str:
    """The pipeline tag of the saved model's architecture where its task builds it (a language-modeling run
    saves a masked or a causal LM: fill-mask or text-generation), else the task's."""
    arch = architecture_of(_read_json(model_dir / "config.json").get("architectures"))
    return arch.pipeline_tag if arch in TASKS[task].architectures else TASKS[task].pipeline_tag


def card_data(config: dict, metrics: dict, model_dir: Path, name: str) -> ModelCardData:
    """The YAML metadata block: base model, library, pipeline tag, tags, data and a model-index of the results."""
    task, tag = config["task"], pipeline_tag(config["task"], model_dir)
    sources = data_sources(config)
    method = (config.get("tuning") or {}).get("method", "full")
    adapter = (model_dir / ADAPTER_CONFIG).is_file()
    # The model-index holds the task's metrics (what train.metric may select), not counts like `examples`.
    results = [EvalResult(task_type=tag, dataset_type=sources[0] if sources else "unknown",
                          dataset_name=", ".join(sources) or "unknown", dataset_split=split, metric_type=key,
                          metric_name=key, metric_value=value)
               for split in SPLITS for key, value in scalar_metrics(metrics.get(split)).items()
               if key in TASKS[task].metrics]
    return ModelCardData(
        base_model=base_model_id((config.get("model") or {}).get("name")),
        library_name="peft" if adapter else "transformers", pipeline_tag=tag,
        tags=["textune", task] + ([method] if method != "full" else []), datasets=sources or None,
        metrics=sorted({r.metric_type for r in results}) or None, model_name=name, eval_results=results or None)


def _results_section(metrics: dict) -> list[str]:
    splits = [s for s in SPLITS if scalar_metrics(metrics.get(s))]
    if not splits:
        return ["## Results", "", "No metrics.json in the run folder: the run did not finish.", ""]
    keys = list(dict.fromkeys(k for s in splits for k in scalar_metrics(metrics[s])))
    lines = ["## Results", "", f"| metric | {' | '.join(splits)} |", "|---" * (len(splits) + 1) + "|"]
    for key in keys:
        values = [metrics[s].get(key) for s in splits]
        lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
    selected = metrics.get("metric")
    if selected and metrics.get("best_step") is not None:
        lines += ["", f"The saved model is the one of step {metrics['best_step']}, the best validation {selected}."]
    return lines + [""]


def _data_section(config: dict, stats: dict) -> list[str]:
    data = config.get("data") or {}
    lines = ["## Training data", ""]
    sizes = stats.get("sizes") or {}
    if data.get("name"):
        lines.append(f"- data set `{data['name']}`" + (f" ({data['config']})" if data.get("config") else ""))
    corpus = (config.get("pretrain") or {}).get("corpus")
    if corpus:
        lines.append(f"- corpus `{Path(corpus).name}` (language modelling)")
    for split in ("train", "validation", "test"):
        if not (data.get(split) or isinstance(sizes.get(split), int)):
            continue
        if data.get(split):
            source = f"`{Path(data[split]).name}`"
        elif data.get("name"):
            source = f"split of `{data['name']}`"
        else:
            source = "held out of the training data" if split == "validation" else "the training data"
        rows = f": {sizes[split]:,} rows" if isinstance(sizes.get(split), int) else ""
        lines.append(f"- {split}: {source}{rows}")
    if stats.get("label_names"):
        lines.append(f"- labels: {', '.join(map(str, stats['label_names']))}")
    for split, counts in (stats.get("label_counts") or {}).items():
        if isinstance(counts, dict):
            lines.append(f"- {split} label counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return lines + [""]


def shareable(value):
    """The config with absolute paths cut to their last part: a published card should not show the author's
    folders (data files keep their names, which the data section lists)."""
    if isinstance(value, dict):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(v) for v in value]
    if isinstance(value, str) and Path(value).expanduser().is_absolute():
        return Path(value).name
    return value


def _hyperparameters_section(config: dict) -> list[str]:
    t, tu, m = config.get("train") or {}, config.get("tuning") or {}, config.get("model") or {}
    length = f"{t['max_steps']} steps" if t.get("max_steps") else f"{t.get('epochs')} epochs"
    rows = [("tuning", tu.get("method")), ("training length", length), ("batch size", t.get("batch_size")),
            ("gradient accumulation", t.get("gradient_accumulation_steps")), ("learning rate", t.get("lr")),
            ("scheduler", t.get("scheduler")), ("weight decay", t.get("weight_decay")),
            ("max length (tokens)", m.get("max_length")), ("seed", config.get("seed"))]
    if tu.get("method") == "lora":
        rows.insert(1, ("LoRA r / alpha / dropout", f"{tu.get('r')} / {tu.get('alpha')} / {tu.get('dropout')}"))
    lines = ["## Hyper-parameters", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "<details><summary>The whole config (folders cut from its paths)</summary>", "", "```yaml",
             yaml.safe_dump(shareable(config), sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return lines


def _curve_section(records: list[dict], config: dict) -> list[str]:
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    lines = ["## Training curve", ""]
    if train:
        lines.append(f"- {train[-1]['step']:,} optimizer steps; training loss {train[0]['loss']:.4f} at step "
                     f"{train[0]['step']} and {train[-1]['loss']:.4f} at the end")
    metric = (config.get("train") or {}).get("metric")
    greater = (config.get("train") or {}).get("greater_is_better", True)
    scored = [r for r in evals if f"eval_{metric}" in r]
    if scored:
        best = (max if greater else min)(scored, key=lambda r: r[f"eval_{metric}"])
        lines.append(f"- {len(evals)} evaluations; best validation {metric} {best[f'eval_{metric}']:.4f} at step "
                     f"{best['step']}")
    if not train and not evals:
        lines.append("No history.jsonl in the run folder.")
    return lines + [""]


def _diagnosis_section(records: list[dict], run: Path, config: dict) -> list[str]:
    d = diagnose_curves(records, run_label_counts(run), **selection_from_config(config), baselines=run_baselines(run))
    lines = ["## Diagnosis", "", f"textune's reading of the learning curves: **{d.verdict}**.", ""]
    lines += [f"- **Warning:** {w}" for w in d.warnings]
    lines += [f"- {e}" for e in d.evidence]
    if d.remedies:
        lines += ["", "What to try:", ""] + [f"- {r}" for r in d.remedies]
    return lines + [""]


def _use_section(tag: str, adapter: bool, base: str | None) -> list[str]:
    lines = ["## Intended use", ""]
    if adapter:
        lines += [f"A PEFT adapter on `{base or 'its base model'}`: load it with `peft.AutoPeftModel"
                  f"...from_pretrained(folder)` (the base model is read from adapter_config.json), fold it into "
                  f"the base with `textune merge RUN`, or use it through `textune predict` / `textune serve`.", ""]
    else:
        lines += ["```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("{tag}", model="path/or/hub-id/of/this/model")', "```", "",
                  "or from the run folder: `textune predict RUN`, `textune serve RUN`.", ""]
    return lines + ["It is meant for text like its training data (see above); measure it on your own data before "
                    "relying on it.", ""]


def _limits_section(stats: dict) -> list[str]:
    lines = ["## Limits", "",
             "- The metrics come from the validation (and test) data above, drawn like the training data; other "
             "domains, languages or label distributions will score differently.",
             "- The model inherits the biases and gaps of its base model and of the training data."]
    truncated = ((stats.get("token_lengths") or {}).get("train") or {}).get("truncated_share")
    if truncated:
        lines.append(f"- {truncated:.1%} of the training texts were cut at {stats.get('max_length')} tokens; "
                     f"longer texts are read only up to that length.")
    lines += [f"- {c['message']}" for c in stats.get("checks") or [] if c.get("message")]
    return lines + [""]


def write_model_card(run: str | Path, model_dir: str | Path | None = None) -> Path:
    """Write MODEL/README.md (default model: RUN/model) from the run folder's files; return its path.

    Raises:
        TextuneError: `run` has no config.yaml (not a textune run folder) or the model folder is missing.
    """
    run = Path(run)
    model_dir = Path(model_dir) if model_dir is not None else run / "model"
    if not (run / "config.yaml").is_file():
        raise TextuneError(f"{run} is not a textune run folder (no config.yaml)")
    if not model_dir.is_dir():
        raise TextuneError(f"{model_dir} does not exist: no saved model to describe")
    config = saved_run_config(run)
    metrics, stats = _read_json(run / "metrics.json"), _read_json(run / "data_stats.json")
    records = load_history(run) if (run / "history.jsonl").is_file() else []
    data = card_data(config, metrics, model_dir, run.name)
    adapter = (model_dir / ADAPTER_CONFIG).is_file()
    method = (config.get("tuning") or {}).get("method", "full")
    base = data.base_model or shareable((config.get("model") or {}).get("name"))
    intro = (f"{'A ' + method + ' adapter' if adapter else 'A model'} fine-tuned with textune for {config['task']}"
             + (f" from `{base}`" if base else "") + ".")
    body = [f"# {run.name}", "", intro, "",
            *_results_section(metrics), *_data_section(config, stats), *_hyperparameters_section(config),
            *_curve_section(records, config), *_diagnosis_section(records, run, config),
            *_use_section(data.pipeline_tag, adapter, base), *_limits_section(stats)]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = model_dir / "README.md"
    card.save(path)
    return path
