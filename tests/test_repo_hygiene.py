"""Repository hygiene: no secrets committed, secrets file ignored, every module has its one-line docstring."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (RSA |EC |OPENSSH |)PRIVATE KEY-----"),
    re.compile(r"\bsk-[A-Za-z0-9]{20,}"),  # OpenAI-style API keys
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\bghp_[A-Za-z0-9]{30,}"),  # GitHub tokens
    re.compile(r"(?i)(api[_-]?key|secret|password)\s*=\s*['\"][A-Za-z0-9+/]{16,}['\"]"),
]


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in out.splitlines() if line]


def test_no_secrets_in_tracked_files():
    offenders = []
    for path in tracked_files():
        if not path.is_file() or path.suffix in (".png", ".gz", ".pdf", ".sqlite"):
            continue
        text = path.read_text(errors="ignore")
        for pattern in SECRET_PATTERNS:
            if pattern.search(text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern.pattern}")
    assert not offenders, offenders


def test_secrets_file_is_ignored():
    ignored = subprocess.run(
        ["git", "check-ignore", ".streamlit/secrets.toml"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0


def test_every_module_has_a_one_line_docstring():
    missing = []
    for path in tracked_files():
        if path.suffix != ".py" or not path.is_file():
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or "\n" in doc.strip():
            missing.append(str(path.relative_to(REPO)))
    assert not missing, missing
