"""The codebase stays at the project's lint rules (``[tool.ruff]`` in pyproject.toml: lines of at
most 100 characters, pyflakes, whitespace), the scripts under tools/ included."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"ruff check found problems:\n{done.stdout}{done.stderr}"


def test_every_python_script_under_tools_is_in_the_lint_s_include_list():
    # ruff finds .py files by suffix; the suffix-less scripts are checked only when listed.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
                 ["extend-include"])
    scripts = {f"tools/{path.name}" for path in (ROOT / "tools").iterdir()
               if path.is_file() and path.read_bytes().startswith(b"#!/usr/bin/env python")}
    assert scripts and scripts <= listed, f"add {sorted(scripts - listed)} to extend-include"
