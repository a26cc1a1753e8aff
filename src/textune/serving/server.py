"""`textune serve`: load the model through its task's predictor and run the app under uvicorn."""

from __future__ import annotations

import json
from pathlib import Path

from textune.errors import TextuneError
from textune.serving.app import create_app
from textune.serving.batching import ServeSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_served(run_or_model: str | None, settings: ServeSettings, adapters: str | None = None):
    """(predictor, adapter predictor or None, model name) of what `textune serve` serves: the task's predictor
    of a run or model folder, or for None the default causal LM (SmolLM2-135M-Instruct), as `generate` and
    `chat` use.

    Raises:
        TextuneError: no model at `run_or_model`, an adapter registry for a task that takes none, or a registry
            that cannot be loaded.
    """
    from textune.tasks import get_task, task_of
    from textune.tasks.language_modeling import load_causal_predictor

    if run_or_model is None:
        predictor = load_causal_predictor(None)
    else:
        predictor = get_task(task_of(run_or_model)).load_predictor(run_or_model, batch_size=settings.max_batch_size)
    task, name = get_task(predictor.task), served_name(run_or_model, predictor)
    adapter_predictor = None
    if adapters is not None:
        if not task.serve_adapters:
            raise TextuneError(f"--adapters holds classifier adapters, but {run_or_model or name} is "
                               f"{task.serve_description(predictor)}; leave out --adapters")
        from textune.adapters import AdapterPredictor

        adapter_predictor = AdapterPredictor(adapters, batch_size=settings.max_batch_size)
        for adapter in adapter_predictor.names():  # load each now: a broken registry fails before serving
            adapter_predictor.activate(adapter)
    return predictor, adapter_predictor, name


def served_name(run_or_model: str | Path | None, predictor) -> str:
    """How responses and /v1/models name the model: the run folder's name, the GGUF model's for a folder
    converted from one (the default's is a cache folder named by a hash), else the folder's name."""
    from textune.gguf import PROVENANCE, is_converted

    if getattr(predictor, "run_dir", None) is not None:
        return Path(predictor.run_dir).name
    folder = Path(getattr(predictor, "model_dir", None) or run_or_model)
    if is_converted(folder):
        return Path(json.loads((folder / PROVENANCE).read_text())["source"]).stem
    return folder.name


def serve(run_or_model: str | None, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          adapters: str | None = None, threads: int | None = None) -> None:
    """Load the model and serve it until interrupted.

    Args:
        threads: torch intra-op threads. On a busy CPU, torch's default (one per core) competing with other
            processes can make each model call many times slower than one thread would.

    Raises:
        TextuneError: see `load_served`, and bad settings.
    """
    import torch
    import uvicorn

    if threads is not None:
        if threads <= 0:
            raise TextuneError(f"--threads must be greater than 0, got {threads}")
        torch.set_num_threads(threads)
    predictor, adapter_predictor, name = load_served(run_or_model, settings, adapters)
    if getattr(predictor, "causal", False) and not predictor.tokenizer.chat_template:
        print(f"note       {name} has no chat template: /v1/chat/completions will refuse every request "
              f"(/v1/generate works)", flush=True)
    app = create_app(predictor, settings, name, adapter_predictor)
    where = "" if host in LOOPBACK else "  (reachable from other machines" + (
        ")" if settings.token else "; no --token-env, so anyone can call it)")
    print(f"serving    {name} on http://{host}:{port}  docs http://{host}:{port}/docs{where}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
