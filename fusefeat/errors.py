"""Exit codes, expected failures, and the per-file failure record.

Expected failures carry a message for a person (what failed, and what to do); the CLI prints
them without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0  # every input file was extracted
EXIT_FATAL = 1  # nothing could run: weights missing, output not writable, ...
EXIT_USAGE = 2  # bad command-line arguments (Click's own code)
EXIT_PARTIAL = 3  # the run completed, some files failed (see errors in the output directory)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal, committed work kept; run again to resume

EXIT_CODES_HELP = (
    "Exit codes: 0 all files done (also when there were none: a warning says so); "
    "1 fatal error (weights missing or unreadable, output directory not writable, disk full "
    "or file size limit: committed work is kept, run the same command again); "
    "2 bad arguments (unknown model, malformed --layers, ...); "
    "3 completed but some files failed: each has a record (path, stage, type, message) in the "
    "output directory, counted in the JSON summary, listed by `fusefeat info DIR`, tried again "
    "with --retry-failed; "
    "75 interrupted, resumable: run the same command again."
)

# The stages a file can fail in, as recorded in the error ledger.
STAGES = ("discover", "decode", "resample", "model", "write")


class FusefeatError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code = EXIT_FATAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(FusefeatError):
    """Bad arguments: unknown model, malformed --layers, ..."""

    exit_code = EXIT_USAGE


class WeightsError(FusefeatError):
    """Weights cannot be found, downloaded or loaded."""


class OutputError(FusefeatError):
    """The output directory cannot be used (not writable, other fingerprint, locked)."""


class WriteError(OutputError):
    """Writing into the output directory failed mid-run (disk full, quota, file size limit, I/O
    error). Fatal: what was committed before stays valid; the same command resumes."""

    stage = "write"
    hdf5_failed = False  # the failure happened inside HDF5 (not refused before it)


class AudioError(Exception):
    """One input file cannot be used; recorded in the ledger, the run goes on."""

    def __init__(self, message: str, stage: str = "decode", kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.kind = kind  # a short type name for grouping (e.g. "EmptyAudio")


@dataclass(frozen=True)
class FileFailure:
    """One row of the error ledger."""

    path: str
    stage: str
    error_type: str
    message: str

    @classmethod
    def from_exception(cls, path: str, stage: str, exc: BaseException) -> "FileFailure":
        kind = getattr(exc, "kind", None) or type(exc).__name__
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        stage = getattr(exc, "stage", None) or stage
        return cls(path=path, stage=stage, error_type=kind, message=message)
