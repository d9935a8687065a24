"""epmoe's messages go through `logging`, under the logger "epmoe" (and "epmoe.<part>" below it).

The library only creates loggers (with a `NullHandler`, so an application that configures nothing sees
nothing twice); an engine that embeds epmoe routes and filters them like any other library's. The `epmoe`
command configures them with `configure_cli_logging`: progress at INFO on stderr, rank 0 only, `-q` for
warnings only, `-v` for debug detail.
"""
from __future__ import annotations

import logging
import sys
import time

ROOT = "epmoe"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(part: str = "") -> logging.Logger:
    """The logger of one part of epmoe ("epmoe.run", "epmoe.bench", ...)."""
    return logging.getLogger(f"{ROOT}.{part}" if part else ROOT)


def verbosity_level(verbosity: int, rank: int = 0) -> int:
    """-1 (`-q`): warnings; 0: progress (INFO); 1 and more (`-v`): DEBUG. Ranks other than 0 say only
    warnings, so that N ranks do not print N copies of the same progress."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    return level if rank == 0 else max(level, logging.WARNING)


class _CliHandler(logging.StreamHandler):
    """The handler the command line installs (replaced, never stacked, when configured again). It writes
    to whatever `sys.stderr` is at the time of the message (a caller may have redirected it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        """StreamHandler assigns a stream when built: ignored, the current sys.stderr is always used."""
        return


def configure_cli_logging(verbosity: int = 0, rank: int = 0) -> None:
    """What the `epmoe` command (and the ranks it starts) do with epmoe's messages: stderr, plain lines."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(h)
    handler = _CliHandler()
    fmt = "%(asctime)s %(name)s: %(message)s" if verbosity > 0 else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(verbosity_level(verbosity, rank))
    logger.propagate = False


class Steps:
    """Progress of a loop of `total` steps as log lines, at most one per `every` seconds (and the last):
    `what 3/64`. For work long enough to need it, short enough that a progress bar is too much."""

    def __init__(self, logger: logging.Logger, what: str, total: int, every: float = 1.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.done, self.last = 0, 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            self.logger.info("%s %d/%d", self.what, self.done, self.total)
