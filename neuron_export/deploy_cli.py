"""Typer commands that look at a finished export: inspect, verify, push (registered by cli.py)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
