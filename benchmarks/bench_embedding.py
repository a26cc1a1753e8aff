"""Embedding benchmark (issue 31): textune's `task: embedding` against sentence-transformers'
`SentenceTransformerTrainer`, and the untouched base model, in one invocation; each arm in its own process, so its
peak resident memory (`os.wait4` ru_maxrss, training subprocesses included) is its own.

1. Retrieval on SQuAD (../shared/data/squad: 8,310 training questions; validation: the 1,195 questions of 4
   other articles, each question ranked against every distinct validation context):
     base      the packaged MiniLM-L6 (all-MiniLM-L6-v2) as it is
     textune   `textune train configs/squad-minilm-embedding.yaml` for `--steps` optimizer steps (in-batch negatives,
               MultipleNegativesRankingLoss); the last model (train.load_best_at_end false: same steps as the peer)
     peer      SentenceTransformerTrainer, MultipleNegativesRankingLoss, the shipped config's batch size (32),
               learning rate, warm-up, weight decay, max_seq_length and steps, with the NO_DUPLICATES batch sampler
               sentence-transformers recommends for that loss (textune masks duplicates instead)
   Reported: MRR@10 (headline), Recall@1, Recall@10, NDCG@10; training examples/s; peak memory.
   Targets: textune's MRR@10 within 0.01 of the peer's and above the base model's; examples/s >= 1.3x the peer's.

2. Similarity on Lee document pairs (../shared/data/lee: 496 training, 28 validation pairs, ratings 0-1):
     base            the base model's cosine of the two documents' vectors
     textune         `textune train configs/lee-minilm-embedding.yaml` (CoSENT, best checkpoint by Spearman)
     peer            SentenceTransformerTrainer with CoSENTLoss, same epochs, batch, lr, warm-up, and the same
                     selection (evaluated each epoch on validation, best Spearman kept)
     cross-encoder   `textune train configs/lee-minilm-regression.yaml` (both documents in one input, a
                     regression head; best checkpoint by Pearson)
   Reported: Pearson and Spearman on the 28 validation pairs, which the fine-tuned arms also select their
   checkpoint on (so their figures flatter them; the held-out Lee pairs of issue 31 are not in ../shared/data).

Metric code: one for every arm. Retrieval: sentence-transformers' `InformationRetrievalEvaluator` (cosine) on each
arm's saved model loaded with `SentenceTransformer` (textune's run folder is a sentence-transformers folder).
Similarity: scipy's Pearson and Spearman of each arm's scores (the cosine of `SentenceTransformer.encode` vectors;
the cross-encoder's predicted scores from `textune.tasks.load_predictor`).
Training speed: examples/s of the training loop alone (textune: the loop's own figure at its last logged step,
before the final evaluation; the peer: `train_samples_per_second` of `trainer.train()` with evaluation off), and
the wall time of each training arm from its start to the saved model (textune's includes its step-0 and final
evaluations). Precision: `--precision auto` lets textune choose (bf16 autocast where the CPU has native bf16) and
gives the peer bf16 on the same condition; `fp32` runs both in fp32.

    .venv/bin/python benchmarks/bench_embedding.py                     # full: 260 SQuAD steps (one epoch), shipped Lee configs
    .venv/bin/python benchmarks/bench_embedding.py --steps 4 --lee-epochs 0.1 --eval-questions 100   # smoke run

Writes benchmarks/results/embedding.json and prints the CPU, its fp32 matmul ceiling and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arms import add_arm_arguments, measure

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SQUAD, LEE = SHARED / "squad", SHARED / "lee"
SQUAD_CONFIG, LEE_EMBEDDING, LEE_REGRESSION = (ROOT / "configs" / f"{name}.yaml" for name in (
    "squad-minilm-embedding", "lee-minilm-embedding", "lee-minilm-regression"))
SEED = 42
ARMS = {"squad": ("base", "textune", "peer"), "lee": ("base", "textune", "peer", "cross-encoder")}
RETRIEVAL = ("mrr_at_10", "recall_at_1", "recall_at_10", "ndcg_at_10")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------- the one metric code of every arm


def squad_validation(eval_questions: int | None) -> list[dict]:
    """The validation rows, or the first `eval_questions` distinct questions' rows (a smoke run)."""
    rows = read_jsonl(SQUAD / "validation.jsonl")
    if eval_questions:
        keep = list(dict.fromkeys(r["question"] for r in rows))[:eval_questions]
        rows = [r for r in rows if r["question"] in set(keep)]
    return rows


def squad_retrieval(model_dir: str | Path, eval_questions: int | None, max_length: int) -> dict:
    """sentence-transformers' InformationRetrievalEvaluator (cosine): each distinct validation question against
    every distinct context of the validation articles (all of them, also when the questions are cut)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    contexts = list(dict.fromkeys(r["context"] for r in read_jsonl(SQUAD / "validation.jsonl")))
    corpus = {f"c{i}": c for i, c in enumerate(contexts)}
    ids = {c: f"c{i}" for i, c in enumerate(contexts)}
    queries, relevant = {}, {}
    for r in squad_validation(eval_questions):
        qid = queries.setdefault(r["question"], f"q{len(queries)}")
        relevant.setdefault(qid, set()).add(ids[r["context"]])
    evaluator = InformationRetrievalEvaluator({q: text for text, q in queries.items()}, corpus, relevant,
                                              mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10],
                                              precision_recall_at_k=[1, 10], map_at_k=[10], name="squad",
                                              write_csv=False)
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    scores = evaluator(model)
    return {"mrr_at_10": scores["squad_cosine_mrr@10"], "recall_at_1": scores["squad_cosine_recall@1"],
            "recall_at_10": scores["squad_cosine_recall@10"], "ndcg_at_10": scores["squad_cosine_ndcg@10"],
            "queries": len(queries), "corpus": len(corpus)}


def lee_rows() -> tuple[list[str], list[str], list[float]]:
    import csv

    with (LEE / "validation.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["document1"] for r in rows], [r["document2"] for r in rows], [float(r["similarity"]) for r in rows]


def correlations(scores, labels) -> dict:
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(scores, labels)[0]), "spearman": float(spearmanr(scores, labels)[0])}


def lee_cosine(model_dir: str | Path, max_length: int) -> dict:
    """Pearson and Spearman of the cosine of the two documents' `SentenceTransformer` vectors."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    first, second, labels = lee_rows()
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    a, b = (model.encode(texts, normalize_embeddings=True, convert_to_numpy=True) for texts in (first, second))
    return correlations(np.sum(a * b, axis=1), labels)


# ---------------------------------------------------------------- textune arms: the CLI in a subprocess


def textune_train(config: Path, run: Path, seed: int, overrides: dict) -> float:
    """`textune train CONFIG --key value ...` as a user runs it; returns its wall seconds."""
    cmd = [sys.executable, "-m", "textune", "train", str(config), "--output_dir", str(run), "--seed", str(seed),
           "--train.checkpoint_steps", "null"]
    for key, value in overrides.items():
        cmd += [f"--{key}", "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def loop_samples_per_s(run: Path) -> float:
    """The loop's examples/s at its last logged step: logged before the final evaluation, after the step-0 one."""
    records = read_jsonl(run / "history.jsonl")
    return [r for r in records if r.get("type") == "train"][-1]["samples_per_s"]


def precision_overrides(precision: str) -> dict:
    return {} if precision == "auto" else {"train.mixed_precision": "no"}


def peer_bf16(precision: str) -> bool:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.train import cpu_supports_bf16

    return precision == "auto" and cpu_supports_bf16()


def squad_textune(args, workdir: Path) -> dict:
    run = workdir / "run"
    overrides = {"train.max_steps": args.steps, "train.eval_steps": None, "train.load_best_at_end": False,
                 **precision_overrides(args.precision)}
    if args.eval_questions:  # textune's own step-0 and final evaluations on the cut questions too (smoke runs)
        path = workdir / "validation.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in squad_validation(args.eval_questions)))
        overrides["data.validation"] = str(path)
    wall = textune_train(SQUAD_CONFIG, run, args.seed, overrides)
    metrics = json.loads((run / "metrics.json").read_text())
    return {**squad_retrieval(run / "model", args.eval_questions, args.max_length),
            "samples_per_s": loop_samples_per_s(run), "train_wall_s": round(wall, 1),
            "steps": metrics["train"]["steps"]}


def lee_textune(args, workdir: Path) -> dict:
    run = workdir / "run"
    overrides = {**({"train.epochs": args.lee_epochs} if args.lee_epochs else {}), **precision_overrides(args.precision)}
    wall = textune_train(LEE_EMBEDDING, run, args.seed, overrides)
    return {**lee_cosine(run / "model", args.max_length), "train_wall_s": round(wall, 1),
            "samples_per_s": loop_samples_per_s(run)}


def lee_cross_encoder(args, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.tasks import load_predictor

    run = workdir / "run"
    overrides = {**({"train.epochs": args.lee_epochs} if args.lee_epochs else {}), **precision_overrides(args.precision)}
    wall = textune_train(LEE_REGRESSION, run, args.seed, overrides)
    first, second, labels = lee_rows()
    scores = load_predictor(run).predict_scores(first, second)
    baselines = json.loads((run / "data_stats.json").read_text()).get("baselines", {})
    return {**correlations(scores, labels), "train_wall_s": round(wall, 1), "samples_per_s": loop_samples_per_s(run),
            "startup_baselines": baselines}


# ---------------------------------------------------------------- base and peer arms


def squad_base(args, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.models import resolve_model

    return squad_retrieval(resolve_model(None), args.eval_questions, args.max_length)


def lee_base(args, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.models import resolve_model

    return lee_cosine(resolve_model(None), args.max_length)


def peer_training(args, workdir: Path, config: Path, train_dataset, loss_name: str, schedule: dict,
                  evaluator=None) -> tuple[object, dict]:
    """A SentenceTransformerTrainer run of the packaged MiniLM with the hyper-parameters of a shipped textune
    config: (the trained model, trainer.train()'s metrics)."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import (BatchSamplers,
                                                                          SentenceTransformerTrainingArguments)

    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config
    from textune.models import resolve_model

    shipped = load_config(config)
    t = shipped.train
    model = SentenceTransformer(resolve_model(None), device="cpu")
    model.max_seq_length = shipped.model.max_length
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "peer"), per_device_train_batch_size=t.batch_size, learning_rate=t.lr,
        warmup_steps=t.warmup_ratio,  # a float below 1: a share of the steps, as textune's warmup_ratio
        weight_decay=t.weight_decay, lr_scheduler_type="linear", seed=args.seed, bf16=peer_bf16(args.precision),
        batch_sampler=BatchSamplers.NO_DUPLICATES, report_to="none", disable_tqdm=True, use_cpu=True,
        logging_steps=t.logging_steps, **schedule)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                         loss=getattr(losses, loss_name)(model), evaluator=evaluator)
    return model, trainer.train().metrics


def squad_peer(args, workdir: Path) -> dict:
    from datasets import Dataset

    start = time.perf_counter()
    rows = read_jsonl(SQUAD / "train.jsonl")
    data = Dataset.from_dict({"anchor": [r["question"] for r in rows], "positive": [r["context"] for r in rows]})
    model, metrics = peer_training(args, workdir, SQUAD_CONFIG, data, "MultipleNegativesRankingLoss",
                                   {"max_steps": args.steps, "eval_strategy": "no", "save_strategy": "no"})
    model.save(str(workdir / "peer-model"))
    wall = time.perf_counter() - start
    return {**squad_retrieval(workdir / "peer-model", args.eval_questions, args.max_length),
            "samples_per_s": metrics["train_samples_per_second"], "train_wall_s": round(wall, 1), "steps": args.steps}


def lee_peer(args, workdir: Path) -> dict:
    import csv

    from datasets import Dataset
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config

    start = time.perf_counter()
    with (LEE / "train.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    data = Dataset.from_dict({"sentence1": [r["document1"] for r in rows], "sentence2": [r["document2"] for r in rows],
                              "score": [float(r["similarity"]) for r in rows]})
    first, second, labels = lee_rows()
    evaluator = EmbeddingSimilarityEvaluator(first, second, labels, name="lee", write_csv=False)
    epochs = args.lee_epochs or load_config(LEE_EMBEDDING).train.epochs
    # textune keeps the checkpoint of the best validation Spearman (train.metric): the peer selects the same way.
    model, metrics = peer_training(args, workdir, LEE_EMBEDDING, data, "CoSENTLoss", {
        "num_train_epochs": epochs, "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2,
        "load_best_model_at_end": True, "metric_for_best_model": "eval_lee_spearman_cosine",
        "greater_is_better": True}, evaluator)
    model.save(str(workdir / "peer-model"))
    wall = time.perf_counter() - start
    return {**lee_cosine(workdir / "peer-model", args.max_length), "train_wall_s": round(wall, 1),
            "samples_per_s": metrics["train_samples_per_second"]}


RUNNERS = {("squad", "base"): squad_base, ("squad", "textune"): squad_textune, ("squad", "peer"): squad_peer,
           ("lee", "base"): lee_base, ("lee", "textune"): lee_textune, ("lee", "peer"): lee_peer,
           ("lee", "cross-encoder"): lee_cross_encoder}


# ---------------------------------------------------------------- the parent: every arm, the table, the targets


def targets(results: dict) -> dict[str, bool]:
    squad = results.get("squad", {})
    out = {}
    t, p, b = (squad.get(arm, {}) for arm in ("textune", "peer", "base"))
    if "mrr_at_10" in t and "mrr_at_10" in p:
        out["squad: textune MRR@10 within 0.01 of the peer's"] = abs(t["mrr_at_10"] - p["mrr_at_10"]) <= 0.01
    if "mrr_at_10" in t and "mrr_at_10" in b:
        out["squad: textune MRR@10 above the base model's"] = t["mrr_at_10"] > b["mrr_at_10"]
    if "samples_per_s" in t and "samples_per_s" in p:
        out["squad: textune examples/s >= 1.3x the peer's"] = t["samples_per_s"] >= 1.3 * p["samples_per_s"]
    return out


def print_table(results: dict) -> None:
    header = (f"{'part':<7}{'arm':<15}{'MRR@10':>8}{'R@1':>8}{'R@10':>8}{'NDCG@10':>9}{'pearson':>9}{'spearman':>9}"
              f"{'ex/s':>8}{'train s':>9}{'peak MB':>9}")
    print("\n" + header + "\n" + "-" * len(header))

    def cell(r, key, width, digits=4):
        return f"{r[key]:>{width}.{digits}f}" if isinstance(r.get(key), (int, float)) else f"{'—':>{width}}"

    for part, arms in results.items():
        for arm, r in arms.items():
            if "error" in r:
                print(f"{part:<7}{arm:<15}{r['error']}")
                continue
            print(f"{part:<7}{arm:<15}{cell(r, 'mrr_at_10', 8)}{cell(r, 'recall_at_1', 8)}{cell(r, 'recall_at_10', 8)}"
                  f"{cell(r, 'ndcg_at_10', 9)}{cell(r, 'pearson', 9)}{cell(r, 'spearman', 9)}"
                  f"{cell(r, 'samples_per_s', 8, 1)}{cell(r, 'train_wall_s', 9, 0)}{cell(r, 'peak_rss_mb', 9, 0)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=260, help="SQuAD training steps of both trainers (260: one epoch)")
    p.add_argument("--lee-epochs", type=float, default=None, help="override the Lee configs' epochs (smoke runs)")
    p.add_argument("--eval-questions", type=int, default=None, help="rank only the first N validation questions")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at evaluation (the configs' 256)")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    p.add_argument("--parts", default="squad,lee")
    p.add_argument("--output", default="benchmarks/results/embedding.json")
    p.add_argument("--part", help=argparse.SUPPRESS)
    add_arm_arguments(p, seed=SEED)
    args = p.parse_args()
    if args.arm:
        result = RUNNERS[(args.part, args.arm)](args, Path(args.workdir))
        Path(args.arm_output).write_text(json.dumps(result))
        return

    from bench_predict import matmul_ceiling

    ceiling = matmul_ceiling("float32")
    print(f"cpu {cpu_name()}, {os.cpu_count()} cores; fp32 matmul ceiling {ceiling:.0f} GFLOP/s; precision "
          f"{args.precision}", flush=True)
    results: dict[str, dict] = {}
    passed = ["--steps", str(args.steps), "--max-length", str(args.max_length), "--precision", args.precision,
              "--seed", str(args.seed), *(["--lee-epochs", str(args.lee_epochs)] if args.lee_epochs else []),
              *(["--eval-questions", str(args.eval_questions)] if args.eval_questions else [])]
    with tempfile.TemporaryDirectory() as tmp:
        for part in [x for x in args.parts.split(",") if x]:
            results[part] = {}
            for arm in ARMS[part]:
                workdir = Path(tmp) / f"{part}-{arm}"
                workdir.mkdir()
                results[part][arm] = measure(__file__, ["--part", part, "--arm", arm, "--workdir", str(workdir),
                                                        *passed], workdir / "result.json")
    print_table(results)
    met = targets(results)
    for name, ok in met.items():
        print(f"target  {name}: {'met' if ok else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "cpu_count": os.cpu_count(), "matmul_gflops_fp32": round(ceiling, 1),
                               "args": {k: v for k, v in vars(args).items() if k not in ("arm", "part", "workdir",
                                                                                         "arm_output", "model")},
                               "results": results, "targets": met}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
