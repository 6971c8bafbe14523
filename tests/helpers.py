"""What tests share besides fixtures: the one in-process CLI runner (conftest's `cli` fixture hands it out) and
small readers of its output. Imported as `from helpers import ...` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import shutil
from collections.abc import Iterator


class CliResult:
    """What a user would see: exit code, stdout, stderr (also unpacks as that triple)."""

    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def __iter__(self) -> Iterator[int | str]:
        return iter((self.exit_code, self.stdout, self.stderr))

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-800:]!r}, stderr={self.stderr[-800:]!r})"


def run_cli(*args: object) -> CliResult:
    """Run `neuron-export ARGS...` in this process (torch stays imported between tests)."""
    from neuron_export.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def export_tiny(model: pathlib.Path, out: pathlib.Path, family: str) -> pathlib.Path:
    """A cpu export of a tiny pipeline; fails the test if the export fails."""
    result = run_cli(family, "-m", model, "--backend", "cpu", "-o", out)
    assert result.exit_code == 0, result
    return out


def warnings(stderr: str) -> list[str]:
    """The warning lines a command printed (with --json, its progress lines go to stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("neuron-export: warning")]


def hub_repository(cache: pathlib.Path, repo: str, files: pathlib.Path, commit: str) -> None:
    """`repo` at `commit` in a huggingface_hub cache folder, holding a copy of `files`, its main branch there."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
