"""Log settings shared by the ServerApp, the ClientApp and the command line: the project's own
progress lines, without library noise a user would have to read past."""

from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def quiet_libraries() -> None:
    """Silence messages that say nothing about a run: bitsandbytes' optional-kernel notices (on an
    AVX512-BF16 CPU it asks the ``kernels`` package, which transformers installs, for a hub kernel;
    offline that fails and bitsandbytes uses its own), torch's ``jit.script_method`` deprecation
    raised while importing transformers, and per-request HTTP logs."""
    for noisy in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    quiet_libraries()
