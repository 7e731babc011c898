"""The worker side of the protocol (harness/worker.py is the harness side). Standard library only, so it runs
in any env; torch is touched only by the torchvision shim.

Protocol, one JSON object per line:
  worker -> harness, once, when its imports are done:  {"ready": true, "worker": NAME, "versions": {...}}
  harness -> worker:  {"id": N, "op": OP, "args": {...}}       worker -> harness:  {"id": N, "ok": true, "result": ...}
                                                           or {"id": N, "ok": false, "error": "one line"}
  harness -> worker:  {"op": "exit"} (or end of input): the worker exits.
The worker's real stdout is kept for the protocol alone: file descriptor 1 is pointed at stderr before anything
else runs, so whatever the official code prints (modelscope and ImageReward print) lands in the worker's log.

A worker script run as `SCRIPT --probe` does its imports and exits 0 (`harness env build` checks an env so).
"""
import importlib
import importlib.util
import json
import os
import sys
import traceback

_PROTOCOL = None


def torchvision_shim():
    """PyPI torchvision beside the CPU-only torch wheel (../shared/docs/dependencies.md, tv_compat): its _C.so
    links CUDA libraries and cannot load, so define the two schemas it registers fake kernels for. A no-op where
    the native ops load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    import torch
    folder = list(spec.submodule_search_locations)[0]
    for name in ("_C_stable.so", "_C.so"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                torch.ops.load_library(path)
                return "native"
            except (OSError, RuntimeError):
                pass
    try:
        torch.ops.torchvision.nms
        return "defined"
    except (AttributeError, RuntimeError):
        pass
    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return "shimmed"


def take_stdout():
    """Keep the real stdout for the protocol; everything printed afterwards goes to stderr."""
    global _PROTOCOL
    if _PROTOCOL is None:
        sys.stdout.flush()
        _PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    return _PROTOCOL


def send(message):
    out = take_stdout()
    out.write(json.dumps(message, allow_nan=True) + "\n")
    out.flush()


def one_line(e):
    text = "; ".join(line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip())
    return text[:600]


def serve(name, handlers, versions=None):
    """Answer requests until {"op": "exit"} or the end of stdin. A handler's exception is answered as an error
    (its traceback goes to stderr); the worker keeps serving."""
    send({"ready": True, "worker": name, "versions": versions or {}})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError as e:
            send({"id": None, "ok": False, "error": f"request is not JSON: {e}"})
            continue
        op, rid = message.get("op"), message.get("id")
        if op == "exit":
            break
        if op not in handlers:
            send({"id": rid, "ok": False, "error": f"unknown op {op!r}; this worker knows {sorted(handlers)}"})
            continue
        try:
            result = handlers[op](**(message.get("args") or {}))
        except Exception as e:  # noqa: BLE001 - every failure is answered, the traceback logged
            traceback.print_exc(file=sys.stderr)
            send({"id": rid, "ok": False, "error": one_line(e)})
            continue
        send({"id": rid, "ok": True, "result": result})


def versions(*distributions):
    from importlib import metadata
    out = {}
    for d in distributions:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def main(name, handlers, versions_of=()):
    """A worker script's entry point: `SCRIPT [--probe] [THREADS]`."""
    args = sys.argv[1:]
    if "--probe" in args:
        print(f"ok: {name}'s imports pass; " + ", ".join(f"{k} {v}" for k, v in versions(*versions_of).items()))
        return
    if args and args[0].isdigit():
        import torch
        torch.set_num_threads(int(args[0]))
    serve(name, handlers, versions(*versions_of))
