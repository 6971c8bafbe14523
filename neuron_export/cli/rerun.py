"""The quick rerun: `neuron-export` run again with the same arguments, environment and working directory, while
every file the last answer depended on is unchanged, prints that answer again without parsing or planning.

A record is kept only for an answer "up to date" (given, or due after a build) of exports read from local
folders, in the cache folder's `reruns/`, keyed by the arguments, the environment, the working directory and the
interpreter. It lists the identity (size, times, inode) of every file and folder the answer read: the sources,
YAML configs, the outputs, the installed packages' folders and this package's own files. Any difference, or a
record that cannot be read, and the command runs in full as ever. Only the standard library is imported here:
the point is to answer before typer and pydantic are (about 0.25 s of a rerun)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.files import default_cache_dir

if TYPE_CHECKING:
    from neuron_export.planning.jobs import Plan

RECORD_FOLDER = "reruns"
RECORD_VERSION = 1
RECORD_LIMIT = 256  # records kept (the most recently written): each CI job's environment makes another
WATCH_LIMIT = 20_000  # a source folder larger than this (`-m .` in a big tree) is not worth watching
# Set by the shell around every command, so never part of what a command depends on.
SHELL_NOISE = frozenset({"_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES"})
# What the answer may depend on beyond its own files: the packages installed, and ours (an editable install too).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def record_folder(argv: Sequence[str]) -> Path:
    """The given --cache-dir's reruns/, else the default cache folder's: read from the arguments alone."""
    for index, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name == "--cache-dir":  # optimum-cli's --cache_dir is the Hub cache (cli/spellings.py)
            given = value if sep else (argv[index + 1] if index + 1 < len(argv) else "")
            if given:
                return Path(given).expanduser() / RECORD_FOLDER
    return default_cache_dir() / RECORD_FOLDER


def record_key(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """What decides the command besides files: its arguments, environment, working directory and interpreter."""
    said = {
        "argv": list(argv),
        "env": sorted((name, value) for name, value in environ.items() if name not in SHELL_NOISE),
        "cwd": os.getcwd(),
        "python": [sys.executable, sys.version],
    }
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()


def identity(path: str) -> list[int] | None:
    """A file's or folder's identity as far as a change would show (None: it is not there)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def answer(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Print the recorded answer and say True when it still holds; False (nothing printed) otherwise."""
    try:
        record = json.loads((record_folder(argv) / f"{record_key(argv, environ)}.json").read_text())
        if record.get("version") != RECORD_VERSION:
            return False
        watched: dict[str, Any] = record["watched"]
        if any(identity(path) != known for path, known in watched.items()):
            return False
        transcript = [(str(stream), str(text)) for stream, text in record["answer"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    Transcript.replay(transcript)
    return True


class Transcript:
    """What a command printed, in order: (stream, text) pairs, with "out" for stdout and "err" for stderr."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, str]] = []
        self.out = _Recorder(self.parts, "out")
        self.err = _Recorder(self.parts, "err")

    @staticmethod
    def replay(parts: Iterable[tuple[str, str]]) -> None:
        for stream, text in parts:
            target = sys.stdout if stream == "out" else sys.stderr
            target.write(text)
            target.flush()


class _Recorder(io.TextIOBase):
    def __init__(self, parts: list[tuple[str, str]], name: str) -> None:
        self.parts, self.name = parts, name

    def write(self, text: str) -> int:
        self.parts.append((self.name, text))
        return len(text)

    def isatty(self) -> bool:  # the answer is plain lines wherever it is replayed
        return False


class Recording:
    """Whether this command records its answer (only when it is the process's command), and the answer kept."""

    on = False
    kept: dict[str, Any] | None = None


def keep(transcript: Transcript, plans: Sequence[Plan], config_files: Sequence[Path], since_ns: int) -> None:
    """Keep an up-to-date answer for main to record, when every file it read can be watched and none changed
    after `since_ns`, when the reading began (a change while we read may not be in the answer)."""
    watched = watched_paths(plans, config_files)
    Recording.kept = None
    if watched is None or any(known and max(known[1], known[2]) >= since_ns for known in watched.values()):
        return
    Recording.kept = {"version": RECORD_VERSION, "answer": transcript.parts, "watched": watched}


def watched_paths(plans: Sequence[Plan], config_files: Sequence[Path]) -> dict[str, list[int] | None] | None:
    """Every file and folder the answer read, with its identity now; None when one is a Hub download
    (whether a newer revision exists is only known by asking the Hub) or there are too many to watch."""
    roots: list[Path] = [PACKAGE_ROOT]
    # the interpreter's folders change with every install into them: their own entries, not their trees
    singles: list[Path] = [*config_files, *(Path(entry) for entry in sys.path if entry and Path(entry).is_dir())]
    for plan in plans:
        if plan.source.commit is not None:
            return None
        roots += [plan.output, plan.source.path]
        for job in plan.jobs:
            origin = plan.source.origin(job.component)
            if origin.hub is not None or any(added.hub is not None for added in origin.added):
                return None
            roots += [origin.root, origin.folder]
            singles += [added.path for added in origin.added]
    watched: dict[str, list[int] | None] = {}
    for single in singles:
        watched[os.path.abspath(single)] = identity(str(single))
    for root in dict.fromkeys(os.path.abspath(root) for root in roots):
        for found in _tree(root):
            watched[found] = identity(found)
        if len(watched) > WATCH_LIMIT:
            return None
    return watched


def _tree(root: str) -> list[str]:
    found = [root]
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        found += [os.path.join(folder, name) for name in (*subfolders, *files)]
        if len(found) > WATCH_LIMIT:
            break
    return found


def save(argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Write the kept answer's record (best effort: a cache folder we cannot write only costs the quick rerun)."""
    kept, Recording.kept = Recording.kept, None
    if kept is None:
        return
    folder = record_folder(argv)
    temporary = folder / f".{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(kept))
        temporary.replace(folder / f"{record_key(argv, environ)}.json")
        records = sorted(folder.glob("*.json"), key=lambda record: record.stat().st_mtime_ns, reverse=True)
        for old in records[RECORD_LIMIT:]:
            old.unlink(missing_ok=True)
    except OSError:
        temporary.unlink(missing_ok=True)
