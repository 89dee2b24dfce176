"""``python -m drake_data.mini build --out DIR --seed 0`` and ``... verify DIR``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from drake_data.errors import DrakeDataError
from drake_data.mini.builder import SIZES, build_drake_mini, verify_build

app = typer.Typer(add_completion=False, help="Build or verify DRAKE-mini (offline, from package data).")


@app.command()
def build(
    out: Path = typer.Option(..., "--out", help="Output folder (created atomically)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every sampling decision."),
    size: str = typer.Option("default", "--size", help=f"One of {sorted(SIZES)}."),
    force: bool = typer.Option(False, "--force", help="Replace an existing different folder."),
) -> None:
    """Build DRAKE-mini into OUT (skipped if the same build is already there)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = build_drake_mini(out, seed=seed, size=size, force=force)
    except DrakeDataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@app.command()
def verify(root: Path = typer.Argument(..., help="A DRAKE-mini folder.")) -> None:
    """Check file hashes against the manifest and that no image or text leaks across splits."""
    try:
        manifest = verify_build(root)
    except DrakeDataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok: {len(manifest['files'])} files, seed {manifest['seed']}, size {manifest['size']}")


if __name__ == "__main__":
    app()
