"""Training checkpoints that a run can resume from exactly.

A checkpoint is a folder `RUN/checkpoints/step-00000120/` holding everything the next step depends on:
model weights (safetensors), optimizer, scheduler and gradient-scaler state, the RNG states of Python,
NumPy and PyTorch of every process (`rng-<process>.json` and `.safetensors`: each process draws its own
dropout masks), the position in the data order, the loop counters and the history so far. It is
written to a hidden temporary folder and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and never a half-written one under a real name. Only tensors and plain containers are
stored, and they are read back with `torch.load(weights_only=True)`: loading a checkpoint runs no code.
A run keeps its newest `train.keep_last` checkpoints; with that key empty, two while training and none once
the run has finished and saved its model (a finished run is not resumed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from textune.errors import TextuneError

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Names and shapes of the parameters: a checkpoint of another model has a different fingerprint."""
    spec = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.state_dict().items())
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, g = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, accelerator, loop: dict,
                    history: list[dict], keep_last: int | None) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    Called on every process: each writes its own RNG state, the main process everything else (DDP keeps
    the weights and optimizer state identical on all of them) and then renames the folder into place.
    """
    root = run / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    plain_rng, tensor_rng = _rng_state()
    save_file(tensor_rng, tmp / f"rng-{accelerator.process_index}.safetensors")
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(plain_rng))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_main_files(tmp, final, step, model, optimizer, scheduler, accelerator, loop, history, keep_last)
    accelerator.wait_for_everyone()
    return final


def _write_main_files(tmp: Path, final: Path, step: int, model, optimizer, scheduler, accelerator, loop: dict,
                      history: list[dict], keep_last: int | None) -> None:
    root, run = final.parent, final.parent.parent
    unwrapped = accelerator.unwrap_model(model)
    # contiguous clones: safetensors refuses shared or strided storage (tied embeddings, transposed views)
    save_file({k: v.detach().contiguous().clone() for k, v in unwrapped.state_dict().items()},
              tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if accelerator.scaler is not None:
        torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    state = {"step": step, "loop": loop, "processes": accelerator.num_processes, "accelerator_step": accelerator.step,
             "model_fingerprint": model_fingerprint(unwrapped), "history": history}
    (tmp / "state.json").write_text(json.dumps(state))
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. an evaluation right after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last:
        for old in list_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    # Durability on power loss: file contents and the directory entry both reach the disk.
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def remove_checkpoints(run: Path) -> int:
    """Delete the run's checkpoints (complete ones and any half-written); return how many complete ones there were."""
    found = len(list_checkpoints(run))
    shutil.rmtree(run / CHECKPOINTS, ignore_errors=True)
    return found


def find_checkpoint(run: Path, resume: str) -> Path:
    """`latest` -> the newest checkpoint of `run`; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(run)
        if not found and (run / "metrics.json").is_file():
            raise TextuneError(f"--resume latest: {run} is a finished run, and its checkpoints were deleted once its "
                               f"model was saved, so there is nothing to resume; to train it further, start a new run "
                               f"from it (model.name: {run / 'model'}), or keep checkpoints next time with "
                               f"train.keep_last N")
        if not found:
            raise TextuneError(f"--resume latest: no checkpoint in {run / CHECKPOINTS}; start without --resume "
                               f"(add --overwrite to replace the run)")
        return found[-1]
    path = Path(resume).expanduser().resolve()
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise TextuneError(f"--resume {resume}: not a textune checkpoint folder (needs state.json and "
                           f"model.safetensors); use --resume latest or a RUN/checkpoints/step-N folder")
    return path


def check_checkpoint_matches(path: Path, model: torch.nn.Module) -> None:
    """Refuse, before anything is written, a checkpoint whose parameters do not fit `model`."""
    state = json.loads((path / "state.json").read_text())
    if state["model_fingerprint"] != model_fingerprint(model):
        raise TextuneError(f"checkpoint {path} was written for another model (different parameter names or "
                           f"shapes); resume with the config that made it")


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore everything `save_checkpoint` wrote; return its state (loop counters, history)."""
    unwrapped = accelerator.unwrap_model(model)
    check_checkpoint_matches(path, unwrapped)
    state = json.loads((path / "state.json").read_text())
    unwrapped.load_state_dict(load_file(path / "model.safetensors"))
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except ValueError:
        raise TextuneError(f"checkpoint {path} was written with other trainable parameters (tuning.method or "
                           f"layer learning rates changed); resume with the config that made it") from None
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    accelerator.step = state["accelerator_step"]
    # Each process its own generators. A checkpoint of fewer processes has none for the extra ones: they
    # take the main process's (the run goes on, but no longer exactly as it would have).
    rank = accelerator.process_index if (path / f"rng-{accelerator.process_index}.json").is_file() else 0
    if (path / f"rng-{rank}.json").is_file():
        _set_rng_state(json.loads((path / f"rng-{rank}.json").read_text()), load_file(path / f"rng-{rank}.safetensors"))
    else:  # written before checkpoints held one RNG state per process: the main process's only
        _set_rng_state(state["rng"], load_file(path / "rng.safetensors"))
    return state
