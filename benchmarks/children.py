"""The suite's child processes: each step runs as one, its output echoed line by line with the
suite's clock and kept in a log, stopped at its time limit (SIGINT first, so pytest and the
benchmarks still write their summaries), and judged by its exit code (pytest's via junit XML)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

_T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _T0


def say(msg: str) -> None:
    print(f"[suite {int(elapsed()) // 60:02d}:{int(elapsed()) % 60:02d}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- children
@dataclass
class Proc:
    """A child process whose output is echoed (prefixed) and written to ``log``."""

    name: str
    argv: List[str]
    log: Path
    timeout: Optional[float]
    echo: bool = True
    rc: Optional[int] = None
    seconds: float = 0.0
    timed_out: bool = False
    _p: Optional[subprocess.Popen] = None
    _reader: Optional[threading.Thread] = None
    _t: float = 0.0

    def start(self, env: Dict[str, str], cwd: Path) -> "Proc":
        self._t = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._p = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        with open(self.log, "w") as f:
            for line in self._p.stdout:
                f.write(line)
                f.flush()
                if self.echo:
                    say(f"{self.name} | {line.rstrip()}")

    def wait(self) -> int:
        try:
            self._p.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            say(f"{self.name}: time limit {self.timeout:.0f} s reached; stopping it")
            # SIGINT first: pytest and the benchmarks then print their summaries and keep their files
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self._p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self._p.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._reader.join(timeout=10)
        self.rc = self._p.returncode
        self.seconds = time.monotonic() - self._t
        return self.rc


@dataclass
class StepResult:
    step: str
    status: str  # PASS | FAIL(rc=N) | TIMEOUT | SKIPPED | NO-TESTS
    seconds: float = 0.0
    note: str = ""
    tests: Optional[dict] = None

    def as_dict(self) -> dict:
        d = {"step": self.step, "status": self.status, "seconds": round(self.seconds, 1), "note": self.note}
        if self.tests is not None:
            d["tests"] = self.tests
        return d


def status_of(proc: Proc) -> str:
    if proc.timed_out:
        return "TIMEOUT"
    if proc.rc == 0:
        return "PASS"
    if proc.rc == 5 and proc.argv[1:3] == ["-m", "pytest"]:
        return "NO-TESTS"
    return f"FAIL(rc={proc.rc})"


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped from a pytest junit XML (zeros if it is missing)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        tests = int(s.get("tests", 0))
        failed, errors, skipped = int(s.get("failures", 0)), int(s.get("errors", 0)), int(s.get("skipped", 0))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - errors - skipped
    return counts


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip("= ").strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if any(w in ln for w in ("passed", "failed", "error", "skipped", "no tests ran")):
            return ln
    return lines[-1] if lines else ""
