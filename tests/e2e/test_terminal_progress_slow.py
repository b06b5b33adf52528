"""What a terminal shows of `opd run` (slow): one live display (the run's row and the running stage's bars) at the
bottom while it runs, every log line whole above it, and at the end no trace of the display (opd_tasks/progress.py).
The command runs on a pseudo-terminal; pyte, a terminal emulator, renders what it wrote as a terminal would."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

pyte = pytest.importorskip("pyte")
REPO = Path(__file__).resolve().parents[2]
COLS, ROWS = 160, 400  # tall enough that nothing scrolls off: the whole output stays on the emulated screen


@pytest.mark.slow
def test_one_display_with_whole_log_lines_above_it(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "OPD_HOME": str(tmp_path / "opd"), "TERM": "xterm",
           "COLUMNS": str(COLS), "LINES": str(ROWS)}
    env.pop("PREFECT_API_URL", None)
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "flows.cli", "run", "-n", "1", "--set", "data.prompts_per_iteration=8",
           "--set", "data.eval_size=20", "--name", "tty"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    raw = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command exited and closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(600) == 0, raw.decode(errors="replace")[-3000:]
    os.close(leader)
    screen = pyte.Screen(COLS, ROWS)
    pyte.ByteStream(screen).feed(bytes(raw))
    lines = [line.rstrip() for line in screen.display]
    text = "\n".join(lines)
    assert "Traceback" not in text, text[-3000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))  # without colours and cursor moves
    assert re.search(r"run tty .*0/10 stages", plain), "the run display was never drawn"
    # Each stage's log line is whole, on a line of its own, with nothing of the display in it.
    for stage in ("eval_prompts", "baseline", "prompts", "rollout", "score", "gates", "analyze", "update", "evaluate"):
        hits = [ln for ln in lines if re.search(rf"it0 {stage}\s+computed in\s+[\d.]+s -> \w+/[0-9a-f]{{12}}", ln)]
        assert len(hits) == 1, (stage, text[-4000:])
        assert "━" not in hits[0] and "stages" not in hits[0], hits[0]
    # The display is transient: gone at the end, and the summary table follows the log lines.
    assert not any("/10 stages" in ln for ln in lines), text[-3000:]
    assert any("accuracy on 20 held-out prompts per iteration" in ln for ln in lines)
