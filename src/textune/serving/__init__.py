"""`textune serve`: a trained model over HTTP, in FastAPI's "bigger applications" layout.

- `app.py`: `create_app`: the operational routes (/health, /v1/models, /metrics, /docs), the served task's router
  (`Task.router`, defined in each task module's serving section) and a 404 on every other task's paths.
- `context.py`: `ServeContext`, what a task's router is built with (predictor, limits, batching, adapters).
- `batching.py`: `ServeSettings` (the limits), `MicroBatcher` (concurrent requests merged into model calls in one
  worker thread, 503 beyond the queue bound), Prometheus `Metrics`.
- `errors.py`: the JSON error shapes (OpenAI's on the chat path), exception handlers, the bearer-token check.
- `chat.py`: POST /v1/chat/completions, OpenAI's Chat Completions API, streaming included.
- `server.py`: `serve`: load the predictor by asking the task, run uvicorn.

With `--adapters REGISTRY` (see `textune adapters`) a request may name an adapter: the registry's adapters share
one loaded base model and are switched between model calls.
"""

from textune.serving.app import create_app
from textune.serving.batching import ServeSettings
from textune.serving.server import serve

__all__ = ["ServeSettings", "create_app", "serve"]
