"""The loader's one error type."""


class LoaderError(ValueError):
    """A bad argument, a missing release or an unreadable shard; the message names it."""
