"""One exception type for bad input, and `fail`: how every entry point prints it (one line) and exits non-zero."""
import sys


class ConfigError(ValueError):
    """A bad config value, file or name; the message names the key and what would be valid."""


def check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(valid)}")


def fail(message: str, code: int = 2) -> None:
    """Print `error: MESSAGE` on stderr and exit (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
