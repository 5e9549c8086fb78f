"""Honest measurements of fusion: wall time, peak memory beyond the inputs, size, MACs, latency.

Public helpers (also used by ``bench.perf``):

* ``measure_fusion(models, method, example_inputs, options, memory=...)`` -> ``FusionMeasurement``
  (fused model, seconds, peak_mem_mb): on a GPU in-process with synchronization and the allocator's peak.
  On the CPU, ``memory=True`` measures in-process: the kernel's resident-set high-water mark (VmHWM) is
  reset just before fusion (``/proc/self/clear_refs``) and read after, minus the RSS at the reset. Cheap
  (no process start), so a sweep can afford it on every trial; caveats: other threads of the process (the
  tracking writer) count too, memory the allocator kept from earlier work is reused without raising RSS
  (the figure can be too low, never hidden by a stale peak), and without Linux's clear_refs it is not
  measured (NaN). ``memory="child"`` fuses in a fresh child process after a warm-up, the honest figure
  ``fusebench perf`` reports (costs the child's start-up, seconds). ``tracemalloc`` does not see torch
  tensors, so it is not used.
* ``peak_rss_beyond_baseline(fn, *args, **kwargs)`` -> ``(result, peak_mb, seconds)``: runs a picklable
  ``fn`` in a fresh child process and reports its peak RSS minus its RSS once the arguments are loaded.
* ``gpu_peak_beyond_baseline(fn, *args, device=..., **kwargs)`` -> ``(result, peak_mb, seconds)``.
* ``macs_and_params``, ``latency_ms``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_MB = 1024.0 * 1024.0


@dataclass
class FusionMeasurement:
    fused_model: nn.Module
    seconds: float
    peak_mem_mb: float


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _hwm_bytes() -> int:
    """The process's own RSS high-water mark (VmHWM), which ``clear_refs`` resets.

    Not ``ru_maxrss``: after fork + exec the kernel keeps the *parent's* RSS at fork time in the child's
    ``ru_maxrss`` (signal->maxrss), so a child started from a large parent would report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _maxrss_bytes()


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so ru_maxrss starts at the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _child_main(in_path: str, out_path: str) -> None:
    """Runs in the child (``python -m bench.measure IN OUT``). The call is unpickled from a private file
    (not shared memory, whose pages would become resident only when first read inside ``fn``) before
    the baseline is taken; the outcome is pickled to OUT."""
    with open(in_path, "rb") as f:
        preload, threads, parent_path, payload = pickle.load(f)
    sys.path.extend(p for p in parent_path if p not in sys.path)  # so ``fn``'s module can be imported
    try:
        torch.set_num_threads(threads)
        for name in preload:  # imports are not the function's memory
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        fn, args, kwargs, warmup = pickle.loads(payload)
        del payload
        if warmup:  # lazy imports and code pages touched by a first call are not fn's memory; on copies,
            # so that nothing ``fn`` might cache per object makes the measured call cheaper
            warm_args, warm_kwargs = copy.deepcopy((args, kwargs))
            fn(*warm_args, **warm_kwargs)
            del warm_args, warm_kwargs
            gc.collect()
            _malloc_trim()  # give the warm-up's freed heap back, or the measured call would reuse it
        gc.collect()
        reset = _reset_peak_rss()
        peak_now = _hwm_bytes if reset else _maxrss_bytes
        baseline = _rss_bytes() if reset else _maxrss_bytes()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        peak = max(0, peak_now() - baseline)
        outcome = pickle.dumps(("ok", result, peak / _MB, seconds))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises
        try:
            outcome = pickle.dumps(("error", exc, 0.0, 0.0))
        except Exception:  # noqa: BLE001 - unpicklable exception
            outcome = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), 0.0, 0.0))
    with open(out_path, "wb") as f:
        f.write(outcome)


def peak_rss_beyond_baseline(
    fn: Callable[..., Any],
    *args: Any,
    preload: tuple[str, ...] = (),
    warmup: bool = False,
    fixed_mmap_threshold: bool = True,
    **kwargs: Any,
) -> tuple[Any, float, float]:
    """Run ``fn(*args, **kwargs)`` in a fresh Python process; return (result, peak MiB, seconds).

    The peak is the child's RSS high-water mark during ``fn`` minus its RSS after the arguments were
    unpickled and ``preload`` modules imported (and, with ``warmup``, after one unmeasured call of ``fn``,
    so that lazy imports and first-call caches are not counted). ``fn`` must be a module-level function; it, the
    arguments and the result must be picklable (nn.Modules are). Exceptions raised by ``fn`` are
    re-raised here. The child is a plain ``python -m bench.measure`` process rather than a
    multiprocessing "spawn" child: spawn re-imports the caller's ``__main__``, which fails for
    interactive / stdin scripts and re-runs unguarded scripts.
    """
    with tempfile.TemporaryDirectory(prefix="fusebench-measure-") as tmp:
        in_path, out_path = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(in_path, "wb") as f:
            call = pickle.dumps((fn, args, kwargs, warmup))
            pickle.dump((tuple(preload), torch.get_num_threads(), list(sys.path), call), f)
        # A fixed mmap threshold: large blocks are mmapped and returned to the OS when freed (glibc's
        # dynamic threshold would keep them in the heap, hiding a later call's peak behind old pages). Every
        # large temporary then costs fresh pages, so a child that times ``fn`` for a user's process keeps
        # glibc's default (``fixed_mmap_threshold=False``; its peak is then a lower bound).
        env = dict(os.environ)
        if fixed_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
        proc = subprocess.run(
            [sys.executable, "-m", "bench.measure", in_path, out_path],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if not os.path.exists(out_path):
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise RuntimeError(
                f"measurement child process died (exit code {proc.returncode}): {' | '.join(tail)}"
            )
        with open(out_path, "rb") as f:
            status, result, peak_mb, seconds = pickle.load(f)
    if status == "error":
        raise result
    return result, peak_mb, seconds


def gpu_peak_beyond_baseline(
    fn: Callable[..., Any], *args: Any, device: torch.device | str = "cuda", **kwargs: Any
) -> tuple[Any, float, float]:
    """(result, peak MiB allocated beyond what was allocated before, synchronized seconds)."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before
    return result, max(0, peak) / _MB, seconds


def inprocess_peak_rss(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """(result, peak MiB of resident memory beyond the RSS at the start, seconds), in this process (see the
    module docstring for what it can and cannot see). NaN peak where VmHWM cannot be reset."""
    gc.collect()
    _malloc_trim()  # return freed heap first, so the call's allocations raise the RSS
    reset = _reset_peak_rss()
    baseline = _rss_bytes()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = max(0, _hwm_bytes() - baseline) / _MB if reset else float("nan")
    return result, peak, seconds


def _fuse(models, method, example_inputs, options):
    import fusion

    return fusion.fuse(models, method, example_inputs=example_inputs, **options)


def measure_fusion(
    models: list[nn.Module],
    method: str,
    example_inputs: torch.Tensor | None,
    options: dict | None = None,
    *,
    memory: bool | str = True,
) -> FusionMeasurement:
    """Fuse ``models`` with ``fusion.fuse`` and measure it (see the module docstring).

    On the CPU: ``memory=True`` in-process VmHWM, ``"child"`` a fresh child process, ``False`` time only
    (peak_mem_mb is NaN).
    """
    options = dict(options or {})
    device = next(models[0].parameters()).device
    with contextlib.suppress(ImportError):  # imports are not fusion time
        import torch_pruning  # noqa: F401
    if device.type == "cuda":
        fused, peak, seconds = gpu_peak_beyond_baseline(
            _fuse, models, method, example_inputs, options, device=device
        )
        return FusionMeasurement(fused, seconds, peak)
    if not memory:
        start = time.perf_counter()
        fused = _fuse(models, method, example_inputs, options)
        return FusionMeasurement(fused, time.perf_counter() - start, float("nan"))
    if memory is True:
        fused, peak, seconds = inprocess_peak_rss(_fuse, models, method, example_inputs, options)
        return FusionMeasurement(fused, seconds, peak)
    fused, peak, seconds = peak_rss_beyond_baseline(
        _fuse, models, method, example_inputs, options, preload=("fusion", "torch_pruning"), warmup=True
    )
    return FusionMeasurement(fused, seconds, peak)


def macs_and_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example_inputs`` (torch-pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return int(macs), int(params)


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: torch.Tensor, *, repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward pass on ``batch``, synchronized on the GPU."""
    model.eval()
    cuda = batch.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(batch.device)
        start = time.perf_counter()
        model(batch)
        if cuda:
            torch.cuda.synchronize(batch.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


if __name__ == "__main__":  # the measurement child of peak_rss_beyond_baseline
    _child_main(sys.argv[1], sys.argv[2])
