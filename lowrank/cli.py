"""Shared by the Hydra entry points: one-line errors for bad input before any work, run-directory names from
the resolved config, and sweeps that go on past a bad job and exit with the count of jobs that did not finish.
"""
import functools
import os
import sys
from pathlib import Path

from lowrank.errors import ConfigError, fail
from lowrank.rundir import layout as rundir
from lowrank.rundir.layout import NOT_IDENTITY, RunInProgress, config_hash, find_run_dir, format_value, run_dirname

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
NOT_IN_NAME = ("experiment",)  # besides rundir.NOT_IDENTITY: an experiment file's settings are in the hash
MAX_EXIT_CODE = 125            # exit codes above are the shell's own; a count would wrap at 256


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def check_group_overrides(argv: list[str]) -> None:
    """Hydra's own message for `model=nope` spans many lines; give one line naming the valid choices."""
    groups = config_groups()
    for arg in argv:
        if arg.startswith("+experiment="):  # experiment is in the defaults list (null): it is chosen, not added
            fail(f"{arg} is not valid; write {arg[1:]} (no '+')")
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in groups:
            continue
        for choice in value.split(","):  # multirun: model=a,b
            if choice and choice not in group_options(key):
                fail(f"{key}={choice!r} is not a known {key}; choose one of {group_options(key)}")


def compose_first_job(argv: list[str]):
    """The config of the first job the command line asks for (the first choice of each swept group), composed
    without the value overrides (their keys may not exist) and with Hydra's own settings."""
    from hydra import compose, initialize_config_dir
    register_resolvers()
    group_args = [f"{key}={value.split(',')[0]}" for key, _, value in
                  (arg.partition("=") for arg in argv if "=" in arg and not arg.startswith("-"))
                  if key.lstrip("+~") in config_groups()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=group_args)


def check_value_overrides(argv: list[str], cfg=None) -> None:
    """Reject `a.b=value` when `a.b` is not a key of the composed config, in one line naming the valid keys
    (Hydra's own message spans several lines and a stack-trace hint). `+a.b=` adds keys on purpose."""
    from omegaconf import OmegaConf
    groups = config_groups()
    value_keys = [key for key, _, _ in (arg.partition("=") for arg in argv if "=" in arg and not arg.startswith("-"))
                  if key.lstrip("+~") not in groups and not key.startswith(("+", "~", "hydra.", "hydra/")) and key != "hydra"]
    if not value_keys:
        return
    cfg = cfg if cfg is not None else compose_first_job(argv)
    for key in value_keys:
        parts, node, depth = key.split("."), cfg, 0
        while depth < len(parts) - 1 and OmegaConf.is_dict(node) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1  # walk down to the deepest key that exists
        if depth == len(parts) - 1 and OmegaConf.is_dict(node) and parts[-1] in node:
            continue
        prefix = ".".join(parts[:depth])
        if not OmegaConf.is_dict(node):
            fail(f"{key} is not a config key; {prefix} is a value, not a group of keys")
        where = f"under {prefix!r}" if depth else "at the top level"
        fail(f"{key} is not a config key; valid keys {where}: {', '.join(sorted(map(str, node.keys())))}")


def check_locations(argv: list[str], cfg) -> None:
    """check_run_location for every value of a (possibly swept) `name=` or `runs_root=` override."""
    values = {key.lstrip("+"): value.split(",") for key, _, value in (a.partition("=") for a in argv if "=" in a)}
    try:
        for name in values.get("name", [cfg.name]):
            for root in values.get("runs_root", [cfg.runs_root]):
                rundir.check_run_location(name, root)
    except ConfigError as e:
        fail(str(e))


def _run_dirname(*, _root_) -> str:
    """OmegaConf resolver behind `hydra.run.dir` and `hydra.sweep.subdir`: the job's directory name
    (rundir.run_dirname), from its command-line overrides (group choices by name, values as resolved) and
    the hash of its resolved config; an existing directory with that hash is used whatever its label."""
    from omegaconf import OmegaConf
    hydra = _root_.hydra
    config = {k: (OmegaConf.to_container(_root_[k], resolve=True) if OmegaConf.is_config(_root_[k]) else _root_[k])
              for k in _root_ if k != "hydra"}
    digest = config_hash(config)
    existing = find_run_dir(Path(str(_root_.runs_root)) / str(_root_.name), digest)
    if existing is not None:
        return existing.name
    choices = OmegaConf.to_container(hydra.runtime.choices)
    skip = NOT_IDENTITY + NOT_IN_NAME
    label = {}
    for override in hydra.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or any(key == s or key.startswith(s + ".") for s in skip) or key.startswith("hydra"):
            continue
        if key in choices:
            label[key] = str(choices[key])
        else:
            value = OmegaConf.select(_root_, key)
            label[key] = format_value(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return run_dirname(",".join(f"{k}={v}" for k, v in sorted(label.items())), digest)


def _lr_for_dim(step_size, dim):
    """`${lr_for_dim:${method.step_size},${method.dim}}`: step_size / √dim. Adam moves each of θ_d's d numbers by
    about lr a step, and P keeps norms, so each target matrix moves by about lr·√d: this lr holds that move at
    step_size whatever d is. None for a value that is not a positive number (validate names the key)."""
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return step_size / dim ** 0.5 if positive(step_size) and positive(dim) else None


def register_resolvers() -> None:
    from omegaconf import OmegaConf
    OmegaConf.register_new_resolver("run_dirname", _run_dirname, replace=True)
    OmegaConf.register_new_resolver("lr_for_dim", _lr_for_dim, replace=True)


class SweepOutcome:
    """What the jobs of this process ended with, for the sweep's exit code and its last line."""

    def __init__(self):
        self.jobs, self.unfinished = 0, []  # [(job, why)]

    def summary(self) -> str:
        return (f"sweep: {len(self.unfinished)} of {self.jobs} jobs did not finish ("
                + "; ".join(f"{job}: {why}" for job, why in self.unfinished[:5])
                + ("; ..." if len(self.unfinished) > 5 else "") + "); each one's metrics.json says why")


OUTCOME = SweepOutcome()


def _in_multirun() -> tuple[bool, str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized():
        return False, ""
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir).name


def one_line_errors(task):
    """Wrap a Hydra task function. A single run with bad input exits with one line (a traceback only with
    HYDRA_FULL_ERROR=1). In a multirun, a job that is invalid, already running elsewhere, or fails with an
    unexpected error prints one line and the sweep goes on; `run_main` exits with how many did not finish."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        multirun, job = _in_multirun()
        OUTCOME.jobs += 1
        try:
            return task(*args, **kwargs)
        except (ConfigError, RunInProgress) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if not multirun:
                fail(str(e), code=2 if isinstance(e, ConfigError) else 1)
            OUTCOME.unfinished.append((job, "invalid" if isinstance(e, ConfigError) else "running elsewhere"))
            print(f"error: job {job}: {e}", file=sys.stderr)
        except Exception as e:
            if not multirun:
                raise
            OUTCOME.unfinished.append((job, f"failed ({type(e).__name__})"))
            print(f"error: job {job} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  f"(traceback in its train.log)", file=sys.stderr)
        return None
    return wrapped


def run_main(main) -> None:
    """Start a @hydra.main entry point: register the resolvers, check the command line's group choices, keys,
    run name and runs_root (one-line errors before Hydra composes), run, and exit with the number of jobs
    that did not finish (0 when all did)."""
    argv = sys.argv[1:]
    register_resolvers()
    check_group_overrides(argv)
    try:
        cfg = compose_first_job(argv)
    except Exception as e:  # Hydra's composition errors span many lines; the first names the problem
        fail(f"the command line does not compose: {str(e).strip().splitlines()[0]}")
    check_value_overrides(argv, cfg)
    check_locations(argv, cfg)
    main()
    if OUTCOME.unfinished:
        print(OUTCOME.summary(), file=sys.stderr)
        sys.exit(min(len(OUTCOME.unfinished), MAX_EXIT_CODE))
