"""The command line, ServerApp and ClientApp silence library notices that say nothing about a run."""

from __future__ import annotations

import os
import subprocess
import sys


def test_bitsandbytes_kernel_notices_are_silenced_offline() -> None:
    """Importing bitsandbytes offline on an AVX512-BF16 CPU makes it ask the ``kernels`` package for
    a hub kernel, which logs two warnings; after ``quiet_libraries`` neither reaches stderr, while the
    project's own warnings still do. (A CPU without AVX512-BF16 logs neither, with or without it.)"""
    script = (
        "import logging\n"
        "from fedmosaic_flower.logs import quiet_libraries\n"
        "quiet_libraries()\n"
        "import bitsandbytes\n"
        "logging.getLogger('fedmosaic').warning('own warning')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "own warning" in done.stderr
    assert "kernels-community" not in done.stderr
    assert "publisher trust" not in done.stderr
