"""Shared federation protocol: run configuration and message encoding (no server/client code)."""
