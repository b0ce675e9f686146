"""Shared by the Hydra entry points: one-line errors for bad input before any work, run-directory names from
the resolved config, and sweeps that go on past a bad job and exit with the count of jobs that did not finish.

The command line is read as Hydra reads it (its argparse options, then its override grammar), so every sweep form
it documents passes the checks: `a=1,2`, choice(), range(), glob(), interval(), sort(), shuffle(), tag(), quoted
values, `[a,b]` lists, `+key=`, `++key=`, `~key`.
"""
import functools
import importlib.util
import os
import sys
from pathlib import Path

from hydra import compose as hydra_compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf

from lowrank.errors import ConfigError, fail
from lowrank.rundir import layout as rundir
from lowrank.rundir.layout import NOT_IDENTITY, RunInProgress, config_hash, find_run_dir, format_value, run_dirname
from lowrank.train.preemption import Preempted, exit_now, under_torchrun

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
NOT_IN_NAME = ("experiment",)  # besides rundir.NOT_IDENTITY: an experiment file's settings are in the hash
MAX_EXIT_CODE = 125            # exit codes above are the shell's own; a count would wrap at 256
PARSER = OverridesParser.create()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def compose(overrides: list[str], hydra_config: bool = False):
    """The config `python -m experiments.train <overrides>` would run with (Hydra's compose API)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def command_line(argv: list[str]) -> tuple[list[str], bool]:
    """(overrides, multirun) of an entry point's arguments, through the argparse parser Hydra's main uses, so an
    option's value (`--cfg job`, `-cn NAME`) is not taken for an override."""
    args = get_args_parser().parse_args(argv)
    return args.overrides, args.multirun


def parse(overrides: list[str]) -> list[Override]:
    """Hydra's parse of the overrides; one that does not parse is one line (Hydra's message, less its
    'Error parsing', caret and see-the-docs lines)."""
    try:
        return PARSER.parse_overrides(list(overrides))
    except OverrideParseException as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip() not in ("", "^")
                  and not line.startswith(("Error parsing override", "See https://"))]
        fail(f"{e.override!r} does not parse (Hydra's override grammar): {'; '.join(reason)}")


def expand(override: Override) -> list[Override]:
    """One override per job that `override` asks for, in the basic sweeper's order (the first job's first):
    each value of a choice or range, each group option a glob matches, and one value inside an interval (only an
    optimizing sweeper draws from it; the checks need one job to compose)."""
    if not override.is_sweep_override():
        return [override]
    key, sweep = override.get_key_element(), override.value()
    if override.is_interval_sweep():
        ints = isinstance(sweep.start, int) and isinstance(sweep.end, int)  # int(interval(1,9)): an integer
        values = [sweep.start + (sweep.end - sweep.start) // 2 if ints else (sweep.start + sweep.end) / 2]
    elif override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        group = override.key_or_group
        if group not in config_groups():
            fail(f"{override.input_line}: glob() picks options of a config group, and {group} is not one; "
                 f"groups: {sorted(config_groups())}")
        values = sweep.filter(group_options(group))
        if not values:
            fail(f"{override.input_line} matches no {group}; choose from {group_options(group)}")
    else:
        try:
            values = list(override.sweep_string_iterator())
        except (ValueError, HydraException) as e:  # range(0,2,0)
            fail(f"{override.input_line} is not a valid sweep: {e}")
    if not values:
        fail(f"{override.input_line} sweeps over no values")
    return parse([f"{key}={value}" for value in values])


def sweep_axes(overrides: list[str], params=None) -> dict[str, list[Override]]:
    """{key: the override of each job}: an experiment's `hydra.sweeper.params`, then the command line, one axis
    per key in its first place with its last values, as hydra's BasicSweeper.split_arguments; the jobs are the
    product of the axes."""
    axes = {}
    for override in parse([f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)):
        axes[override.get_key_element()] = expand(override)
    return axes


def check_sweeps(overrides: list[str], multirun: bool) -> None:
    """Hydra runs a sweep only with -m and never one over its own settings (its messages span lines), and every
    sweep must give at least one job (not `range(2,0)`, nor a glob that matches nothing)."""
    for override in parse(overrides):
        if not override.is_sweep_override():
            continue
        if not multirun:
            fail(f"{override.input_line} is a sweep; add -m to run one job per value (a list is key=[a,b], a "
                 f"string with a comma is quoted: key='a,b')")
        if override.is_hydra_override():
            fail(f"{override.input_line} sweeps over Hydra's own settings, which Hydra does not support")
        expand(override)


def check_group_overrides(overrides: list[str]) -> None:
    """Hydra's own message for `model=nope` spans many lines; give one line naming the valid choices, for every
    value of a sweep."""
    groups = config_groups()
    for override in parse(overrides):
        group = override.key_or_group
        if override.is_add() and group == "experiment":  # in the defaults list (null): chosen, not added
            fail(f"{override.input_line} is not valid; write {override.input_line[1:]} (no '+')")
        if group not in groups:
            continue
        for job in expand(override):
            choice = job.value()
            if choice is not None and choice not in group_options(group):  # `~group` has no value
                fail(f"{group}={choice!r} is not a known {group}; choose one of {group_options(group)}")


def compose_first_job(overrides: list[str], multirun: bool = False):
    """The config of the first job the command line asks for: the first value of each group override, and in a
    multirun also of each group the experiment's `hydra.sweeper.params` sweeps (`method: full,lora`), composed
    without the value overrides (their keys may not exist)."""
    groups = config_groups()

    def first_choices(params=None):
        return [axis[0].input_line for axis in sweep_axes(overrides, params).values() if axis[0].key_or_group in groups]
    if not multirun:
        return compose(first_choices())
    params = compose(first_choices(), hydra_config=True).hydra.sweeper.params
    return compose(first_choices(OmegaConf.to_container(params) if params else None))


def check_value_overrides(overrides: list[str], cfg=None) -> None:
    """Reject `a.b=value` when `a.b` is not a key of the composed config, in one line naming the valid keys
    (Hydra's own message spans several lines and a stack-trace hint). `+a.b=`, `++a.b=` add keys on purpose."""
    groups = config_groups()
    value_keys = [o.key_or_group for o in parse(overrides) if not (o.is_add() or o.is_force_add() or o.is_delete())
                  and o.key_or_group not in groups and not o.is_hydra_override() and o.key_or_group != "hydra"]
    if not value_keys:
        return
    cfg = cfg if cfg is not None else compose_first_job(overrides)
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


def check_locations(overrides: list[str], cfg) -> None:
    """check_run_location for every value of a (possibly swept) `name=` or `runs_root=` override."""
    values = {o.key_or_group: [str(job.value()) for job in expand(o)] for o in parse(overrides)
              if o.key_or_group in ("name", "runs_root") and not o.is_delete()}
    try:
        for name in values.get("name", [cfg.name]):
            for root in values.get("runs_root", [cfg.runs_root]):
                rundir.check_run_location(name, root)
    except ConfigError as e:
        fail(str(e))


def _run_dirname(*, _root_) -> str:
    """OmegaConf resolver behind `hydra.run.dir` and `hydra.sweep.subdir`: the job's directory name
    (rundir.run_dirname), from its command-line overrides (group choices by name, values as resolved, shortened
    by rundir.run_label) and the hash of its resolved config; an existing directory with that hash is used
    whatever its label."""
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
    return run_dirname(label, digest)


def _lr_for_dim(step_size, dim):
    """`${lr_for_dim:${method.step_size},${method.dim}}`: step_size / √dim. Adam moves each of θ_d's d numbers by
    about lr a step, and P keeps norms, so each target matrix moves by about lr·√d: this lr holds that move at
    step_size whatever d is. None for a value that is not a positive number (validate names the key)."""
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return step_size / dim ** 0.5 if positive(step_size) and positive(dim) else None


def register_resolvers() -> None:
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


# conf/hydra/launcher/*.yaml: the Hydra plugin each launcher needs (the `cluster` extra installs both)
LAUNCHER_PLUGINS = {"processes": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
                    "local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")}


def check_launcher(overrides: list[str]) -> None:
    """`hydra/launcher=X` whose plugin is not installed: one line naming what to install (Hydra would say only
    "Could not load 'hydra/launcher/joblib'")."""
    for override in parse(overrides):
        if override.key_or_group != "hydra/launcher":
            continue
        for job in expand(override):
            module, package = LAUNCHER_PLUGINS.get(job.value(), (None, None))
            if module and importlib.util.find_spec(module) is None:
                fail(f"hydra/launcher={job.value()} needs the {package} plugin, which is not installed; "
                     f"pip install -e .[cluster] (or pip install {package})")


def check_command_line(overrides: list[str], multirun: bool):
    """Every check above, in order, before Hydra runs anything: the first job's config, or one `error:` line and
    exit 2."""
    check_group_overrides(overrides)
    check_launcher(overrides)
    check_sweeps(overrides, multirun)
    try:
        cfg = compose_first_job(overrides, multirun)
    except Exception as e:  # Hydra's composition errors span many lines; the first names the problem
        fail(f"the command line does not compose: {str(e).strip().splitlines()[0]}")
    check_value_overrides(overrides, cfg)
    check_locations(overrides, cfg)
    return cfg


def run_main(main) -> None:
    """Start a @hydra.main entry point: register the resolvers, check the command line's group choices, sweeps,
    keys, run name and runs_root (one-line errors before Hydra composes), run, and exit with the number of jobs
    that did not finish (0 when all did)."""
    register_resolvers()
    check_command_line(*command_line(sys.argv[1:]))
    try:
        main()
    except Preempted as e:
        if under_torchrun():
            exit_now(e.code)
        raise
    if OUTCOME.unfinished:
        print(OUTCOME.summary(), file=sys.stderr)
        sys.exit(min(len(OUTCOME.unfinished), MAX_EXIT_CODE))
