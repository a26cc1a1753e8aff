"""textune push: against a local HTTP server that answers the Hub endpoints huggingface_hub calls and records
what was sent (repository, privacy, the files and the model card); refusals before any upload."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_textune
from textune.cli import main
from textune.errors import TextuneError
from textune.publish import push_run


class FakeHub(BaseHTTPRequestHandler):
    """Answers create-repo, preupload (every file "regular": sent inline in the commit) and commit; records
    each request as (path, authorization header, body) in the server's `requests`."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.server.refuse:
            return self.answer(403, {"error": "You don't have the rights to create a model under this namespace"})
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            return self.answer(200, {"url": f"{base}/{payload['organization']}/{payload['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata, checked before the upload
            errors = [{"message": "metadata is invalid"}] if self.server.bad_metadata else []
            return self.answer(400 if errors else 200, {"errors": errors, "warnings": []})
        if "/preupload/" in self.path:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.answer(200, {"files": files})
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self.answer(200, {"commitUrl": f"{base}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                     "pullRequestUrl": None})
        self.answer(404, {"error": f"no route {self.path}"})

    do_GET = do_POST

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests, server.refuse, server.bad_metadata = [], False, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield server
    server.shutdown()


@pytest.fixture()
def online(monkeypatch):
    """conftest runs the suite offline and huggingface_hub read that when it was imported; push is the one
    command that goes online (the CLI lifts offline mode for it before importing huggingface_hub)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def sent(hub, fragment: str) -> list[tuple[str, str, bytes]]:
    """The recorded requests whose path holds `fragment` (huggingface_hub also asks for other things, such as
    its registry of agent harnesses, which the fake answers with 404)."""
    return [r for r in hub.requests if fragment in r[0]]


def committed_files(hub) -> dict[str, bytes]:
    (commit,) = [body for path, _, body in sent(hub, "/commit/")]
    lines = [json.loads(line) for line in commit.decode().splitlines()]
    assert lines[0]["key"] == "header"
    return {f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in lines if f["key"] == "file"}


def test_cli_push_creates_a_private_repo_and_uploads_the_model_and_its_card(trained_run, hub):
    result = run_textune("push", trained_run, "--repo", "me/toy-sentiment", "--private")
    assert result.returncode == 0, result.stderr
    (create,) = sent(hub, "/api/repos/create")
    path, auth, body = create
    assert json.loads(body) == {"name": "toy-sentiment", "organization": "me", "visibility": "private"}
    assert auth == "Bearer hf_test_token"
    assert sent(hub, "/api/models/me/toy-sentiment/preupload/main")
    files = committed_files(hub)
    model = trained_run / "model"
    # the model folder, and beside it the run files the predictor reads (one commit)
    assert set(files) == {p.name for p in model.iterdir()} | {"config.yaml", "metrics.json", "data_stats.json"}
    assert files["config.yaml"] == (trained_run / "config.yaml").read_bytes()
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert files["README.md"] == (model / "README.md").read_bytes()
    (validated,) = [json.loads(body) for _, _, body in sent(hub, "/api/validate-yaml")]
    assert validated["content"] == (model / "README.md").read_text()
    assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert "me/toy-sentiment" in result.stdout


def test_push_without_private_creates_a_public_repo(trained_run, hub, online):
    push_run(trained_run, "me/toy")
    (create,) = sent(hub, "/api/repos/create")
    assert json.loads(create[2])["visibility"] == "public"


def test_push_without_a_token_sends_nothing(trained_run, hub, online, monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(trained_run), "--repo", "me/toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["textune: error: no Hugging Face token: set HF_TOKEN to a token with write access "
                   "(huggingface.co/settings/tokens) or log in once with `hf auth login`"]
    assert sent(hub, "/api/repos/create") == [] and sent(hub, "/commit/") == []


def test_push_of_a_folder_that_is_not_a_run_sends_nothing(tmp_path, hub, online, capsys):
    (tmp_path / "model").mkdir()
    assert main(["push", str(tmp_path), "--repo", "me/toy"]) == 2
    assert "is not a textune run folder (it needs config.yaml and model/)" in capsys.readouterr().err
    assert sent(hub, "/api/repos/create") == [] and sent(hub, "/commit/") == []


def test_bad_repo_name_is_refused_before_any_request(trained_run, hub, online):
    with pytest.raises(TextuneError, match="--repo 'me/bad name' is not a repository name"):
        push_run(trained_run, "me/bad name")
    assert sent(hub, "/api/repos/create") == [] and sent(hub, "/commit/") == []


def test_a_refusal_by_the_hub_is_one_line_naming_the_status(trained_run, hub, online):
    hub.refuse = True
    with pytest.raises(TextuneError, match=r"the Hub refused the upload to me/toy \(HTTP 403: the token cannot "
                                           r"write to this repository"):
        push_run(trained_run, "me/toy")


def test_a_card_the_hub_finds_invalid_is_refused_before_the_upload(trained_run, hub, online):
    hub.bad_metadata = True
    with pytest.raises(TextuneError, match=r"the Hub refused the model card's metadata .*metadata is invalid"):
        push_run(trained_run, "me/toy")
    assert sent(hub, "/commit/") == []


def test_an_unreachable_hub_is_one_line(trained_run, online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    with pytest.raises(TextuneError, match=r"could not reach the Hub at http://127.0.0.1:9: .*check the network"):
        push_run(trained_run, "me/toy")


def test_the_pushed_repository_predicts_as_the_run(trained_run, hub, online, tmp_path):
    from textune.tasks import load_predictor, task_of

    push_run(trained_run, "me/toy")
    downloaded = tmp_path / "me--toy"  # the repository as a download (snapshot_download) lays it out
    downloaded.mkdir()
    for name, data in committed_files(hub).items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    assert task_of(downloaded) == task_of(trained_run)
    texts = ["a good film", " ".join(["bad"] * 60)]  # the second is cut at the run's model.max_length (32)
    pushed, run = load_predictor(downloaded), load_predictor(trained_run)
    assert pushed.max_length == run.max_length == 32
    assert pushed.predict(texts) == run.predict(texts)
