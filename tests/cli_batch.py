"""`python -m tests.cli_batch SPEC.json`: run several command lines, each as `python -m MODULE ARGS` (or
`python -c CODE`) started in its own working directory would run, without paying the imports (torch,
transformers, hydra: seconds) once per command line. Tests call `run_cli_batch`, as they would call run_cli.

This process imports what the entry points import at their top level (their own import statements, read with
`ast`: the same modules in the same order), and any `preload` modules (those an entry point imports later, inside
a function, when that costs seconds each time), then forks once per command line. The child changes to its
working directory, points its stdout and stderr at files of its own, and runs the module as `__main__` with
`runpy` (as `python -m` does: its `if __name__ == "__main__"` block, sys.argv, sys.path[0] its working
directory), or the code in a fresh `__main__`; it ends as the interpreter would (exit_as_python: exit status,
traceback of an uncaught exception, threads joined, atexit functions, streams flushed). Each command line's
output starts with what the imports printed, as a fresh interpreter's would.

Every command line has a process of its own, so Hydra's global state, the warnings already shown, logging,
signal handlers and the working directory never carry from one to the next. Up to one per CPU (at most MAX_JOBS)
run side by side: the command lines of one batch must not write the same files.

SPEC: {"argvs": [["-m", "experiments.train", "a=b"], ["-c", "print(1)"], ...], "cwds": [...],
       "preload": ["torch._dynamo"] or null, "out": "RESULTS.json"}
RESULTS: {"threads": the threads alive when forking (1, or the fork would lack some), "jobs": N,
          "preload_seconds": s, "preloaded": [sys.modules when forking],
          "results": [{"returncode", "stdout", "stderr", "seconds"}, ...]}
"""
import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

MAX_JOBS = 4  # command lines run side by side, at most one per CPU this process may use


def import_statements(module: str):
    """The top-level import statements of MODULE's source, compiled to run in a namespace of that module's
    package (so relative imports resolve as they do in it)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    return compile(ast.Module(body=body, type_ignores=[]), spec.origin, "exec"), package


def preload(modules: list[str], also: list[str]) -> None:
    for module in modules:
        code, package = import_statements(module)
        exec(code, {"__name__": f"{module}:preload", "__package__": package, "__builtins__": __builtins__})
    for name in also:
        importlib.import_module(name)


def run_in_child(argv: list[str], cwd: str, out: Path, err: Path) -> None:
    """In the forked child: become `python ARGV` started in CWD. Returns (or raises) only into the interpreter's
    own exit: the caller lets a SystemExit or any exception end the process as a fresh interpreter's would."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    kind, what, *rest = argv
    if kind == "-m":
        sys.argv = [what, *rest]
        sys.path[0] = os.getcwd()  # as `python -m` from CWD
        # Another entry point of the batch may have imported this one (experiments.demo imports analysis.report):
        # as in a fresh interpreter, the module runs as __main__ without being found imported already (runpy warns).
        sys.modules.pop(what, None)
        import runpy
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    elif kind == "-c":
        sys.argv = ["-c", *rest]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        exec(compile(what, "<string>", "exec"), main.__dict__)
    else:
        raise SystemExit(f"cli_batch: {kind!r}: only -m MODULE or -c CODE")


def exit_as_python(error: BaseException | None) -> None:
    """End the child as the interpreter ends a program that finished (ERROR None) or raised ERROR: a SystemExit's
    code (None: 0; an int; else printed, 1), any other exception's traceback on stderr and 1; then what
    Py_FinalizeEx runs before tearing the modules down: wait for threads, the atexit functions, flush stdout and
    stderr. The teardown itself is skipped (seconds of freeing torch's objects, in a fork copy-on-write pages too):
    what only it could print is seen by the fresh-interpreter tests each entry point keeps."""
    code = 0
    if isinstance(error, SystemExit):
        code = error.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    elif error is not None:
        sys.excepthook(type(error), error, error.__traceback__)
        code = 1
    try:
        threading._shutdown()
        import atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


def reap(running: dict, results: list, scratch: Path, first_out: str, first_err: str) -> None:
    """Wait for one child to end and record its exit status and output."""
    pid, status = os.wait()
    i, start = running.pop(pid)
    results[i] = {"returncode": os.waitstatus_to_exitcode(status),
                  "stdout": first_out + (scratch / f"{i}.out").read_text(),
                  "stderr": first_err + (scratch / f"{i}.err").read_text(), "seconds": time.monotonic() - start}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    argvs, cwds = spec["argvs"], spec["cwds"]
    modules = sorted({a[1] for a in argvs if a[0] == "-m"})
    scratch = Path(tempfile.mkdtemp(prefix="cli_batch-"))
    # what the imports print: a fresh interpreter prints it first, so every command line's output starts with it
    t0 = time.monotonic()
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for fd, name in ((1, "preload.out"), (2, "preload.err")):
        target = os.open(scratch / name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(target, fd)
        os.close(target)
    try:
        preload(modules, spec.get("preload") or [])
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    preload_seconds = time.monotonic() - t0
    threads = threading.active_count()  # a fork copies only the calling thread: the caller asks for 1
    preloaded = sorted(sys.modules)
    first_out, first_err = (scratch / "preload.out").read_text(), (scratch / "preload.err").read_text()
    jobs = max(1, min(len(os.sched_getaffinity(0)), MAX_JOBS))
    running, results = {}, [None] * len(argvs)  # pid -> (index, start)
    for i, (argv, cwd) in enumerate(zip(argvs, cwds, strict=True)):
        while len(running) >= jobs:
            reap(running, results, scratch, first_out, first_err)
        sys.stdout.flush(), sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: it ends in exit_as_python, never back in this loop
            try:
                run_in_child(argv, cwd, scratch / f"{i}.out", scratch / f"{i}.err")
            except BaseException as e:
                exit_as_python(e)
            exit_as_python(None)
        running[pid] = (i, start)
    while running:
        reap(running, results, scratch, first_out, first_err)
    Path(spec["out"]).write_text(json.dumps({"threads": threads, "jobs": jobs, "preload_seconds": preload_seconds,
                                             "preloaded": preloaded, "results": results}))
    for p in scratch.iterdir():
        p.unlink()
    scratch.rmdir()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # this process's own teardown would only cost seconds


def run_cli_batch(argvs: list[list[str]], cwds: list, env_extra: dict | None = None, timeout: int = 600,
                  preload: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """What `run_cli(argv, cwd)` would return for each pair (exit status, stdout, stderr), from one
    `python -m tests.cli_batch` (see the module's docstring) under run_cli's environment plus ENV_EXTRA."""
    from tests.conftest import ROOT, run_cli
    assert len(argvs) == len(cwds)
    with tempfile.TemporaryDirectory(prefix="cli_batch-spec-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "results.json"
        spec.write_text(json.dumps({"argvs": [list(map(str, a)) for a in argvs], "cwds": [str(c) for c in cwds],
                                    "preload": preload, "out": str(out)}))
        res = run_cli(["-m", "tests.cli_batch", str(spec)], cwd=ROOT, env_extra=env_extra, timeout=timeout)
        assert res.returncode == 0 and not res.stdout and not res.stderr, (res.returncode, res.stderr[-3000:])
        data = json.loads(out.read_text())
    assert data["threads"] == 1, "the imports started a thread; a forked child would not have it"
    results = [subprocess.CompletedProcess([sys.executable, *a], r["returncode"], r["stdout"], r["stderr"])
               for a, r in zip(argvs, data["results"], strict=True)]
    for r in results:
        r.preloaded = data["preloaded"]  # sys.modules before the fork: what every command line found imported
    return results


if __name__ == "__main__":
    main()
