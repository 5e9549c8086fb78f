"""``fusebench perf``: fusion time and peak memory of the methods, measured honestly.

Every case runs in fresh child processes (``bench.measure.peak_rss_beyond_baseline``) that receive the
members and take their baseline RSS once they are loaded; the reported memory is the peak RSS beyond that
baseline, i.e. what fusion needs on top of its inputs (CPU; measured in processes of their own, since the
allocator setting that makes RSS peaks honest slows large temporaries down; times come from processes that
allocate as a user's does), or the CUDA allocator's peak beyond what was
allocated before (GPU). "first": the first fusion of an architecture in a process, which includes tracing the
channel groups and the permutation self-check (cached per architecture afterwards), with an empty trace cache
on disk; "cached": the first fusion in a fresh process whose disk cache holds the architecture's verified
trace (``fusion.trace_cache``: what every sweep trial after the first one pays); "median"/"extra": the
median time and the peak memory of ``repeats`` later fusions. "extra/model": warm extra memory in units of one
member's size (the fused model itself is one).

The cases follow the measurements published with the NT reference implementation: two untrained MLPs
3072→W→W→10 (no bias) for W in 512…16384, ensemble sizes 2, 4, 8 at W=4096, and timm resnet18 / vgg11 at
32×32.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

MLP_WIDTHS = (512, 1024, 2048, 4096, 8192, 16384)
OT_MAX_WIDTH = 4096


@dataclass
class Case:
    label: str
    arch: str  # "mlp" or a timm name
    width: int
    n: int
    method: str


def build_members(arch: str, width: int, n: int, device: str) -> tuple[list[nn.Module], torch.Tensor]:
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        if arch == "mlp":
            m = nn.Sequential(
                nn.Linear(3072, width, bias=False),
                nn.ReLU(),
                nn.Linear(width, width, bias=False),
                nn.ReLU(),
                nn.Linear(width, 10, bias=False),
            )
        else:
            import timm

            m = timm.create_model(arch, num_classes=10)
        members.append(m.eval().to(device))
    x = torch.randn(2, 3072) if arch == "mlp" else torch.randn(2, 3, 32, 32)
    return members, x.to(device)


def method_data(method: str, example: torch.Tensor, samples: int = 256) -> torch.Tensor | None:
    """A fixed batch of inputs for the methods that observe activations (``data=``), else None."""
    import fusion

    if "data" not in fusion.method_options(method):
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randn(samples, *example.shape[1:], generator=g).to(example.device)


def _fuse_repeatedly(members, method, example, repeats, data=None):
    """Runs in the measured process: fuse ``repeats`` times, return the wall times (synchronized)."""
    import fusion

    cuda = example.is_cuda
    options = {} if data is None else {"data": data}
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fused = fusion.fuse(members, method, example_inputs=example, **options)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del fused
    return times


def run_case(case: Case, device: str, repeats: int) -> dict:
    """Fresh processes per case (on the CPU; see ``_measure``): *cold* ones (the first fusion of the
    architecture, which traces the channel groups and runs the permutation self-check; the disk's trace cache
    is empty), *warm* ones (traced once, unmeasured, then ``repeats`` fusions; time is their median, memory
    their peak) and a *cached* one (a first fusion that finds the verified trace the cold one stored)."""
    members, x = build_members(case.arch, case.width, case.n, device)
    data = method_data(case.method, x)
    with tempfile.TemporaryDirectory(prefix="fusebench-perf-traces-") as traces:
        with _trace_cache(traces):
            first = _measure(members, case.method, x, data, device, repeats)
            cached, _, _, _ = _measure(members, case.method, x, data, device, 1, cold_only=True)
    cold, cold_mb, warm, warm_mb = first
    model_mb = sum(p.numel() * p.element_size() for p in members[0].parameters()) / 2**20
    return {
        "case": case.label,
        "method": case.method,
        "N": case.n,
        "first_s": cold[0],
        "cached_s": cached[0],
        "median_s": statistics.median(warm),
        "first_extra_mb": cold_mb,
        "peak_extra_mb": warm_mb,
        "model_mb": model_mb,
        "extra_per_model": warm_mb / model_mb if model_mb else float("nan"),
    }


def _in_fresh_cache(fn, *args, **kwargs):
    """``fn`` with an empty trace cache of its own (a cold first call), the current one restored after."""
    with tempfile.TemporaryDirectory(prefix="fusebench-perf-traces-") as folder, _trace_cache(folder):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def _trace_cache(folder: str):
    """The measured processes (children: they inherit the environment) keep verified traces in ``folder``."""
    from fusion.trace_cache import ENV

    before = os.environ.get(ENV)
    os.environ[ENV] = folder
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _measure(members, method, x, data, device, repeats, cold_only=False):
    """(first-call times, its extra MB, warm times, their extra MB), each from a fresh process."""
    from bench.measure import gpu_peak_beyond_baseline, peak_rss_beyond_baseline

    if device.startswith("cuda"):  # in this process: its in-memory trace cache is emptied to start cold
        from fusion import trace

        trace._CACHE.clear()
        cold, cold_mb, _ = gpu_peak_beyond_baseline(
            _fuse_repeatedly, members, method, x, 1, data, device=device
        )
        if cold_only:
            return cold, cold_mb, None, None
        _fuse_repeatedly(members, method, x, 1, data)
        warm, warm_mb, _ = gpu_peak_beyond_baseline(
            _fuse_repeatedly, members, method, x, repeats, data, device=device
        )
        trace._CACHE.clear()
    else:
        # time and memory from separate fresh processes: the memory child fixes glibc's mmap threshold (see
        # bench.measure), which costs fresh pages for every large temporary; timing children allocate as a
        # user's process does
        preload = ("fusion", "torch_pruning", "ot")
        run = (_fuse_repeatedly, members, method, x)
        cold, _, _ = peak_rss_beyond_baseline(*run, 1, data, preload=preload, fixed_mmap_threshold=False)
        if cold_only:
            return cold, None, None, None
        _, cold_mb, _ = _in_fresh_cache(peak_rss_beyond_baseline, *run, 1, data, preload=preload)
        warm, _, _ = peak_rss_beyond_baseline(
            *run, repeats, data, preload=preload, warmup=True, fixed_mmap_threshold=False
        )
        _, warm_mb, _ = peak_rss_beyond_baseline(*run, repeats, data, preload=preload, warmup=True)
    return cold, cold_mb, warm, warm_mb


def default_cases(methods: list[str], widths, quick: bool) -> list[Case]:
    cases = []
    for w in widths:
        for m in methods:
            if m == "ot" and w > OT_MAX_WIDTH:
                continue
            cases.append(Case(f"mlp W={w}", "mlp", w, 2, m))
    if not quick:
        for n in (4, 8):
            for m in methods:
                if m != "ot":
                    cases.append(Case("mlp W=4096", "mlp", 4096, n, m))
        for arch in ("resnet18", "vgg11"):
            for m in methods:
                if m == "ot" and arch == "vgg11":
                    continue
                cases.append(Case(arch, arch, 0, 2, m))
        for m in methods:  # many members: MergeMany / OT to an anchor / NT over 16 models
            cases.append(Case("resnet18", "resnet18", 0, 16, m))
    return cases


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'case':<14}{'method':<20}{'N':>3}{'first s':>10}{'cached s':>10}{'median s':>10}{'first MB':>10}"
        f"{'extra MB':>10}"
        f"{'model MB':>10}{'extra/model':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<14}{r['method']:<20}{r['N']:>3}{r['first_s']:>10.3f}{r['cached_s']:>10.3f}{r['median_s']:>10.3f}"
            f"{r['first_extra_mb']:>10.1f}{r['peak_extra_mb']:>10.1f}{r['model_mb']:>10.1f}{r['extra_per_model']:>12.2f}"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods", default="avg,nt", help="comma-separated fusion methods (default avg,nt; add ot)"
    )
    parser.add_argument("--widths", default=",".join(map(str, MLP_WIDTHS)), help="MLP widths W")
    parser.add_argument(
        "--repeats", type=int, default=5, help="fusions per case (median of all but the first)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument(
        "--quick", action="store_true", help="MLP widths only (no ensemble sizes, no timm models)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--case",
        action="append",
        default=None,
        metavar="GLOB",
        help="only the cases whose '<case> N=<n>' matches, e.g. 'mlp W=4096 N=2' or 'resnet18 N=*' (repeatable)",
    )
    parser.add_argument("-o", "--output", default=None, help="also write the rows as CSV here")


def main(args) -> int:
    import fusion
    from bench.errors import FusebenchError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in fusion.available_methods()]
    if unknown:
        raise FusebenchError(f"perf: unknown method(s) {unknown}; available: {fusion.available_methods()}")
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError as exc:
        raise FusebenchError(f"perf: --widths must be integers separated by commas ({exc})") from exc
    if args.repeats < 1:
        raise FusebenchError("perf: --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise FusebenchError("perf: --device cuda requested but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"fusebench perf on {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats per case",
        flush=True,
    )
    cases = default_cases(methods, widths, args.quick)
    if args.case:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(f"{c.label} N={c.n}", g) for g in args.case)]
        if not cases:
            raise FusebenchError(f"perf: no case matches {args.case} (cases look like 'mlp W=4096 N=2')")
    rows = []
    for case in cases:
        try:
            rows.append(run_case(case, args.device, args.repeats))
        except (MemoryError, RuntimeError) as exc:  # out of memory is a result, not a crash
            print(f"{case.label} {case.method} N={case.n}: failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        r = rows[-1]
        print(
            f"{r['case']} {r['method']} N={r['N']}: first {r['first_s']:.3f}s / {r['first_extra_mb']:.0f} MB, "
            f"first with the trace cached {r['cached_s']:.3f}s, "
            f"median {r['median_s']:.3f}s / {r['peak_extra_mb']:.0f} MB ({r['extra_per_model']:.2f} x one model)",
            flush=True,
        )
    print()
    print(format_table(rows))
    if args.output:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.output, index=False)
        print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m bench.perf")
    configure(parser)
    sys.exit(main(parser.parse_args()))
