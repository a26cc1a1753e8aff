"""Question-answering benchmark: textune's question-answering task against a Hugging Face `Trainer` script
written like transformers' `run_qa.py` + `utils_qa.py`, same model, data and hyper-parameters, in one invocation.

Model: the packaged MiniLM-L6 (a fresh `qa_outputs` head). Data: ../shared/data/squad, a seeded slice of the
8,310 training questions (`--train-questions`, default 2,000; the same questions in both arms, drawn by
textune's reader with data.max_train_samples) and the 1,195 validation questions (`--eval-questions`).
Hyper-parameters for both arms: max_length 384, doc_stride 128, batch 16, AdamW lr 1e-4, weight decay 0.01,
linear schedule with 10% warm-up, `--epochs` (default 2), the last model evaluated (no best-model selection).
Post-processing is the same in both arms (n best 20 start/end logits per window, answers of at most 30
tokens, best start + end logit over the windows of a question: utils_qa's algorithm, here textune's
`answer_question`), so EM/F1 differ only by training.

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  trainer   AutoModelForQuestionAnswering + run_qa.py's prepare_train_features (padding to max_length, its
            default) + default_data_collator + Trainer with its defaults (fp32, random batches)
  textune   `textune train` with configs/squad-minilm-qa.yaml and the settings above (textune's defaults:
            dynamic padding, length-grouped batches, bf16 autocast where the CPU has native bf16, fused AdamW)

Training speed: samples (windows)/s of the training loop (Trainer: `train_runtime` with evaluation and saving
off; textune: the loop's own rate at its last logging step, before the final evaluation).

Prediction (one more process per arm, on the textune run's model): the validation questions. transformers 5
removed `pipeline("question-answering")` (its REMOVED_TASKS), so the baseline is that pipeline's algorithm as
it ran in transformers 4 with its defaults: one window per model call (batch_size 1), span scores from
`select_starts_ends` (kept in transformers for document QA; max_answer_len set to 30 like ours), the best
over the windows. Against textune's `QuestionAnswererPredictor` (windows of all questions batched by length,
batch 32): questions/s, and the share of questions with the same answer text. A third arm runs the same
predictor on `textune export` of that run (ONNX Runtime, the graph fused by its transformer optimizer, float32;
exported in a process of its own before it): questions/s, answers against PyTorch's and the pipeline's, and the
export's own check (max abs start/end logit difference from PyTorch on its check windows).

Targets (issue 16): EM and F1 within 1 point of the Trainer's; training samples/s >= 1.5x the Trainer's
defaults; prediction >= 2x the pipeline with the same answer on >= 99% of questions; issue 34: the fused ONNX
export >= 1.5x the pipeline with the same answers.

    python benchmarks/bench_qa.py
    python benchmarks/bench_qa.py --train-questions 48 --eval-questions 40 --epochs 1     # a quick smoke run

Writes benchmarks/results/qa.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from arms import add_arm_arguments, cpu_name, export_run, measure

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad"
BATCH_SIZE, LR, WARMUP, MAX_LENGTH, STRIDE, WEIGHT_DECAY, SEED = 16, 1e-4, 0.1, 384, 128, 0.01, 42
MAX_ANSWER_LENGTH = 30


def config(workdir: Path, train_questions: int, eval_questions: int | None, epochs: float):
    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config

    return load_config(ROOT / "configs" / "squad-minilm-qa.yaml", {
        "output_dir": str(workdir / "textune"), "seed": SEED, "train.epochs": epochs, "train.batch_size": BATCH_SIZE,
        "train.lr": LR, "train.warmup_ratio": WARMUP, "train.weight_decay": WEIGHT_DECAY,
        "model.max_length": MAX_LENGTH, "data.doc_stride": STRIDE, "data.max_answer_length": MAX_ANSWER_LENGTH,
        "data.train": str(SQUAD / "train.jsonl"), "data.validation": str(SQUAD / "validation.jsonl"),
        "data.max_train_samples": train_questions, "data.max_eval_samples": eval_questions,
        "train.load_best_at_end": False, "train.eval_steps": 10**9, "train.checkpoint_steps": None})


def run_textune(workdir: Path, train_questions: int, eval_questions: int | None, epochs: float) -> dict:
    from textune.train import train

    run = train(config(workdir, train_questions, eval_questions, epochs), overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [r for r in history if r["type"] == "train"][-1]
    v = metrics["validation"]
    return {"samples_per_s": last["samples_per_s"], "f1": v["f1"], "exact_match": v["exact_match"], "model": str(run)}


def run_trainer(workdir: Path, train_questions: int, eval_questions: int | None, epochs: float) -> dict:
    """run_qa.py, reduced to what this comparison needs (its prepare_train_features and
    prepare_validation_features, padding to max_length as its default pad_to_max_length)."""
    from datasets import Dataset
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator, set_seed)

    from textune.models import resolve_model
    from textune.tasks.question_answering import TASK, answer_question, squad_metrics

    splits = TASK.read_splits(config(workdir, train_questions, eval_questions, epochs))
    model_path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def prepare_train_features(examples):
        enc = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=MAX_LENGTH,
                        stride=STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        sample_mapping = enc.pop("overflow_to_sample_mapping")
        enc["start_positions"], enc["end_positions"] = [], []
        for i, offsets in enumerate(enc.pop("offset_mapping")):
            input_ids = enc["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id)
            sequence_ids = enc.sequence_ids(i)
            answers = examples["answers"][sample_mapping[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = 0
            while sequence_ids[token_start] != 1:
                token_start += 1
            token_end = len(input_ids) - 1
            while sequence_ids[token_end] != 1:
                token_end -= 1
            if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                enc["start_positions"].append(cls_index)
                enc["end_positions"].append(cls_index)
                continue
            while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                token_start += 1
            enc["start_positions"].append(token_start - 1)
            while offsets[token_end][1] >= end_char:
                token_end -= 1
            enc["end_positions"].append(token_end + 1)
        return enc

    def prepare_validation_features(examples):
        enc = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=MAX_LENGTH,
                        stride=STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        sample_mapping = enc.pop("overflow_to_sample_mapping")
        enc["example_index"], offsets = [], []
        for i in range(len(enc["input_ids"])):
            sequence_ids = enc.sequence_ids(i)
            enc["example_index"].append(examples["index"][sample_mapping[i]])
            offsets.append([o if sequence_ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])])
        enc["offset_mapping"] = offsets
        return enc

    def table(qs, with_index: bool = False):
        columns = {"question": qs.questions, "context": qs.contexts,
                   "answers": [{"text": [t for t, _ in a], "answer_start": [s for _, s in a]} for a in qs.answers]}
        if with_index:
            columns["index"] = list(range(len(qs.questions)))
        return Dataset.from_dict(columns)

    train = table(splits["train"]).map(prepare_train_features, batched=True, remove_columns=["question", "context",
                                                                                             "answers"])
    validation = table(splits["validation"], True).map(prepare_validation_features, batched=True,
                                                       remove_columns=["question", "context", "answers", "index"])
    set_seed(SEED)
    model = AutoModelForQuestionAnswering.from_pretrained(model_path)
    # transformers 5 dropped warmup_ratio: a warmup_steps float below 1 is the ratio
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=64,
        num_train_epochs=epochs, learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, seed=SEED,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                      processing_class=tokenizer)
    out = trainer.train()
    start_logits, end_logits = trainer.predict(validation.remove_columns(["example_index", "offset_mapping"])).predictions
    per_question: list[list] = [[] for _ in splits["validation"].questions]
    for w, i in enumerate(validation["example_index"]):
        offsets = [tuple(o) if o is not None else None for o in validation[w]["offset_mapping"]]
        cls = validation[w]["input_ids"].index(tokenizer.cls_token_id)
        per_question[i].append((start_logits[w], end_logits[w], offsets, cls))
    qs = splits["validation"]
    answers = [answer_question(wins, qs.contexts[i], MAX_ANSWER_LENGTH)[0][0]["answer"]
               for i, wins in enumerate(per_question)]
    metrics = squad_metrics(answers, [[t for t, _ in a] for a in qs.answers])
    return {"samples_per_s": len(train) * epochs / out.metrics["train_runtime"], "f1": metrics["f1"],
            "exact_match": metrics["exact_match"]}


def pipeline_v4(model_dir: str, questions: list[str], contexts: list[str]) -> list[str]:
    """transformers 4's QuestionAnsweringPipeline with its defaults (max_seq_len 384, doc_stride 128, batch 1),
    max_answer_len 30: each window its own model call, the best span over the windows by its score."""
    import numpy as np
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.pipelines.document_question_answering import select_starts_ends

    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = []
    for question, context in zip(questions, contexts):
        enc = tokenizer(question.lstrip(), context, truncation="only_second", max_length=MAX_LENGTH, stride=STRIDE,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        best = (-1.0, "")
        for w in range(len(enc["input_ids"])):
            sequence_ids = enc.sequence_ids(w)
            p_mask = np.array([[s != 1 for s in sequence_ids]], dtype=int)
            p_mask[0, 0] = 0  # the pipeline leaves [CLS] in the softmax
            with torch.inference_mode():
                out = model(**{k: torch.tensor([enc[k][w]]) for k in ("input_ids", "attention_mask", "token_type_ids")
                               if k in enc})
            starts, ends, scores, _ = select_starts_ends(out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
                                                         np.array([enc["attention_mask"][w]]),
                                                         max_answer_len=MAX_ANSWER_LENGTH)
            if len(scores) and scores[0] > best[0]:
                offsets = enc["offset_mapping"][w]
                best = (float(scores[0]), context[offsets[starts[0]][0]:offsets[ends[0]][1]])
        answers.append(best[1])
    return answers


def run_predict(arm: str, model_dir: str, eval_questions: int | None) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    rows = [json.loads(line) for line in (SQUAD / "validation.jsonl").read_text().splitlines()][:eval_questions]
    questions, contexts = [r["question"] for r in rows], [r["context"] for r in rows]
    start = time.perf_counter()
    if arm == "pipeline":
        pipeline_v4(model_dir, questions[:4], contexts[:4])  # warm-up (and the load)
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        answers = pipeline_v4(model_dir, questions, contexts)
        return {"seconds": time.perf_counter() - start, "load_seconds": load_seconds, "answers": answers}
    from textune.tasks.question_answering import QuestionAnswererPredictor

    # "onnx": model_dir is the export folder, which the predictor takes like a run
    predictor = QuestionAnswererPredictor(model_dir, batch_size=32, max_length=MAX_LENGTH)
    predictor.doc_stride, predictor.max_answer_length = STRIDE, MAX_ANSWER_LENGTH
    load_seconds = time.perf_counter() - start
    predictor.predict(questions[:32], contexts[:32])  # warm-up
    start = time.perf_counter()
    answers = [r["answer"] for r in predictor.predict(questions, contexts)]
    return {"seconds": time.perf_counter() - start, "load_seconds": load_seconds, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-questions", type=int, default=2000, help="seeded slice of the 8,310 training questions")
    p.add_argument("--eval-questions", type=int, default=None, help="validation questions (default: all 1,195)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--output", default="benchmarks/results/qa.json")
    add_arm_arguments(p)  # internal: run one arm, write --arm-output
    args = p.parse_args()
    if args.arm in ("trainer", "textune"):
        run = run_textune if args.arm == "textune" else run_trainer
        result = run(Path(args.workdir), args.train_questions, args.eval_questions, args.epochs)
        Path(args.arm_output).write_text(json.dumps(result))
        return
    if args.arm in ("pipeline", "predictor", "onnx"):
        Path(args.arm_output).write_text(json.dumps(run_predict(args.arm, args.model, args.eval_questions)))
        return
    if args.arm == "export":
        Path(args.arm_output).write_text(json.dumps(export_run(args.model, args.workdir)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for arm in ("trainer", "textune"):
            workdir = tmp / arm
            workdir.mkdir()
            runs[arm] = measure(__file__, ["--arm", arm, "--train-questions", str(args.train_questions), "--epochs",
                                 str(args.epochs), "--workdir", str(workdir)]
                                + (["--eval-questions", str(args.eval_questions)] if args.eval_questions else []),
                                tmp / f"{arm}.json")
        predict = {}
        if "error" not in runs["textune"]:
            model = str(Path(runs["textune"]["model"]) / "model")
            exported = measure(__file__, ["--arm", "export", "--model", runs["textune"]["model"], "--workdir",
                                          str(tmp / "onnx")], tmp / "export.json")
            for arm in ("pipeline", "predictor", "onnx"):
                if arm == "onnx" and "error" in exported:
                    continue
                predict[arm] = measure(__file__, ["--arm", arm, "--model", str(tmp / "onnx") if arm == "onnx" else model]
                                       + (["--eval-questions", str(args.eval_questions)] if args.eval_questions else []),
                                       tmp / f"{arm}.json")
    prediction = {}
    if predict and all("error" not in predict.get(arm, {"error": 1}) for arm in ("predictor", "pipeline")):
        ours, theirs = predict["predictor"], predict["pipeline"]
        n = len(ours["answers"])
        same = sum(a == b for a, b in zip(ours["answers"], theirs["answers"]))
        prediction = {"questions": n, "pipeline_per_s": round(n / theirs["seconds"], 1),
                      "textune_per_s": round(n / ours["seconds"], 1),
                      "speedup": round(theirs["seconds"] / ours["seconds"], 2), "same_answer": round(same / n, 4),
                      "load_seconds": {"pipeline": round(theirs["load_seconds"], 2),
                                       "textune": round(ours["load_seconds"], 2)},
                      "peak_rss_mb": {"pipeline": theirs["peak_rss_mb"], "textune": ours["peak_rss_mb"]}}
        if "error" not in predict.get("onnx", {"error": 1}):
            onnx = predict["onnx"]
            prediction["onnx"] = {
                "per_s": round(n / onnx["seconds"], 1), "x_pipeline": round(theirs["seconds"] / onnx["seconds"], 2),
                "x_pytorch": round(ours["seconds"] / onnx["seconds"], 2),
                "same_answer_as_pytorch": round(sum(a == b for a, b in zip(onnx["answers"], ours["answers"])) / n, 4),
                "same_answer_as_pipeline": round(sum(a == b for a, b in zip(onnx["answers"], theirs["answers"])) / n, 4),
                "export": {k: v for k, v in exported.items() if k != "started_at"}, "peak_rss_mb": onnx["peak_rss_mb"]}
    t, tr = runs.get("textune", {}), runs.get("trainer", {})
    both = "error" not in t and "error" not in tr
    targets = {
        "EM and F1 within 1 point of the Trainer's": both and abs(t["f1"] - tr["f1"]) <= 0.01
            and abs(t["exact_match"] - tr["exact_match"]) <= 0.01,
        "training samples/s >= 1.5x the Trainer's defaults": both and t["samples_per_s"] >= 1.5 * tr["samples_per_s"],
        "prediction >= 2x pipeline": prediction.get("speedup", 0) >= 2,
        "same answer as the pipeline on >= 99% of questions": prediction.get("same_answer", 0) >= 0.99,
        "fused ONNX >= 1.5x pipeline with the same answers": prediction.get("onnx", {}).get("x_pipeline", 0) >= 1.5
            and prediction.get("onnx", {}).get("same_answer_as_pipeline", 0) == 1.0,
    }
    ceiling = prediction.get("onnx", {}).get("export", {}).get("matmul_gflops_fp32")
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, fp32 matmul ceiling {ceiling or '-'} GFLOP/s (measured in this run)")
    print(f"SQuAD: {args.train_questions:,} training questions, {args.eval_questions or 'all'} validation questions, "
          f"{args.epochs:g} epochs, batch {BATCH_SIZE}, lr {LR:g}, max_length {MAX_LENGTH}, stride {STRIDE}")
    header = f"{'arm':<10}{'EM':>9}{'F1':>9}{'samples/s':>11}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for arm, r in runs.items():
        if "error" in r:
            print(f"{arm:<10} failed ({r['error']})")
            continue
        print(f"{arm:<10}{r['exact_match']:>9.4f}{r['f1']:>9.4f}{r['samples_per_s']:>11.2f}{r['peak_rss_mb']:>9.0f}")
    if prediction:
        print(f"\nprediction on {prediction['questions']:,} validation questions: pipeline (v4 algorithm) "
              f"{prediction['pipeline_per_s']}/s, textune {prediction['textune_per_s']}/s ({prediction['speedup']}x); "
              f"same answer on {prediction['same_answer']:.2%}; peak MB {prediction['peak_rss_mb']}")
    if prediction.get("onnx"):
        o = prediction["onnx"]
        print(f"fused ONNX export ({o['export'].get('fused', {})}): {o['per_s']}/s, {o['x_pipeline']}x pipeline, "
              f"{o['x_pytorch']}x textune PyTorch fp32; same answer as PyTorch on {o['same_answer_as_pytorch']:.2%}, as "
              f"the pipeline on {o['same_answer_as_pipeline']:.2%}; export check max abs logit difference "
              f"{o['export'].get('max_abs_diff', float('nan')):.1e}; peak MB {o['peak_rss_mb']}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "cpu_count": os.cpu_count(), "matmul_gflops_fp32": ceiling,
                               "train_questions": args.train_questions,
                               "eval_questions": args.eval_questions, "epochs": args.epochs,
                               "hyperparameters": {"batch_size": BATCH_SIZE, "lr": LR, "warmup_ratio": WARMUP,
                                                   "weight_decay": WEIGHT_DECAY, "max_length": MAX_LENGTH,
                                                   "doc_stride": STRIDE, "max_answer_length": MAX_ANSWER_LENGTH},
                               "training": runs, "prediction": prediction, "targets": targets}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
