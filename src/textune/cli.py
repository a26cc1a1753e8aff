"""The `textune` command. Each sub-command parses its arguments and calls one stage of the package.

User mistakes (`TextuneError`) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _quiet_libraries() -> None:
    # Runs before transformers/datasets are imported: textune runs offline unless told otherwise, and
    # library chatter (progress bars for every map, advisory warnings) would bury textune's own output.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.config import config_help, load_config, parse_override_args
    from textune.train import train

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise _usage("textune train needs a CONFIG.yaml (see configs/)")
    cfg = load_config(args.config, parse_override_args(extra))
    train(cfg, overwrite=args.overwrite)
    return 0


def cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    import numpy as np

    from textune.data import read_table
    from textune.errors import TextuneError
    from textune.evaluate import classification_metrics, headline
    from textune.infer import Predictor

    predictor = Predictor(args.run_or_model, batch_size=args.batch_size)
    cols = _run_columns(predictor.run_dir)
    text_col = args.text_column or cols.get("text_column", "text")
    pair_col = args.text_pair_column or cols.get("text_pair_column")
    label_col = args.label_column or cols.get("label_column", "label")
    ds = read_table(args.data, "--data")
    missing = [c for c in (text_col, pair_col, label_col) if c and c not in ds.column_names]
    if missing:
        raise TextuneError(f"{args.data} has no column {missing[0]!r}; its columns are: "
                           f"{', '.join(map(repr, ds.column_names))} (set --text-column/--label-column)")
    names = predictor.label_names
    label_ids = _labels_to_ids(ds[label_col], names, args.data)
    probs = predictor.predict_proba([str(t) for t in ds[text_col]], [str(t) for t in ds[pair_col]] if pair_col else None)
    metrics = classification_metrics(label_ids, probs.argmax(-1), names)
    nll = -np.log(np.clip(probs[np.arange(len(label_ids)), label_ids], 1e-12, None)).mean()
    metrics["loss"] = float(nll)
    out = Path(args.output) if args.output else (predictor.run_dir or Path(".")) / f"eval-{Path(args.data).stem}" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"{args.data}: {headline(metrics)}")
    print(_format_confusion(metrics["confusion_matrix"]))
    print(f"metrics written to {out}")
    return 0


def _labels_to_ids(values: list, names: list[str], source: str) -> np.ndarray:
    """Map gold labels (names, or integer ids) onto the model's label ids."""
    import numpy as np

    from textune.errors import TextuneError

    by_name = {n: i for i, n in enumerate(names)}
    ids, unknown = [], set()
    for v in values:
        if str(v) in by_name:
            ids.append(by_name[str(v)])
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and 0 <= v < len(names):
            ids.append(int(v))
        else:
            unknown.add(v)
    if unknown:
        raise TextuneError(f"{source} has labels the model was not trained on: {sorted(map(str, unknown))[:5]}; "
                           f"the model knows {names}")
    return np.asarray(ids)


def _format_confusion(cm: dict) -> str:
    names, matrix = cm["labels"], cm["matrix"]
    width = max(8, *(len(n) for n in names)) + 1
    head = "true \\ pred".ljust(width) + "".join(n.rjust(width) for n in names)
    rows = [n.ljust(width) + "".join(str(v).rjust(width) for v in row) for n, row in zip(names, matrix)]
    return "\n".join([head, *rows])


def _run_columns(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    import yaml

    return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.infer import Predictor, read_inputs, write_jsonl

    predictor = Predictor(args.run_or_model, batch_size=args.batch_size)
    cols = _run_columns(predictor.run_dir)
    texts, pairs = read_inputs(args.input, args.text_column or cols.get("text_column", "text"),
                               args.text_pair_column or cols.get("text_pair_column"))
    rows = predictor.predict(texts, pairs)
    for row, text in zip(rows, texts):
        row["text"] = text
    write_jsonl(({"text": r.pop("text"), **r} for r in rows), args.output)
    if args.output and args.output != "-":
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.models import describe_model, load_tokenizer, resolve_model, resolve_run_model

    path = args.model
    if path is not None and Path(path).is_dir() and not (Path(path) / "config.json").exists():
        path = str(resolve_run_model(path)[0])
    name = resolve_model(path)
    tokenizer = load_tokenizer(name)
    info = describe_model(name, tokenizer)
    if args.text is not None:
        enc = tokenizer(args.text, args.pair)
        info["text"] = {"tokens": tokenizer.convert_ids_to_tokens(enc["input_ids"]), "input_ids": enc["input_ids"],
                        "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            info["text"]["token_type_ids"] = enc["token_type_ids"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "text":
            continue
        shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<24}{shown}")
    if "text" in info:
        for key, value in info["text"].items():
            print(f"{key:<24}{value}")
    return 0


def _usage(msg: str):
    from textune.errors import TextuneError

    return TextuneError(msg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="textune", description="Fine-tune, evaluate and use pretrained Transformers on text.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.add_argument("--online", action="store_true", help="allow downloads from the Hugging Face Hub (off by default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model from a YAML config",
                       description="Fine-tune a model. Override any config key with --section.key VALUE, "
                                   "e.g. --train.lr 3e-5 --data.max_train_samples 1000.")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.set_defaults(func=cmd_train, allow_extra=True)

    e = sub.add_parser("evaluate", help="metrics of a run or model on a labelled file")
    e.add_argument("run_or_model", help="a run folder or a model folder")
    e.add_argument("--data", required=True, help="labelled .csv/.tsv/.jsonl/.parquet file")
    e.add_argument("--text-column", help="default: the run's data.text_column, else 'text'")
    e.add_argument("--text-pair-column", help="default: the run's data.text_pair_column")
    e.add_argument("--label-column", help="default: the run's data.label_column, else 'label'")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--output", help="where to write metrics.json (default: RUN/eval-<data name>/metrics.json)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predict labels; JSONL out, one line per input")
    r.add_argument("run_or_model", help="a run folder or a model folder")
    r.add_argument("--input", required=True, help="'-' for stdin or a .txt (one text per line), or a data file")
    r.add_argument("--output", help="JSONL file to write (default: stdout)")
    r.add_argument("--text-column", help="column of texts in a data file (default: the run's, else 'text')")
    r.add_argument("--text-pair-column", help="column of second texts for pair tasks")
    r.add_argument("--batch-size", type=int, default=64)
    r.set_defaults(func=cmd_predict)

    i = sub.add_parser("inspect", help="sizes of a model; tokens of a text")
    i.add_argument("model", nargs="?", help="model folder, run folder or Hub id (default: the packaged MiniLM)")
    i.add_argument("--text", help="show how this text is tokenised")
    i.add_argument("--pair", help="second text of a pair (shows token_type_ids)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) <= 0:
        parser.error("--batch-size must be a positive integer")
    if args.online:
        os.environ["HF_HUB_OFFLINE"] = "0"
        os.environ["HF_DATASETS_OFFLINE"] = "0"
    _quiet_libraries()
    from textune.errors import TextuneError

    try:
        return args.func(args, extra)
    except TextuneError as e:
        if args.debug:
            raise
        print(f"textune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("textune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
