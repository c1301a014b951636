"""An older engine, extracted from git at bench time, to measure before/after in one run.

``splitwise bench engine --baseline-commit C`` runs ``git archive C splitwise/engine`` into a
temporary directory and imports it as the package ``splitwise_engine_<C>`` (its absolute imports
of ``splitwise.engine`` are rewritten; other ``splitwise`` imports resolve to the current tree).
No copy of old code is ever committed.
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

from splitwise.errors import SplitwiseError


class BaselineError(SplitwiseError):
    """The baseline engine could not be extracted or imported (not a git checkout, bad commit)."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def extract_engine(commit: str, dest: Path) -> str:
    """Write ``commit``'s splitwise/engine under ``dest`` as a package; returns its name."""
    if not re.fullmatch(r"[0-9a-zA-Z_.\-/]+", commit):
        raise BaselineError(f"--baseline-commit: {commit!r} is not a commit name")
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit, "splitwise/engine"],
            cwd=_repo_root(),
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.decode(errors="replace").strip()
            if isinstance(exc, subprocess.CalledProcessError)
            else exc
        )
        raise BaselineError(f"--baseline-commit: git archive {commit} failed: {detail}") from None
    package = "splitwise_engine_" + re.sub(r"\W", "_", commit)
    root = dest / package
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith("splitwise/engine/"):
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            target = root / member.name.removeprefix("splitwise/engine/")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = extracted.read()
            if target.suffix == ".py":
                data = re.sub(rb"\bsplitwise\.engine\b", package.encode(), data)
            target.write_bytes(data)
    return package


def import_baseline(commit: str) -> ModuleType:
    """The baseline's ``engine`` module (``LLMEngine``, ``EngineConfig`` via its ``config``)."""
    dest = Path(tempfile.mkdtemp(prefix="splitwise-baseline-"))
    package = extract_engine(commit, dest)
    sys.path.insert(0, str(dest))
    try:
        return importlib.import_module(f"{package}.engine")
    except ImportError as exc:
        raise BaselineError(f"--baseline-commit: {commit}'s engine does not import here: {exc}") from None
