"""The README's quick start runs as written and prints what its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_quick_start_runs_from_an_empty_directory_outside_the_repository(
    tmp_path: Path,
) -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.DOTALL)
    assert code is not None
    work = tmp_path / "empty"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    script = tmp_path / "quick_start.py"  # beside the directory, which stays empty
    script.write_text(code.group(1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AGENT_METER_PRICING")}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=work,
        env=env,
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
    assert sorted(path.name for path in work.iterdir())[0] == "usage.db"  # made there


def test_the_openai_snippet_sends_the_assistant_message_before_its_tool_results() -> None:
    """The API rejects tool messages that do not follow the assistant message calling them."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("**OpenAI SDK**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    appended = snippet.index("messages.append(assistant")
    ran = snippet.index("run_tool_calls(meter, assistant")
    assert appended < ran
    example = (ROOT / "examples" / "openai_tools.py").read_text()
    assert example.index("messages.append(message.model_dump") < example.index("run_tool_calls(")
