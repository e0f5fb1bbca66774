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
        if self.is_main:
            os.makedirs(folder, exist_ok=True)
            logfile = logging.FileHandler(os.path.join(folder, "train.log"))
            logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(logfile)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    def info(self, message: str) -> None:
        self.log.info(message)

    def warning(self, message: str) -> None:
        self.log.warning(message)

    def error(self, message: str) -> None:
        self.log.error(message)

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
            self.writer.close()
            self.writer = None
        self._remove_handlers()

    def _remove_handlers(self) -> None:
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()
