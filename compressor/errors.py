"""The error types users see.

Every error that reaches a user names what is wrong (the file and, where there is one, the
tensor) and what to do about it. The CLI prints `str(error)` and exits non-zero; nothing else is
shown, so the message must stand on its own.
"""

from __future__ import annotations

__all__ = ["CompressorError", "ConfigError", "InputError", "OutputError"]


class CompressorError(Exception):
    """Base class of every error this tool raises on purpose."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path:
            where.append(str(self.path))
        if self.tensor:
            where.append(f"tensor {self.tensor!r}")
        text = f"{': '.join(where)}: {self.message}" if where else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text

    def __reduce__(self):  # keep the keyword fields when Dask pickles the error between processes
        return (_rebuild, (type(self), self.message, self.path, self.tensor, self.hint))


def _rebuild(cls, message, path, tensor, hint):
    return cls(message, path=path, tensor=tensor, hint=hint)


class InputError(CompressorError):
    """The input checkpoint (or a side input) is malformed or unsupported."""

    exit_code = 2


class ConfigError(CompressorError):
    """The run's configuration (CLI flags, recipe, flow parameters) is invalid."""

    exit_code = 2


class OutputError(CompressorError):
    """The destination cannot be written (exists, is inside the source, disk full, locked)."""

    exit_code = 3
