"""The ``sofim-tune`` Typer application: a thin layer over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sofim-tune",
    help="Find good lr, rho and beta1 for the SOFIM optimizer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Find good lr, rho and beta1 for the SOFIM optimizer."""


def main() -> None:
    app()
