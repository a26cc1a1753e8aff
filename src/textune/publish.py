"""Publishing: `textune push RUN --repo USER/NAME` uploads the run's model folder, model card included, and the
run files its task's predictor reads (`Task.prediction_files`: config.yaml, ...) beside it, to a model repository
on the Hugging Face Hub through `huggingface_hub` (`HfApi.create_repo`, then one `create_commit`). The downloaded
repository is then a folder that is model and run at once, as a merged folder is, and predicts as the run does.

Everything that can be checked here is checked before the first request (a run folder with a model, a valid
repository name, a token), so a mistake uploads nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from textune.errors import TextuneError
from textune.model_card import write_model_card
from textune.tasks import get_task, task_of

NO_TOKEN = ("no Hugging Face token: set HF_TOKEN to a token with write access (huggingface.co/settings/tokens) "
            "or log in once with `hf auth login`")


def upload_files(run: Path) -> dict[str, Path]:
    """Path in the repository -> file of the run: every file of RUN/model at the top, and beside them the run
    files the task's predictor reads (`Task.prediction_files`; those under model/ come with the model folder)."""
    model = run / "model"
    # as upload_folder leaves out git's and huggingface_hub's own metadata
    files = {p.relative_to(model).as_posix(): p for p in sorted(model.rglob("*"))
             if p.is_file() and p.relative_to(model).parts[0] not in (".git", ".cache")}
    for name in get_task(task_of(run)).prediction_files:
        if not name.startswith("model/") and (run / name).is_file():
            files.setdefault(name, run / name)
    return files


def push_run(run: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload RUN/model (with its README.md model card, written now if the run predates model cards) and the run
    files its predictions need (see `upload_files`) to the Hub model repository `repo_id` in one commit,
    creating the repository if needed; return its URL.

    The Hub is `HF_ENDPOINT` (a mirror or a private Hub) when set. `private` applies only to a repository this
    call creates: an existing one keeps its visibility.

    Raises:
        TextuneError: not a run folder, a bad repository name, no token, or the Hub refused or was unreachable.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    run = Path(run).expanduser()
    model = run / "model"
    if not (run / "config.yaml").is_file() or not model.is_dir():
        raise TextuneError(f"{run} is not a textune run folder (it needs config.yaml and model/); push the folder "
                           f"textune train wrote (its output_dir)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise TextuneError(f"--repo {repo_id!r} is not a repository name: {str(e).rstrip('.')}; write it "
                           f"as USER/NAME") from None
    token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise TextuneError(NO_TOKEN)
    if not (model / "README.md").is_file():
        write_model_card(run)
    # HF_ENDPOINT is read here, not when huggingface_hub was imported, so it also applies within one process.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                     for name, path in upload_files(run).items()]
        api.create_commit(repo_id=repo_id, operations=additions, commit_message=f"textune push {run.name}")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = {401: "the token is invalid or expired", 403: "the token cannot write to this repository (it needs "
                "write access to its owner)"}.get(status, "")
        raise TextuneError(f"the Hub refused the upload to {repo_id} (HTTP {status}{': ' + hint if hint else ''}): "
                           f"{str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "Invalid metadata" not in str(e):  # only the Hub's check of README.md's metadata is the user's to fix
            raise
        raise TextuneError(f"the Hub refused the model card's metadata ({model / 'README.md'}): "
                           f"{' '.join(str(e).split())}") from None
    except (OSError, HfHubHTTPError.__bases__[0]) as e:  # the second: httpx's (httpx2's) HTTPError, which every
        # failed request raises (connection refused, DNS, time-outs); offline mode raises an OSError
        raise TextuneError(f"could not reach the Hub at {api.endpoint}: {e}; check the network (and HF_ENDPOINT)") from None
    return str(url)
