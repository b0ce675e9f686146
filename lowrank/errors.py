"""One exception type for bad input: the entry points print its message as one line and exit non-zero."""


class ConfigError(ValueError):
    """A bad config value, file or name; the message names the key and what would be valid."""
