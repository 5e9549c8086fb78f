"""``fusebench zoo``: which timm models fusebench fuses, which it refuses and why -- measured, not claimed.

For every timm model up to a parameter budget (counted on the meta device, no weights) the walk runs,
in a worker process with a time limit per model:

0. the model itself on the walk's input; a model that does not run at that size is walked at the input size
   of its own pretrained config (recorded as ``input``), and "skipped" if it does not run there either;
1. torch-pruning's dependency graph on the model, as fusion builds it (if it cannot be built: "not traceable");
2. ``fusion.channel_groups`` with its permutation self-check (a refusal: ``FusionError``, its reason);
3. NT at sparsity 0 against the output-averaging ensemble of two random members -- only for models whose
   concatenation is their ensemble: not with normalization across channels (LayerNorm / GroupNorm /
   weight-standardized convolutions), tensors shared by all channels (averaged across members) or products
   summing over channels outside a recognised attention (a single-head attention's q @ k), or pinned channels
   (mixed with each other, e.g. by ECA: averaged, not concatenated), which make the concatenation differ
   from the ensemble by design (see the README); it must agree to a relative error below 1e-3. Where it
   differs by design, NT at sparsity 0 of two copies of one member must give that member instead. A model
   whose own attributes fix some channel counts (split sizes) cannot be widened: the fused model at
   sparsity 0 does not run, and the model is recorded as fused at the members' width only;
4. default NT and averaging: the fused state loads strictly into a fresh model and that model runs.

Any other exception is a fusebench bug and is recorded as an ``error`` with its type. Results are appended
to a JSONL file as they come (a re-run skips the models already there), and the support table
``docs/architectures.md`` is generated from it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

INPUT_SIZE = 64
NUM_CLASSES = 5
STATUSES = ("fused", "refused", "not traceable", "wrong", "error", "skipped")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="docs/architectures.jsonl", help="JSONL results (resumable)")
    parser.add_argument("--table", default="docs/architectures.md", help="the generated support table")
    parser.add_argument("--filter", default="*", help="glob on timm model names, e.g. 'resnet*'")
    parser.add_argument("--max-params", type=float, default=30.0, help="parameter budget in millions")
    parser.add_argument("--limit", type=int, default=None, help="walk at most this many models")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--models", nargs="*", default=None, help="exact model names instead of a walk")


# ----------------------------------------------------------------------------- one model
def _create(name: str, device: str = "cpu", size: int = INPUT_SIZE):
    import timm
    import torch

    kwargs = {"pretrained": False, "num_classes": NUM_CLASSES}
    with torch.device(device):
        try:
            return timm.create_model(name, img_size=size, **kwargs)
        except TypeError:
            return timm.create_model(name, **kwargs)


def _native_size(model) -> int | None:
    """The input size the model was made for (its pretrained config), if it is square and known."""
    shape = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(shape[-1]) if shape and len(shape) == 3 and shape[1] == shape[2] else None


def count_params(name: str) -> int | None:
    """Parameters of ``name`` (meta device: no memory, no init cost); None if it cannot be built."""
    try:
        return sum(p.numel() for p in _create(name, "meta").parameters())
    except Exception:  # noqa: BLE001 - a model timm cannot build here is skipped, with the reason
        return None


def _cross_channel_norm(model) -> str | None:
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "LayerNorm" in type(m).__name__:
            return type(m).__name__
    return None


def _weight_standardized(model) -> str | None:
    """A convolution that standardizes each filter over its input channels (NF-nets' StdConv): in a
    concatenation the statistics take in the other members' zeros, so not even two copies of one member give
    that member."""
    for m in model.modules():
        if "StdConv" in type(m).__name__:
            return type(m).__name__
    return None


def _averaged_tensors(graph, model) -> list[str]:
    """Float tensors no channel group holds, outside the output layers (whose bias averages exactly into the
    output average): one value shared by all channels (HGNetV2's learnable affine scalars), averaged across
    members by fusion, so the concatenation is not the ensemble (as with a LayerNorm)."""
    from fusion.state import full_state

    outputs = tuple(f"{name}." for name in graph.output_layers)
    return [
        name
        for name, t in full_state(model).items()
        if t.is_floating_point() and name not in graph.tensor_dims and not name.startswith(outputs)
    ]


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _ensemble_err(wide, members, x) -> float:
    """NT at sparsity 0 against the output ensemble, in float64 where the model runs in it: a deep random
    member's float32 output can be mostly rounding (efficientnetv2_s: 49 % off its float64 value), which
    would read as a wrong fusion."""
    import copy

    import torch

    import fusion

    try:
        wide64, members64 = copy.deepcopy(wide).double(), [copy.deepcopy(m).double() for m in members]
        out = wide64(x.double())
        if out.dtype == torch.float64:
            return _rel_err(out, fusion.ensemble(members64)(x.double()))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 is compared in its own precision
        pass
    return _rel_err(wide(x), fusion.ensemble(members)(x))


def _members(name: str, size: int) -> list:
    """Two random members at ``size`` px, with distinct, non-trivial normalization statistics, and no all-zero
    parameter (``fusion.trace.live_parameters``): a fresh timm ResNet's zero-initialised last BatchNorm scale
    switches its residual branches off, which would make the ensemble oracle blind to them."""
    import torch

    from fusion.state import full_state
    from fusion.verify import live_parameters

    torch.manual_seed(0)
    members = [_create(name, size=size).eval() for _ in range(2)]
    with torch.no_grad():
        for seed, m in enumerate(members):
            gen = torch.Generator().manual_seed(seed)
            for mod in m.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
                    mod.running_mean.normal_(0, 0.1, generator=gen)
                    mod.running_var.uniform_(0.5, 1.5, generator=gen)
            state = full_state(m)
            live = live_parameters(m, state, gen)
            for pname, p in m.named_parameters():
                if live[pname] is not state[pname]:
                    p.copy_(live[pname])
    return members


def _run_once(members, x) -> None:
    """Every member runs once, as trained members have: a model may size buffers at its first forward (ConViT's
    GPSA computes its relative indices for the input's grid), and members must agree."""
    import torch

    with torch.no_grad():
        for m in members:
            m(x)


def check_model(name: str) -> dict:
    """The walk's checks on one model (see the module docstring): a JSON-able result."""
    import torch

    import fusion

    result: dict = {"model": name}
    size = INPUT_SIZE
    try:
        members = _members(name, size)
    except Exception as exc:  # noqa: BLE001
        return {
            **result,
            "status": "skipped",
            "reason": f"timm cannot build it at {INPUT_SIZE}px: {exc}"[:300],
        }
    x = torch.randn(2, 3, size, size)
    try:
        _run_once(members, x)
    except Exception as exc:  # noqa: BLE001 - the model itself, not fusion: try the size it was made for
        native = _native_size(members[0])
        reason = f"the model does not run at {size}px: {type(exc).__name__}: {exc}"
        if native is None or native == size:
            return {**result, "status": "skipped", "reason": reason[:300]}
        size = result["input"] = native
        try:
            members = _members(name, size)
            x = torch.randn(2, 3, size, size)
            _run_once(members, x)
        except Exception as exc2:  # noqa: BLE001
            reason += f"; nor at its own {size}px: {type(exc2).__name__}: {exc2}"
            return {**result, "status": "skipped", "reason": reason[:300]}
    result["params"] = sum(p.numel() for p in members[0].parameters())
    try:
        t = time.perf_counter()
        try:
            graph = fusion.channel_groups(members[0], x)
        except fusion.FusionError as exc:
            # fusion builds torch-pruning's graph itself (tolerating its index-mapping failures node by node);
            # when even that fails, the model is not traceable rather than refused
            if str(exc).startswith(f"cannot trace {type(members[0]).__name__} with torch-pruning"):
                return {**result, "status": "not traceable", "reason": str(exc).split(": ", 1)[1][:300]}
            raise
        result["trace_s"] = round(time.perf_counter() - t, 3)
        result["groups"] = len(graph.groups)
        if graph.pinned:
            result["pinned"] = len(graph.pinned)
        norm, standardized = _cross_channel_norm(members[0]), _weight_standardized(members[0])
        shared = _averaged_tensors(graph, members[0])
        contracted = getattr(graph, "contracted_channels", None)
        with torch.no_grad():
            # the oracle: NT at sparsity 0 is the ensemble of the members; where the concatenation differs from
            # the ensemble by design, it is still the member itself when both members are one model (a norm's
            # statistics and an averaged shared tensor are the member's); not even that for a product over
            # channels (the member's q @ k summed twice) or a weight standardized over all members' inputs
            twins, skip = None, None
            if standardized is not None:
                skip = f"{standardized} standardizes each filter over the input channels of all members"
            elif graph.pinned:
                twins = f"{len(graph.pinned)} channel sets are pinned (kept in place and averaged): {graph.pinned[0]}"
            elif norm is not None:
                twins = f"{norm} normalizes across channels"
            elif shared:
                twins = f"{len(shared)} tensors shared by all channels are averaged across members (e.g. {shared[0]!r})"
            if contracted:
                skip = f"a product sums over the channels of all members ({contracted})"
            if skip:
                result["ensemble_check"] = f"skipped: {skip}"[:300]
            else:
                pair = members if twins is None else [members[0], members[0]]
                try:
                    wide = fusion.fuse(pair, "nt", example_inputs=x, sparsity=0.0)
                except fusion.FusionError as exc:
                    if "the fused model does not run" not in str(exc):
                        raise
                    # channel counts fixed by the model's own attributes (split sizes of CSP, FasterNet, DPN):
                    # the members' width fuses, a wider model cannot exist; the default checks below still run
                    wide = None
                    result["width"] = "members' only"
                    result["ensemble_check"] = f"not possible, NT cannot widen it: {str(exc)[:200]}"
                if wide is not None:
                    err = _ensemble_err(wide, pair, x)
                    if twins is None:
                        result["ensemble_rel_err"] = err
                        wrong = f"NT at sparsity 0 is not the ensemble ({err:.2e})"
                    else:
                        result["twin_rel_err"] = err
                        result["ensemble_check"] = (
                            f"against the member itself (NT at sparsity 0 of two copies of it): {twins}"
                        )
                        wrong = f"NT at sparsity 0 of two copies of one member is not that member ({err:.2e})"
                    if not err < 1e-3:
                        return {**result, "status": "wrong", "reason": wrong}
            for method in ("nt", "avg"):
                fused = fusion.fuse(members, method, example_inputs=x)
                fresh = _create(name, size=size).eval()
                fresh.load_state_dict(fused.state_dict(), strict=True)
                fresh(x)
    except fusion.FusionError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            raise exc.__cause__ from None  # the time limit, not a refusal
        return {**result, "status": "refused", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # noqa: BLE001 - anything else is a fusebench bug: recorded, not hidden
        return {**result, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    return {**result, "status": "fused"}


def _worker(names: list[str], results: Path, timeout: float) -> None:
    """Runs in a child process: check each model, append its line (a too-slow model is recorded)."""
    import fcntl

    import torch

    torch.set_num_threads(1)

    def alarm(_sig, _frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    for name in names:
        start = time.perf_counter()
        signal.alarm(int(max(1, timeout)))
        try:
            res = check_model(name)
        except TimeoutError:
            res = {"model": name, "status": "skipped", "reason": f"over the {timeout:.0f} s limit"}
        finally:
            signal.alarm(0)
        res["seconds"] = round(time.perf_counter() - start, 2)
        with open(results, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.write(json.dumps(res) + "\n")
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        print(f"[zoo] {name}: {res['status']} {res.get('reason', '')[:100]}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the walk
def candidates(pattern: str, max_params_m: float) -> list[tuple[str, int | None]]:
    import timm

    out = []
    for name in timm.list_models(pattern):
        n = count_params(name)
        if n is None or n <= max_params_m * 1e6:
            out.append((name, n))
    return out


def load_results(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["model"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a killed worker: that model is walked again
    return done


def walk(names: list[str], results: Path, workers: int, timeout: float) -> None:
    """Check ``names`` in ``workers`` child processes (round-robin), appending to ``results``."""
    results.parent.mkdir(parents=True, exist_ok=True)
    chunks = [names[i::workers] for i in range(workers)]
    procs = []
    for chunk in chunks:
        if not chunk:
            continue
        code = f"from bench.zoo import _worker; from pathlib import Path; _worker({chunk!r}, Path({str(results)!r}), {timeout})"
        procs.append(
            # every model is traced and self-checked afresh: the walk measures the tracer, not its disk cache
            subprocess.Popen(
                [sys.executable, "-c", code],
                env={**os.environ, "OMP_NUM_THREADS": "1", "FUSION_TRACE_CACHE": "off"},
            )
        )
    for p in procs:
        p.wait()


def write_table(rows: dict[str, dict], path: Path) -> str:
    counts = Counter(r["status"] for r in rows.values())
    reasons = Counter(
        (r["status"], _reason_class(r.get("reason", ""))) for r in rows.values() if r["status"] != "fused"
    )
    traceable = len(rows) - counts["not traceable"] - counts["skipped"]
    fixed = sum(1 for r in rows.values() if r["status"] == "fused" and r.get("width"))
    pinned = sum(1 for r in rows.values() if r["status"] == "fused" and r.get("pinned"))
    lines = [
        "# Architecture support (generated by `fusebench zoo`)",
        "",
        f"timm models walked: {len(rows)} (input {INPUT_SIZE}x{INPUT_SIZE}, {NUM_CLASSES} classes, two random members; "
        f"{sum(1 for r in rows.values() if r.get('input'))} models that do not run at {INPUT_SIZE}px at the input "
        "size of their own pretrained config, marked below).",
        "",
        "| status | models |",
        "|---|---|",
        *(f"| {s} | {counts[s]} |" for s in STATUSES if counts[s]),
        "",
        f"Of the {traceable} models torch-pruning builds a dependency graph for, {counts['fused']} fuse "
        f"({100 * counts['fused'] / max(traceable, 1):.1f} %; {fixed} of them only at the members' width: their "
        f"own attributes fix some channel counts, so NT cannot widen them; {pinned} with some channels pinned: "
        "mixed with each other across the channel axis, they are kept in place and averaged), "
        f"{counts['refused']} are refused with a named reason"
        f", {counts['wrong']} gave a wrong model and {counts['error']} hit an unexpected error.",
        "",
        "## Reasons",
        "",
        "| status | reason | models |",
        "|---|---|---|",
        *(f"| {s} | {why} | {n} |" for (s, why), n in reasons.most_common()),
        "",
        "## Models",
        "",
        "| model | params (M) | status | reason |",
        "|---|---|---|---|",
    ]
    for name in sorted(rows):
        r = rows[name]
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "—"
        why = (r.get("reason") or r.get("ensemble_check") or "").replace("|", "\\|")
        status = f"{r['status']} (at {r['input']}px)" if r.get("input") else r["status"]
        if r.get("pinned"):
            status += f", {r['pinned']} channel sets pinned"
        lines.append(f"| {name} | {params} | {status} | {why} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _reason_class(reason: str) -> str:
    """The reason without model-specific names (module paths, numbers), to count refusal classes."""
    import re

    text = re.sub(
        r"'[^']*'",
        "'…'",
        reason.split(":", 2)[0] if reason.startswith(("TypeError", "RuntimeError")) else reason,
    )
    text = re.sub(r"\d+", "N", text)
    return text[:120].replace("|", "\\|")


def main(args: argparse.Namespace) -> int:
    from bench.errors import FusebenchError

    if args.workers < 1:
        raise FusebenchError(f"--workers must be >= 1, got {args.workers}")
    results, table = Path(args.results), Path(args.table)
    if args.models:
        names = list(args.models)
    else:
        names = [n for n, _ in candidates(args.filter, args.max_params)]
    names = [n for n in names if fnmatch.fnmatch(n, args.filter)]
    done = load_results(results)
    todo = [n for n in names if n not in done]
    if args.limit is not None:
        todo = todo[: max(0, args.limit - len([n for n in names if n in done]))]
    print(
        f"zoo: {len(names)} models, {len(names) - len(todo)} already in {results}, walking {len(todo)}",
        file=sys.stderr,
    )
    walk(todo, results, args.workers, args.timeout)
    rows = {k: v for k, v in load_results(results).items() if k in set(names) or not args.models}
    text = write_table(rows, table)
    print("\n".join(text.splitlines()[:14]))
    print(f"table written to {table}")
    return 0
