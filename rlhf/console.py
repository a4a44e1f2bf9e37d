"""What the console shows: our own lines; other libraries' chatter and Python warnings only
with ``-v``.

:func:`setup` runs in the CLI process and, as Ray's ``worker_process_setup_hook`` (see
:func:`ray_runtime_env`), in every Ray worker the CLI starts, so the workers' DeepSpeed,
torch, open_clip and MLflow messages follow the same rule; ``RLHF_VERBOSE`` carries ``-v``
to them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

VERBOSE_ENV = "RLHF_VERBOSE"
OURS = ("rlhf", "rewards", "actors", "bench")
# Loggers with their own handlers (they do not reach the root logger's level) that talk at
# import time: "Setting accelerator to CPU", "No CUDA runtime is found", MLflow's DB set-up.
# "ray.train" configures its own logger, so the "ray" entry does not reach it: its workers log
# "Checkpoint successfully created at: ..." on every report with a checkpoint.
_CHATTY = (
    "DeepSpeed",
    "torch.utils.cpp_extension",
    "mlflow",
    "ray",
    "ray.train",
    "transformers",
    "diffusers",
)
_QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    # Per-file bars of model loading (transformers, diffusers) and MLflow artifact downloads.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class _ErrorsOnly(logging.Filter):
    """On a library's own logger: its loggers reset their level when they are created."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()


def setup(verbose: bool | None = None) -> None:
    """Configure logging and warnings for this process (idempotent; call again after
    importing a library that configures its own loggers). ``verbose`` None: from
    ``RLHF_VERBOSE``."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_rlhf", False)]
    for handler in ours:
        # Follow a replaced sys.stderr (a notebook's, a test's capture) instead of writing
        # to the stream that was current at the first call, which may be closed by now.
        # (Not setStream: it flushes the old stream, which raises once that is closed.)
        if handler.stream is not sys.stderr:
            with handler.lock:
                handler.stream = sys.stderr
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._rlhf = True
        root.addHandler(handler)
    # Other libraries log to the root logger too (open_clip's "No pretrained weights").
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in _CHATTY:
        lg = logging.getLogger(name)
        if verbose:
            lg.removeFilter(_ERRORS_ONLY)
        else:
            lg.addFilter(_ERRORS_ONLY)
            lg.setLevel(logging.ERROR)
    logging.captureWarnings(True)  # warnings go through "py.warnings": shown with -v only
    warnings.simplefilter("default" if verbose else "ignore")


@contextlib.contextmanager
def library_prints():
    """Hide what a library ``print``s (DeepSpeed's "... op built successfully" when it sets up
    its process group) unless ``-v``."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


@contextlib.contextmanager
def mlflow_events():
    """Hide MLflow's event lines (``eprint``: "Registered model 'x' already exists. Creating a
    new version of this model...") unless ``-v``; its errors still raise."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


def ray_runtime_env(verbose: bool) -> dict:
    """The runtime env that gives every Ray worker of this job the same console rules."""
    return {
        "worker_process_setup_hook": "rlhf.console.setup",
        "env_vars": {VERBOSE_ENV: "1" if verbose else "0"},
    }
