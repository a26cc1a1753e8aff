"""`train.compile`: the training step's forward and backward through `torch.compile`, where it pays.

Compiling costs time before the first step (tens of seconds per input shape on a CPU) and again for every new
shape, and pays back only through faster steps. So:
- batches are padded to multiples of `train.pad_to_multiple_of` (16 when compiling): at most
  ceil(max_length / multiple) lengths, each with two batch sizes (a full batch and an epoch's last, smaller one),
  so the number of compiles is bounded and printed at start-up;
- `auto` compiles only where bench_train.py measured a faster steady state (MEASURED below) and the planned run
  is long enough to earn the compiling back; it says what it chose and why;
- a compile that fails (no C compiler, an operation the compiler cannot trace) falls back to the eager model
  with one line, never a traceback.
Only the training step runs compiled. Evaluation, checkpoints and the saved model use the eager module, which
holds the same parameters, so saving and resuming work exactly as without compiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_PAD_MULTIPLE = 16
# The backend torch.compile uses; tests swap in a cheaper one ("aot_eager") where only the plumbing is tested.
BACKEND = "inductor"


@dataclass(frozen=True)
class Measured:
    """What benchmarks/bench_train.py measured for one (device type, precision) on MiniLM-L6, batch 32."""

    break_even_samples: int | None  # training samples after which compiling has paid for itself; None: never
    evidence: str


# break_even = compile seconds / (1 / eager samples/s - 1 / compiled samples/s).
MEASURED = {
    ("cpu", "bf16"): Measured(44_750, "bf16 autocast on an AVX-512 CPU: 130 -> 162 samples/s after 68 s of "
                                      "compiling, so it pays from ~45k samples"),
    ("cpu", "no"): Measured(None, "fp32 on a CPU: a whole SST-2 epoch took 1210 s compiled against 735 s eager "
                                  "(steps no faster, 6 shapes to compile), so never"),
}


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    reason: str  # printed at start-up
    pad_to_multiple_of: int | None
    max_shapes: int | None  # the compiles a run can need (lengths x 2 batch sizes), when padded

    def describe(self) -> str:
        pad = (f"; batches padded to multiples of {self.pad_to_multiple_of} (at most {self.max_shapes} input "
               f"shapes to compile)" if self.enabled else "")
        return f"{'on' if self.enabled else 'off'} ({self.reason}){pad}"


def plan_compile(setting: bool | str, device_type: str, precision: str, planned_samples: int, max_length: int,
                 pad_to_multiple_of: int | None) -> CompilePlan:
    """Whether to compile this run (`train.compile`: true, false or auto) and how batches are padded."""
    if setting == "auto":
        measured = MEASURED.get((device_type, precision))
        if measured is None:
            enabled, reason = False, (f"auto: no gain measured for {precision} on {device_type}; "
                                      f"train.compile: true to try it")
        else:
            enabled = measured.break_even_samples is not None and planned_samples >= measured.break_even_samples
            reason = f"auto: {planned_samples:,} planned samples; {measured.evidence}"
    else:
        enabled, reason = bool(setting), f"train.compile: {str(setting).lower()}"
    multiple = pad_to_multiple_of or (DEFAULT_PAD_MULTIPLE if enabled else None)
    shapes = 2 * math.ceil(max_length / multiple) if multiple else None
    return CompilePlan(enabled, reason, multiple, shapes)


class CompiledForward:
    """The model as the training step calls it: compiled, or the eager model after compiling failed.

    Attributes other than the call (config, embeddings, ...) are the eager model's, so a task's `loss_fn(model,
    batch)` can take this in the model's place. `shapes` records each distinct set of input shapes seen: the
    number of compiles the run needed."""

    def __init__(self, model: torch.nn.Module, max_shapes: int | None, say: Callable[[str], None]):
        self.model = model
        self.say = say
        self.shapes: set[tuple] = set()
        # dynamic=False: one graph per padded shape (fast static kernels), and the limit above which dynamo
        # would silently run eager raised to the bucket bound.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, (max_shapes or 0) + 2)
        self.compiled: Callable | None = torch.compile(model, backend=BACKEND, dynamic=False)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **batch):
        if self.compiled is None:
            return self.model(**batch)
        self.shapes.add(tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor)))
        try:
            return self.compiled(**batch)
        except Exception as e:  # noqa: BLE001  any failure inside the compiler; a user error fails eager too
            self.fall_back(e)
            return self.model(**batch)

    def probe(self, batch: dict) -> None:
        """Compile the shape of `batch` now, forward and backward, so that a compiler failure falls back before
        training starts (a backward that failed mid-step could not be redone). Leaves the RNG (dropout masks)
        and the gradients as they were: the run trains exactly the steps it would have trained."""
        devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # One eager call first: models that set state on their first call (BERT's classifier sets
            # config.problem_type) would otherwise make the first training step recompile this shape.
            with torch.no_grad():
                self.model(**batch)
            try:
                out = self(**batch)
                loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().sum()
                loss.backward()
            except Exception as e:  # noqa: BLE001  the backward's compile failed (the forward's fell back already)
                if self.compiled is not None:
                    self.fall_back(e)
            finally:
                self.model.zero_grad(set_to_none=True)

    def fall_back(self, error: BaseException) -> None:
        # dynamo wraps the compiler's own error (BackendCompilerFailed): its first line is what a user can act on
        cause = getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        self.say(f"compile    failed ({type(cause).__name__}: {first_line}); training the uncompiled model")
        self.compiled = None
        self.shapes.clear()
