"""Timing helpers shared by the benchmark scripts (spec §7).

The scripts are run as `python3 benchmarks/bench_x.py`, so this module is
imported as the top-level module `timing` from the scripts' own directory.

Method: compile and warm-up calls are excluded; each sample dispatches the
function `reps` times back to back over rotated input sets and then waits
with `jax.block_until_ready`, where `reps` is chosen so that one sample lasts
at least `min_sample_ms`; the result is the median over the samples of the
per-call time. Functions compared with each other (interleaved_median_ms)
take their samples in turn.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def _elapsed_ms(fn: Callable, calls) -> float:
    """Wall time in ms of dispatching every call in `calls` and waiting for the last."""
    result = None
    start = time.perf_counter()
    for inputs in calls:
        result = fn(*inputs)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) * 1e3


def median_ms(fn: Callable, input_sets: Sequence[tuple], samples: int = 20, min_sample_ms: float = 5.0,
              warmup: int = 3) -> float:
    """Median wall time in ms of one call `fn(*inputs)`.

    Args:
      fn: the (jitted) function; its inputs are each tuple of `input_sets`.
      input_sets: one or more argument tuples of the same shapes, used in turn
        (rotated) so that consecutive calls do not find their inputs in L2.
      samples: number of timed samples (the median is taken over them).
      min_sample_ms: each sample repeats the call until it lasts at least this.
      warmup: untimed calls after the first (compiling) one.
    """
    return interleaved_median_ms([(fn, input_sets)], samples, min_sample_ms, warmup)[0]


def interleaved_median_ms(cases: Sequence[tuple[Callable, Sequence[tuple]]], samples: int = 20,
                          min_sample_ms: float = 5.0, warmup: int = 3) -> list[float]:
    """median_ms of each (fn, input_sets) case, their samples interleaved
    (case 0, case 1, ..., case 0, ...), so that a drift of the device's clocks
    during the run weighs on every case alike and their ratios keep still."""
    if not cases or any(not sets for _, sets in cases):
        raise ValueError("interleaved_median_ms needs cases with at least one input set each")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rotations, reps = [], []
    for fn, input_sets in cases:
        rotation = itertools.cycle(input_sets)
        # First call compiles; then `warmup` more untimed calls.
        for _ in range(1 + max(0, warmup)):
            jax.block_until_ready(fn(*next(rotation)))
        # Calibrate: how many back-to-back calls make one sample last min_sample_ms.
        probe = max(1, len(input_sets))
        once_ms = _elapsed_ms(fn, [next(rotation) for _ in range(probe)]) / probe
        rotations.append(rotation)
        reps.append(max(1, -(-int(min_sample_ms * 1000) // max(1, int(once_ms * 1000)))))
    per_call = [[] for _ in cases]
    for _ in range(samples):
        for i, (fn, _) in enumerate(cases):
            calls = [next(rotations[i]) for _ in range(reps[i])]
            per_call[i].append(_elapsed_ms(fn, calls) / reps[i])
    return [statistics.median(x) for x in per_call]


def nvml_energy_reader() -> Callable[[], float] | None:
    """A function that reads the GPU's energy counter in joules (NVML's total
    energy since the driver loaded), or None where NVML or the counter is
    missing (a CPU machine, a GPU before Volta). The GPU is NVML's device of
    the first index in CUDA_VISIBLE_DEVICES (0 if unset): the device JAX
    lists first when the two orders agree (CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    import ctypes
    import os

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    index = int(first) if first.isdigit() else 0
    handle = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    millijoules = ctypes.c_ulonglong()

    def read() -> float:
        if nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(millijoules)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return millijoules.value / 1e3

    try:
        read()
    except RuntimeError:
        return None
    return read


def energy_per_call(fn: Callable, input_sets: Sequence[tuple], read_joules: Callable[[], float],
                    per_call_ms: float, seconds: float = 3.0) -> tuple[float, float]:
    """(joules per call, mean watts) of the compiled `fn` run back to back over
    the rotated `input_sets` for at least `seconds` (from `per_call_ms`, e.g.
    median_ms's result), from the energy counter `read_joules`
    (nvml_energy_reader). NVML does not say how often the counter steps, so
    the window is long (seconds, not one sample). What the card draws while
    idle between dispatches counts too, as it would in a training step."""
    rotation = itertools.cycle(input_sets)
    calls = max(len(input_sets), int(seconds * 1e3 / max(per_call_ms, 1e-3)) + 1)
    batch = [next(rotation) for _ in range(calls)]
    joules0 = read_joules()
    elapsed_ms = _elapsed_ms(fn, batch)
    joules = read_joules() - joules0
    return joules / calls, joules / (elapsed_ms / 1e3)


def copy_ms(gib: float, seed: int, samples: int, min_sample_ms: float, warmup: int) -> tuple[float, int]:
    """The device's copy rate, the yardstick of the memory-bound benchmarks:
    median ms (median_ms) of a jitted `x + 1` over `gib` GiB of random int32,
    two rotated buffers, and the bytes it moves (read + write)."""
    n = int(gib * (1 << 30)) // 4
    bits = jax.jit(lambda k: jax.lax.bitcast_convert_type(jax.random.bits(k, (n,), jnp.uint32), jnp.int32))
    sets = [(bits(k),) for k in jax.random.split(jax.random.PRNGKey(seed), 2)]
    ms = median_ms(jax.jit(lambda x: x + 1), sets, samples, min_sample_ms, warmup)
    for (x,) in sets:
        x.delete()
    return ms, 2 * 4 * n


def normal(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
    """Standard normal samples drawn in float32 and cast to `dtype`."""
    return jax.random.normal(key, tuple(shape), jnp.float32).astype(dtype)


def announce_device() -> dict:
    """Prints the device and the jax version; returns them (and the command
    line) for a results file's meta."""
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    return dict(device=device.device_kind, jax=jax.__version__, argv=sys.argv)


def fmt(value, spec: str) -> str:
    """format(value, spec), or "-" for a missing value."""
    return "-" if value is None else format(value, spec)


def _tsv_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", " ")


def write_results(json_path: str | None, tsv_path: str | None, meta: dict, rows: Sequence[dict],
                  columns: Sequence[str]) -> None:
    """Writes a benchmark's rows: JSON {meta (with the date), rows} and a TSV
    of `columns` (floats to 6 significant digits, missing values as "-")."""
    meta = dict(meta, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=list(rows)), f, indent=1)
    if tsv_path:
        with open(tsv_path, "w") as f:
            f.write("\t".join(columns) + "\n")
            for row in rows:
                f.write("\t".join(_tsv_cell(row.get(c)) for c in columns) + "\n")
