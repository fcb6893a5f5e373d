"""The one exception type for errors a user can cause (bad file, bad config, bad request).

The message names where the problem is (file, line, field) so the CLI can print it on one
line, without a traceback.
"""
from __future__ import annotations

from pathlib import Path


class TunelabError(Exception):
    """`kind`: what went wrong, as a stable name a caller can switch on (a validation report's
    error kind, an API error's code), so no caller has to read it out of the message."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None, kind: str | None = None):
        self.reason = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.kind = kind
        super().__init__(self._format())

    def located(self, *, file: str | Path | None = None, line: int | None = None,
                field: str | None = None, reason: str | None = None) -> TunelabError:
        """The same error (its kind kept) at another place or in other words."""
        return TunelabError(self.reason if reason is None else reason, file=file, line=line,
                            field=field, kind=self.kind)

    def _format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line is not None else "")
        elif self.line is not None:
            where = f"line {self.line}"
        if self.field:
            where = f"{where}: field '{self.field}'" if where else f"field '{self.field}'"
        return f"{where}: {self.reason}" if where else self.reason
