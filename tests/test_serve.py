"""`textune serve` over real HTTP: a server subprocess on a free loopback port, serving the tiny trained run."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import build_tiny_chat_lm, toy_overrides
from openapi_check import assert_matches_schema
from textune.cli import main

TOKEN = "test-token-123"
LIMITS = {"--max-batch-size": 32, "--max-wait-ms": 150, "--max-texts": 8, "--max-chars": 200,
          "--max-body-bytes": 4096, "--max-queue": 16}
TEXTS = ["the movie was great", "awful plot", "i love this film", "boring and bad", "really nice acting",
         "it was poor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tiny_model, toy_data, tmp_path_factory):
    """An adapter registry holding one LoRA adapter of the tiny model, trained for a few steps."""
    from textune.adapters import AdapterRegistry
    from textune.config import load_config
    from textune.train import train

    root = tmp_path_factory.mktemp("adapters")
    run = train(load_config(None, toy_overrides(tiny_model, toy_data, root / "toy-lora", **{
        "tuning.method": "lora", "train.max_steps": 6, "train.eval_steps": 3, "train.lr": 1e-2,
        "train.checkpoint_steps": None})))
    AdapterRegistry(root / "registry").add(run, name="toy-lora")
    return root / "registry"


def wait_for_health(proc: subprocess.Popen, url: str, log, timeout: float = 180) -> None:
    """Return once the server at `url` answers /health; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited: {log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(trained_run, registry, tmp_path_factory):
    """Base URL of a running server with the adapter registry; it is stopped after the module's tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [sys.executable, "-m", "textune", "serve", str(trained_run), "--adapters", str(registry),
            "--port", str(port), "--token-env", "TEXTUNE_TEST_TOKEN", *(str(x) for kv in LIMITS.items() for x in kv)]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TEXTUNE_TEST_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, log)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(trained_run):
    """What the model says about each of TEXTS, computed in this process."""
    from textune.tasks.classification import ClassifierPredictor

    predictor = ClassifierPredictor(trained_run, device="cpu")
    return dict(zip(TEXTS, predictor.predict(TEXTS)))


@pytest.fixture(scope="module")
def expected_lora(registry):
    """What the adapter says about each of TEXTS, computed in this process."""
    from textune.adapters import AdapterPredictor

    return dict(zip(TEXTS, AdapterPredictor(registry, device="cpu").predict(TEXTS, adapter="toy-lora")))


def metric_value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_health_answers_without_a_token(server):
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_classify_returns_labels_scores_probabilities_in_input_order(client, expected):
    texts = TEXTS[::-1] + TEXTS[:2]
    r = client.post("/v1/classify", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] is None and len(body["results"]) == len(texts)
    for text, got in zip(texts, body["results"]):
        assert got["label"] == expected[text]["label"]
        assert got["score"] == pytest.approx(expected[text]["score"], abs=1e-4)
        assert set(got["probabilities"]) == {"negative", "positive"}


def test_concurrent_requests_are_merged_into_micro_batches(client, expected):
    before = client.get("/metrics").text
    with ThreadPoolExecutor(8) as pool:
        texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
        responses = list(pool.map(lambda t: client.post("/v1/classify", json={"texts": [t]}), texts))
    for text, r in zip(texts, responses):
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["label"] == expected[text]["label"]  # each caller gets its own result
    after = client.get("/metrics").text
    calls = metric_value(after, "textune_batch_requests_count") - metric_value(before, "textune_batch_requests_count")
    merged = metric_value(after, "textune_batch_requests_sum") - metric_value(before, "textune_batch_requests_sum")
    assert merged == 8
    assert calls < 8, f"8 concurrent requests took {calls} model calls: nothing was batched"


@pytest.mark.parametrize("body, status, message", [
    ({"texts": ["good"] * 9}, 413, "got 9 texts, at most 8 per request"),
    ({"texts": ["good", "x" * 201]}, 413, r"texts\[1\] has 201 characters, at most 200"),
    ({"texts": ["x" * 5000]}, 413, "over the limit of 4096 bytes"),
    ({"texts": []}, 422, "texts: List should have at least 1 item"),
    ({"text": ["good"]}, 422, "texts: Field required"),
    ({"texts": ["good", "bad"], "text_pairs": ["x"]}, 422, "got 2 texts but 1 text_pairs"),
    ({"texts": [3]}, 422, r"texts\.0: Input should be a valid string"),
    ({"texts": ["good"], "adapter": "sst2"}, 400, "no adapter 'sst2' in the registry; it holds: toy-lora"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_clear_json_errors(client, body, status, message):
    if isinstance(body, str):
        r = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status
    assert re.search(message, r.json()["error"]["message"]), r.json()


def test_requests_name_an_adapter_and_mix_with_base_requests(client, expected, expected_lora):
    jobs = [(t, a) for t in TEXTS for a in (None, "toy-lora")]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: client.post("/v1/classify", json={"texts": [job[0]], "adapter": job[1]}),
                                  jobs))
    for (text, adapter), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        want = (expected_lora if adapter else expected)[text]
        assert r.json()["adapter"] == adapter
        assert r.json()["results"][0]["score"] == pytest.approx(want["score"], abs=1e-4)
        assert r.json()["results"][0]["label"] == want["label"]


def test_adapter_without_a_registry_is_a_clear_400():
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app

    class Fixed:
        label_names = ["negative", "positive"]

        def predict(self, texts, pairs=None):
            return [{"label": "positive", "score": 1.0, "probabilities": {"negative": 0.0, "positive": 1.0}}] * len(texts)

    with TestClient(create_app(Fixed(), ServeSettings(), "fixed")) as c:
        assert c.post("/v1/classify", json={"texts": ["a"]}).json()["results"][0]["label"] == "positive"
        r = c.post("/v1/classify", json={"texts": ["a"], "adapter": "sst2"})
    assert r.status_code == 400 and "no adapter registry is loaded" in r.json()["error"]["message"]


def test_tasks_the_classifier_lacks_say_so(client):
    for task in ("fill-mask", "generate", "chat/completions"):
        r = client.post(f"/v1/{task}", json={"texts": ["good [MASK]"]})
        assert r.status_code == 404
        assert f"does not support {task}" in r.json()["error"]["message"]


def test_token_is_required_on_the_api(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{server}/v1/classify", json={"texts": ["good"]}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/metrics").status_code == 401


def test_full_queue_answers_503_not_an_ever_longer_wait(client):
    # 8 requests of 8 texts against a bound of 16 waiting texts: the first two fill the queue while the
    # batch waits 150 ms for company, so some of the rest must be turned away.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/classify", json={"texts": ["good"] * 8}), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    full = next(r for r in responses if r.status_code == 503)
    assert full.headers["retry-after"] == "1" and "queue limit (16 texts" in full.json()["error"]["message"]
    assert client.get("/health").json()["queued_texts"] == 0


def test_models_metrics_and_docs(client):
    models = client.get("/v1/models").json()
    assert models["labels"] == ["negative", "positive"]
    (adapter,) = models["adapters"]
    assert adapter["name"] == "toy-lora" and adapter["labels"] == ["negative", "positive"]
    assert adapter["method"].lower() == "lora"
    assert models["limits"]["max_texts"] == 8
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'textune_requests_total{path="/v1/classify",status="200"}' in metrics.text
    assert "textune_request_seconds_bucket" in metrics.text and "textune_batch_texts_bucket" in metrics.text
    assert client.get("/docs").status_code == 200
    assert "/v1/classify" in json.loads(client.get("/openapi.json").text)["paths"]
    assert models["task"] == "classification"


def test_every_classifier_response_is_what_the_openapi_schema_promises(client, server):
    """Each route's real answers, successes and errors alike, checked against the schema the app publishes."""
    for method, path, body in [("POST", "/v1/classify", {"texts": TEXTS[:2]}),
                               ("POST", "/v1/classify", {"texts": TEXTS[:1], "adapter": "toy-lora"}),
                               ("POST", "/v1/classify", {"texts": ["x" * 201]}),
                               ("POST", "/v1/classify", {"texts": []}),
                               ("POST", "/v1/classify", {"texts": ["good"], "adapter": "sst2"}),
                               ("POST", "/v1/entities", {"texts": ["good"]}),
                               ("POST", "/v1/generate", {"prompt": "good"}),
                               ("GET", "/v1/models", None)]:
        r = client.request(method, path, json=body)
        assert_matches_schema(client, method, path, r)
    assert_matches_schema(client, "GET", "/health", httpx.get(f"{server}/health"))
    unauthorised = httpx.post(f"{server}/v1/classify", json={"texts": ["good"]})
    assert unauthorised.status_code == 401
    assert_matches_schema(client, "POST", "/v1/classify", unauthorised)
    schema = client.get("/openapi.json").json()
    classify = schema["paths"]["/v1/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert classify == {"$ref": "#/components/schemas/ClassifyResponse"}  # one typed answer, not a union
    results = schema["components"]["schemas"]["ClassifyResponse"]["properties"]["results"]["items"]
    assert results == {"$ref": "#/components/schemas/Prediction"}


def test_serve_refuses_bad_settings_in_one_line(trained_run, capsys, monkeypatch):
    monkeypatch.delenv("TEXTUNE_NO_SUCH_TOKEN", raising=False)
    assert main(["serve", str(trained_run), "--token-env", "TEXTUNE_NO_SUCH_TOKEN"]) == 2
    assert "--token-env TEXTUNE_NO_SUCH_TOKEN: that environment variable is not set" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--max-texts", "100", "--max-queue", "10"]) == 2
    assert "--max-queue (10) must be at least --max-texts (100)" in capsys.readouterr().err


# ---------------------------------------------------------------- masked and causal language models


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    from conftest import build_tiny_lm

    return {kind: build_tiny_lm(tmp_path_factory.mktemp(f"tiny-{kind}"), kind) for kind in ("mlm", "clm")}


def lm_app(folder, **limits):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app
    from textune.tasks.language_modeling import LanguageModelPredictor

    model = LanguageModelPredictor(folder)
    return model, TestClient(create_app(model, ServeSettings(**limits), folder.name))


def test_the_served_models_task_and_objective_come_from_its_architecture(lm_dirs, trained_run):
    from textune.serving.server import load_served
    from textune.serving import ServeSettings

    for folder, task, objective in ((lm_dirs["mlm"], "language-modeling", "mlm"),
                                    (lm_dirs["clm"], "language-modeling", "clm"),
                                    (trained_run, "classification", None)):
        predictor, adapters, name = load_served(str(folder), ServeSettings())
        assert (predictor.task, getattr(predictor, "objective", None), adapters) == (task, objective, None)
        assert name == folder.name


def test_masked_lm_answers_fill_mask_per_text_and_mask(lm_dirs):
    from textune.generate import fill_mask

    model, app = lm_app(lm_dirs["mlm"], max_texts=3, max_chars=40)
    texts = ["the movie was [MASK] and [MASK]", "a [MASK] film"]
    with app as c:
        r = c.post("/v1/fill-mask", json={"texts": texts, "top_k": 3})
        assert r.status_code == 200, r.text
        want = fill_mask(model.model, model.tokenizer, texts, top_k=3)
        got = r.json()["results"]
        assert [[[x["token"] for x in m] for m in t] for t in got] == [[[x["token"] for x in m] for m in t] for t in want]
        assert got[0][1][0]["score"] == pytest.approx(want[0][1][0]["score"], abs=1e-6)
        assert c.get("/v1/models").json()["task"] == "language-modeling"
        assert_matches_schema(c, "POST", "/v1/fill-mask", r)
        assert_matches_schema(c, "GET", "/v1/models", c.get("/v1/models"))
        for body, status, message in [
            ({"texts": ["a good film"]}, 400, r"no mask in 'a good film': write \[MASK\]"),
            ({"texts": ["a [MASK] film"], "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
            ({"texts": ["a [MASK] film"] * 4}, 413, "got 4 texts, at most 3 per request"),
            ({"texts": ["a [MASK] film " + "x" * 40]}, 413, r"texts\[0\] has 54 characters, at most 40"),
        ]:
            r = c.post("/v1/fill-mask", json=body)
            assert r.status_code == status and re.search(message, r.json()["error"]["message"]), r.text
            assert_matches_schema(c, "POST", "/v1/fill-mask", r)
        for path in ("classify", "generate"):
            r = c.post(f"/v1/{path}", json={"texts": ["a film"]})
            assert r.status_code == 404
            assert f"is a masked language model and does not support {path}; use POST /v1/fill-mask" in r.text


def test_causal_lm_answers_generate_greedy_and_seeded_sampling(lm_dirs):
    from textune.generate import generate_text

    model, app = lm_app(lm_dirs["clm"], max_texts=4, max_new_tokens=20)
    with app as c:
        r = c.post("/v1/generate", json={"prompt": "the movie", "max_new_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["texts"] == generate_text(model.model, model.tokenizer, "the movie", max_new_tokens=5)
        sampled = {"prompt": "a film", "max_new_tokens": 6, "do_sample": True, "num_return_sequences": 3, "seed": 4}
        first = c.post("/v1/generate", json=sampled).json()["texts"]
        assert len(first) == 3 and c.post("/v1/generate", json=sampled).json()["texts"] == first
        assert c.get("/v1/models").json()["task"] == "language-modeling"
        assert_matches_schema(c, "POST", "/v1/generate", r)
        for body, status, message in [
            ({"prompt": "a film", "num_return_sequences": 2}, 400, "needs --do-sample"),
            ({"prompt": "a film", "max_new_tokens": 21}, 413, "max_new_tokens 21 is over the limit of 20"),
            ({"prompt": "a film", "do_sample": True, "num_return_sequences": 5}, 413, "num_return_sequences 5 is over"),
            ({"prompt": "a film", "top_p": 0}, 422, "top_p: Input should be greater than 0"),
            ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
            ({"texts": ["a film"]}, 422, "prompt: Field required"),
        ]:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == status and re.search(message, r.json()["error"]["message"]), r.text
            assert_matches_schema(c, "POST", "/v1/generate", r)
        r = c.post("/v1/classify", json={"texts": ["a film"]})
        assert r.status_code == 404 and "is a causal language model and does not support classify" in r.text


def test_serve_command_serves_a_causal_lm_at_generate(lm_dirs, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "textune", "serve", str(lm_dirs["clm"]), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, log)
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "the plot", "max_new_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["texts"][0].startswith("the plot"), r.text
        assert httpx.post(f"{url}/v1/fill-mask", json={"texts": ["a [MASK]"]}).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_an_adapter_registry_for_a_language_model(lm_dirs, tmp_path, capsys):
    assert main(["serve", str(lm_dirs["mlm"]), "--adapters", str(tmp_path)]) == 2
    assert "is a masked language model; leave out --adapters" in capsys.readouterr().err


def test_serve_without_a_model_serves_the_default_causal_lm_by_its_name(monkeypatch, tmp_path, capsys):
    """As generate and chat do: SmolLM2-135M-Instruct converted from its GGUF file (here a tiny chat model in a
    folder marked as converted, so nothing is downloaded or converted), named after the GGUF model rather than
    the hashed cache folder it is converted into."""
    import textune.gguf
    from textune.serving import ServeSettings
    from textune.serving.server import load_served

    folder = build_tiny_chat_lm(tmp_path / "SmolLM2-135M-Instruct.Q4_1-0123456789ab")
    (folder / textune.gguf.PROVENANCE).write_text(json.dumps({"source": "/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    monkeypatch.setattr(textune.gguf, "default_causal_lm_dir", lambda: folder)
    predictor, _, name = load_served(None, ServeSettings())
    assert (predictor.task, predictor.causal, name) == ("language-modeling", True, "SmolLM2-135M-Instruct.Q4_1")
    # The command takes no model now; its settings are still checked first.
    assert main(["serve", "--max-texts", "100", "--max-queue", "10"]) == 2
    assert "--max-queue (10) must be at least --max-texts (100)" in capsys.readouterr().err
