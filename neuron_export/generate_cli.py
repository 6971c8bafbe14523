"""The `generate` command: run an export and write images (registered by cli.py)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
