"""`train.compile`: the training step's forward and backward through `torch.compile`, where it pays.

Compiling costs time before the first step (tens of seconds per input shape on a CPU) and again for every new
shape, and pays back only through faster steps. So:
- the shapes are bounded: packed language-modelling blocks have one length (`TaskInputs.fixed_length`); other
  batches are padded to multiples of `train.pad_to_multiple_of` (16 when compiling): at most
  ceil(max_length / multiple) lengths. Each length comes at two batch sizes (a full batch and an epoch's last,
  smaller one), so the number of compiles is bounded and printed at start-up;
- `auto` decides from what it can know on this machine, never from figures measured elsewhere: batches padded
  to their longest row (every new length a compile) are left eager; so is a run with too few steps per shape
  to earn a compile back; otherwise the first batch is measured, eager against compiled, and the run compiles
  where the measured gain over its planned steps pays for compiling every shape. One line says what it chose
  and why;
- a compile that fails (no C compiler, an operation the compiler cannot trace) falls back to the eager model
  with one line, never a traceback.
Only the training step runs compiled. Evaluation, checkpoints and the saved model use the eager module, which
holds the same parameters, so saving and resuming work exactly as without compiling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_PAD_MULTIPLE = 16
# The backend torch.compile uses; tests swap in a cheaper one ("aot_eager") where only the plumbing is tested.
BACKEND = "inductor"
# Below this many planned steps per shape to compile, auto does not even measure: a compile costs tens of
# seconds, so a shape met fewer times than this pays back only with steps several times faster than eager.
MIN_STEPS_PER_SHAPE = 100
PROBE_REPEATS = 2  # timed steps per side of the measurement (the best counts)


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool  # compile: from the start, or (measure) unless the first batch's measurement says otherwise
    reason: str  # printed at start-up; for a measured plan, after the measurement
    pad_to_multiple_of: int | None
    max_shapes: int | None  # the compiles a run can need (lengths x 2 batch sizes), when bounded
    measure: bool = False  # auto: compile only where the first batch, measured, says it pays
    planned_steps: int = 0

    def describe(self) -> str:
        pad = (f"; batches padded to multiples of {self.pad_to_multiple_of}" if self.enabled and
               self.pad_to_multiple_of else "")
        shapes = f" (at most {self.max_shapes} input shapes to compile)" if self.enabled and self.max_shapes else ""
        return f"{'on' if self.enabled else 'off'} ({self.reason}){pad}{shapes}"


def plan_compile(setting: bool | str, device_type: str, precision: str, planned_samples: int, max_length: int,
                 pad_to_multiple_of: int | None, *, batch_size: int = 1, fixed_length: int | None = None,
                 streamed: bool = False, processes: int = 1) -> CompilePlan:
    """Whether to compile this run (`train.compile`: true, false or auto) and how batches are padded.

    `fixed_length`: the one length of every training batch (`TaskInputs.fixed_length`), else None; `streamed`:
    the training set is a stream (no first batch to measure before the loop); `processes`: the training processes
    (a measurement on each could decide differently). `device_type` and `precision` are named in the reason only:
    auto decides from this run's shapes, its length and a measurement, never from a table of other machines."""
    steps = max(1, math.ceil(planned_samples / max(batch_size, 1)))
    if fixed_length is not None:
        multiple, shapes, kind = None, 2, f"one length: blocks of {fixed_length} tokens"
    else:
        multiple = pad_to_multiple_of or (DEFAULT_PAD_MULTIPLE if setting is True else None)
        shapes = 2 * math.ceil(max_length / multiple) if multiple else None
        kind = f"bucketed: lengths padded to multiples of {multiple}" if multiple else None
    if setting != "auto":
        return CompilePlan(bool(setting), f"train.compile: {str(setting).lower()}", multiple if setting else
                           pad_to_multiple_of, shapes if setting else None, planned_steps=steps)
    where = f"{'fp32' if precision == 'no' else precision} on {device_type}"
    if kind is None:
        why = ("batches are padded to their longest row, so nearly every batch is a new shape to compile; "
               "train.pad_to_multiple_of buckets them")
    elif streamed or processes > 1:
        why = (f"{kind}, but a {'streamed training set' if streamed else f'run on {processes} processes'} is "
               f"not measured before training; train.compile: true compiles it")
    elif steps < MIN_STEPS_PER_SHAPE * shapes:
        why = (f"{kind}, {steps:,} planned steps for up to {shapes} shapes: fewer than {MIN_STEPS_PER_SHAPE} steps "
               f"a shape cannot earn back a compile")
    else:
        return CompilePlan(True, f"auto: {kind}, {steps:,} planned steps, {where}", multiple, shapes, measure=True,
                           planned_steps=steps)
    return CompilePlan(False, f"auto: {why}", pad_to_multiple_of, None, planned_steps=steps)


def measured_choice(eager_s: float, compiled_s: float, compile_s: float, plan: CompilePlan) -> tuple[bool, str]:
    """(compile?, the start-up line's reason) from the first batch's measurement: a step's seconds eager and
    compiled, and the seconds the first compile took, against the run's planned steps and shapes."""
    measured = (f"measured on the first batch here: step {compiled_s:.3g} s compiled vs {eager_s:.3g} s eager, "
                f"{compile_s:.0f} s to compile a shape")
    gain = eager_s - compiled_s
    if gain <= 0:
        return False, f"{plan.reason}; {measured}: no faster"
    pays_after = math.ceil(compile_s * (plan.max_shapes or 1) / gain)
    verdict = "pays" if plan.planned_steps >= pays_after else "would not pay"
    return plan.planned_steps >= pays_after, (f"{plan.reason}; {measured}: compiling up to {plan.max_shapes} shapes "
                                              f"{verdict} after {pays_after:,} steps")


class CompiledForward:
    """The model as the training step calls it: compiled, or the eager model after compiling failed.

    Attributes other than the call (config, embeddings, ...) are the eager model's, so a task's `loss_fn(model,
    batch)` can take this in the model's place. `shapes` records each distinct set of input shapes seen: the
    number of compiles the run needed."""

    def __init__(self, model: torch.nn.Module, plan: CompilePlan, say: Callable[[str], None]):
        self.model, self.plan, self.say = model, plan, say
        self.shapes: set[tuple] = set()
        # dynamic=False: one graph per padded shape (fast static kernels), and the limit above which dynamo
        # would silently run eager raised to the bucket bound.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, (plan.max_shapes or 0) + 2)
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
        training starts (a backward that failed mid-step could not be redone); for auto's measured plan, time
        eager and compiled steps on it too and keep compiling only where that pays, saying which in one line.
        Leaves the RNG (dropout masks) and the gradients as they were: the run trains exactly the steps it would
        have trained."""
        devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # One eager call first: models that set state on their first call (BERT's classifier sets
            # config.problem_type) would otherwise make the first training step recompile this shape.
            with torch.no_grad():
                self.model(**batch)
            try:
                eager_s = min(self._timed_step(self.model, batch) for _ in range(PROBE_REPEATS)) \
                    if self.plan.measure else 0.0
                compile_s = self._timed_step(self, batch)
                if self.plan.measure and self.compiled is not None:
                    compiled_s = min(self._timed_step(self, batch) for _ in range(PROBE_REPEATS))
                    keep, reason = measured_choice(eager_s, compiled_s, compile_s, self.plan)
                    if not keep:
                        self.compiled = None
                        self.shapes.clear()
                    self.say(f"compile    {'on' if keep else 'off'} ({reason})")
            except Exception as e:  # noqa: BLE001  the backward's compile failed (the forward's fell back already)
                if self.compiled is not None:
                    self.fall_back(e)
            finally:
                self.model.zero_grad(set_to_none=True)

    def _timed_step(self, forward: Callable, batch: dict) -> float:
        """Seconds of one forward and backward of `batch` through `forward` (gradients accumulate: the caller
        clears them)."""
        sync = torch.cuda.synchronize if batch["input_ids"].device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = forward(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().sum()
        loss.backward()
        sync()
        return time.perf_counter() - start

    def fall_back(self, error: BaseException) -> None:
        # dynamo wraps the compiler's own error (BackendCompilerFailed): its first line is what a user can act on
        cause = getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        self.say(f"compile    failed ({type(cause).__name__}: {first_line}); training the uncompiled model")
        self.compiled = None
        self.shapes.clear()
