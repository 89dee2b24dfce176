"""DRAKE-mini: DRAKE's layout and protocol on real package data, built offline in seconds."""

from drake_data.mini.builder import (
    MINI_VERSION,
    SIZES,
    TASKS,
    LeakageReport,
    build_drake_mini,
    check_leakage,
    file_hashes,
    load_public,
    load_unseen,
    read_manifest,
    verify_build,
)

__all__ = [
    "MINI_VERSION", "SIZES", "TASKS", "LeakageReport", "build_drake_mini", "check_leakage",
    "file_hashes", "load_public", "load_unseen", "read_manifest", "verify_build",
]
