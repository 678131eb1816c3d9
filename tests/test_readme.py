"""The README's quick start runs as written and prints what its comments say."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_quick_start_runs_and_prints_what_it_promises(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.DOTALL)
    assert code is not None
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "pricing.toml", tmp_path / "examples" / "pricing.toml")
    (tmp_path / "quick_start.py").write_text(code.group(1))
    done = subprocess.run(
        [sys.executable, "quick_start.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "96.17",
        "code_exec is unavailable: 96.17 credits left, 200 needed",
    ]
