"""`textune train --num-processes N`: the same training command run as N processes by Accelerate's launcher.

This is `accelerate launch --multi_gpu --num_processes N -m textune train CONFIG ...` with the flags chosen
for the user: a free rendezvous port (two runs on one machine do not collide), and on a CPU machine
cores / N intra-op threads per process (N processes with all cores each would oversubscribe the CPU).
`--multi_gpu` is Accelerate's name for its torchrun launcher; on a machine without GPUs textune's
`Accelerator(cpu=True)` then joins the processes into one gloo group. Launcher configs for FSDP and
DeepSpeed are in configs/accelerate/ and are passed with `--accelerate-config`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from textune.errors import TextuneError


def batch_split_problem(batch_size: int, num_processes: int) -> str | None:
    """Why `train.batch_size` (the global batch) cannot be shared by `num_processes`, or None."""
    if batch_size % num_processes == 0:
        return None
    lower, upper = batch_size // num_processes * num_processes, -(-batch_size // num_processes) * num_processes
    return (f"train.batch_size: {batch_size} examples per step do not split evenly over {num_processes} processes; "
            f"use a multiple of {num_processes} such as {upper}" + (f" or {lower}" if lower else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(num_processes: int, textune_args: list[str], accelerate_config: str | None = None) -> list[str]:
    """The `accelerate launch` command line that runs `python -m textune TEXTUNE_ARGS` as N processes."""
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:  # the file says which launcher (DDP, FSDP, DeepSpeed) and its settings
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--multi_gpu"] if num_processes > 1 else []
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
            "--num_cpu_threads_per_process", str(threads), "-m", "textune", *textune_args]
    return cmd


FSDP_WITHOUT_GPU = ("FSDP runs on GPUs only in Accelerate, and this machine has none; use "
                    "configs/accelerate/cpu-gloo.yaml (DDP over gloo)")


def launcher_config_problem(accelerate_config: str) -> str | None:
    """Why this launcher config cannot run here, or None: DeepSpeed not installed (Accelerate's launcher would
    stop with a traceback), or FSDP without a GPU (Accelerate would run DDP on models loaded empty)."""
    import importlib.util

    import torch
    import yaml

    kind = (yaml.safe_load(Path(accelerate_config).read_text()) or {}).get("distributed_type")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed; pip install deepspeed, or use configs/accelerate/multi-gpu-ddp.yaml"
    if kind == "FSDP" and not torch.cuda.is_available():
        return FSDP_WITHOUT_GPU
    return None


def launch(num_processes: int, textune_args: list[str], accelerate_config: str | None = None) -> int:
    """Run the command as N processes and wait for them; return the launcher's exit status.

    The launcher runs in its own session, so a Ctrl-C (or SIGTERM) reaches only this process, which passes
    it to the launcher, which passes it once to each training process: they finish the step, write one
    checkpoint and exit (a second Ctrl-C stops them at once). A terminal's Ctrl-C sent to the whole group
    would reach them twice, from the terminal and from the launcher, and the second would stop them at once.

    Raises:
        TextuneError: N below 1, an accelerate config file that does not exist, or a DeepSpeed config
            without DeepSpeed installed.
    """
    if num_processes < 1:
        raise TextuneError(f"--num-processes must be 1 or more, got {num_processes}")
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise TextuneError(f"--accelerate-config {accelerate_config}: file not found (see configs/accelerate/)")
    problem = launcher_config_problem(accelerate_config) if accelerate_config is not None else None
    if problem:
        raise TextuneError(f"--accelerate-config {accelerate_config}: {problem}")
    proc = subprocess.Popen(launcher_command(num_processes, textune_args, accelerate_config), start_new_session=True)
    interrupted = False

    def forward(signum, frame):
        nonlocal interrupted
        interrupted = True
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                return 130 if interrupted else code  # 130: stopped by a signal, a checkpoint was written
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
