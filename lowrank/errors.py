"""One exception type for bad input: the entry points print its message as one line and exit non-zero."""


class ConfigError(ValueError):
    """A bad config value, file or name; the message names the key and what would be valid."""


def check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(valid)}")
