"""Offline, quiet third-party libraries: used by the simulation driver, the CLI and the
institutions' Ray workers alike (a neutral module, so clients never import the platform)."""
from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_environment() -> None:
    """Offline, quiet libraries in this process and the Ray workers it starts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the Ray workers this process starts
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # local training is the work: no demotion
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not {"transformers", "huggingface_hub"} & set(sys.modules):  # both read these at import: a CLI
        # error (bad data file, bad option) is then reported without importing them (~0.6 s)
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
