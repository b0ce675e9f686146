"""Shared by the Hydra entry points: check config-group choices up front, and turn ConfigError into one line."""
import functools
import hashlib
import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """Hydra's own message for `model=nope` spans many lines; give one line naming the valid choices."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in groups:
            continue
        for choice in value.split(","):  # multirun: model=a,b
            if choice and choice not in group_options(key):
                fail(f"{key}={choice!r} is not a known {key}; choose one of {group_options(key)}")


def check_value_overrides(argv: list[str]) -> None:
    """Reject `a.b=value` when `a.b` is not a key of the composed config, in one line naming the valid keys
    (Hydra's own message spans several lines and a stack-trace hint). `+a.b=` adds keys on purpose."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    group_args, value_keys = [], []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in groups:
            group_args.append(f"{key}={value.split(',')[0]}")  # the first choice of a sweep composes the rest
        elif not key.startswith(("+", "~", "hydra.")) and key != "hydra":
            value_keys.append(key)
    if not value_keys:
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=group_args)
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


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_dirname(overrides: str) -> str:
    """A run directory name from Hydra's `override_dirname`: no path separators, never empty, and short
    enough for the file system (a long one keeps its start and gets a hash of the whole)."""
    name = overrides.replace("/", "_") or "defaults"
    if len(name) > 200:
        name = f"{name[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def register_resolvers() -> None:
    from omegaconf import OmegaConf
    OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)


def one_line_errors(task):
    """Wrap a Hydra task function: a ConfigError exits with one line (a traceback only with
    HYDRA_FULL_ERROR=1). Hydra would otherwise print the job's overrides and a full stack trace."""
    from .errors import ConfigError

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            fail(str(e))
    return wrapped


def run_main(main) -> None:
    """Start a @hydra.main entry point: register the resolvers, then check the command line's group choices
    and keys (one-line errors before Hydra composes)."""
    register_resolvers()
    check_group_overrides(sys.argv[1:])
    check_value_overrides(sys.argv[1:])
    main()
