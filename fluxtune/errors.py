"""Errors that mean "your input cannot be used": the CLI prints them as one message, no traceback.

Kept free of heavy imports so the CLI can catch them without loading torch.
"""


class UserError(RuntimeError):
    """Base class; the message names the file, folder or key and says how to fix it."""


class ModelError(UserError):
    """A checkpoint that cannot be used as asked."""


class DataError(UserError):
    """Training data that cannot be used."""


class LoraError(UserError, ValueError):
    """LoRA settings or files that do not fit the model."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; resume to continue


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGINT after writing a resumable checkpoint."""


def require_package(what: str, package: str, extra: str) -> None:
    """Import an optional package `what` needs, or say which fluxtune extra installs it."""
    import importlib

    try:
        importlib.import_module(package)
    except ImportError as e:
        raise UserError(f"{what} needs the {package} package, which cannot be imported ({e}); "
                        f"install it with: pip install 'fluxtune[{extra}]'") from None
