"""Shared by the Hydra entry points: check config-group choices up front, and turn ConfigError into one line."""
import functools
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


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_dirname(overrides: str) -> str:
    """A run directory name from Hydra's `override_dirname`: no path separators, never empty."""
    return overrides.replace("/", "_") or "defaults"


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
    """Start a @hydra.main entry point after checking config-group names on the command line."""
    register_resolvers()
    check_group_overrides(sys.argv[1:])
    main()
