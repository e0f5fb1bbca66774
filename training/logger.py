"""What a training run reports: log lines (terminal and ``train.log``) and TensorBoard scalars.

Only rank 0 writes files; other ranks print warnings and errors to the terminal, prefixed with
their rank. Log lines go above the tqdm progress bar instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class RunLogger:
    """The ``vcnet.train`` logger plus, on the main rank, ``train.log`` and a TensorBoard writer.

    Args:
        folder: the run folder (``train.log`` and ``tensorboard/`` go there on the main rank).
        rank, world_size: this process among the training processes.
    """

    def __init__(self, folder: str, rank: int = 0, world_size: int = 1) -> None:
        self.log = logging.getLogger("vcnet.train")
        self._remove_handlers()
        self.log.propagate = False
        self.is_main = rank == 0
        self.log.setLevel(logging.INFO if self.is_main else logging.WARNING)
        console = _TqdmHandler()
        prefix = "" if world_size == 1 else f"[rank {rank}] "
        console.setFormatter(logging.Formatter(prefix + "%(message)s"))
        self.log.addHandler(console)
        self.writer = None
        self.logfile: logging.FileHandler | None = None
        if self.is_main:
            os.makedirs(folder, exist_ok=True)
            self.logfile = logging.FileHandler(os.path.join(folder, "train.log"))
            self.logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(self.logfile)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    def info(self, message: str) -> None:
        self.log.info(message)

    def warning(self, message: str) -> None:
        self.log.warning(message)

    def error(self, message: str) -> None:
        self.log.error(message)

    def failure(self, exc: BaseException) -> None:
        """Record why the run stopped in ``train.log`` (the terminal gets it from the command)."""
        if self.logfile is None:
            return
        text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"error: {text}"
        self.logfile.handle(self.log.makeRecord(self.log.name, logging.ERROR, __file__, 0, message, None, None))

    def scalars(self, prefix: str, values: Mapping[str, float | None], step: int) -> None:
        """TensorBoard ``prefix/name`` points at ``step`` (main rank; None values are left out)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the log files."""
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:  # a full disk: the points are lost, and the error that stopped the run is reported
                _discard_pending_events(self.writer)
            self.writer = None
        self._remove_handlers()

    def _remove_handlers(self) -> None:
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()


def _discard_pending_events(writer) -> None:
    """Close a TensorBoard writer whose event file cannot be flushed, dropping what it still holds.

    Its file is pointed at an in-memory file first; otherwise its thread and its exit hook would retry the
    flush and print tracebacks after the run's one-line error.
    """
    for file_writer in list((writer.all_writers or {}).values()):
        try:
            events = file_writer.event_writer
            stream = events._ev_writer._py_recordio_writer._writer  # tensorboardX internals
            sink = os.memfd_create("discarded-events") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_WRONLY)
            os.dup2(sink, stream.fileno())
            os.close(sink)
            events.close()
        except (AttributeError, OSError, ValueError):
            pass
