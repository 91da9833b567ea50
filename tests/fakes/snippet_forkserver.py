"""Python snippets without the openai client's import per run: a fork server for test_client_snippets.

Each Python snippet of docs/using-the-endpoint.md ran as `python -c CODE` in a fresh interpreter,
and most of a run's CPU was importing the openai package (about 0.65 of 0.9 s; 18 runs a session).
Here one process imports openai once; a snippet runs in a fork of it, as `python -c` runs it: its
own globals (`__name__ == "__main__"`, so every name the snippet uses it must import itself), argv
`["-c"]`, the caller's environment and working directory, stdin from /dev/null, stdout and stderr to
files the caller reads, and the exit status `python -c` gives (SystemExit's code; 1 and the
traceback on stderr for an uncaught exception). The openai client reads its settings (the base URL,
the key, SSL_CERT_FILE through httpx) when the snippet constructs it, from the fork's environment.

Set KIMI_TEST_SNIPPET_FORKSERVER=0 to run every snippet in an interpreter of its own instead.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: What the server imports before its forks: the client the Python snippets use.
PRELOADED = ("openai",)

SERVER = r'''
import json, os, sys, traceback
for module in {preloaded!r}:
    __import__(module)
requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "w", buffering=1)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 1)  # nothing the server prints mixes with its answers
for line in requests:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        answers.close()
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-c"]
        status = 0
        try:
            exec(compile(request["code"], "<string>", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
        except SystemExit as exit_:
            code = exit_.code
            if code is None:
                status = 0
            elif isinstance(code, int):
                status = code & 0xFF
            else:
                print(code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    answers.write(json.dumps({{"pid": pid}}) + "\n")
    _, wait_status = os.waitpid(pid, 0)
    answers.write(json.dumps({{"status": os.waitstatus_to_exitcode(wait_status)}}) + "\n")
'''


class SnippetServer:
    """One server process; run() is subprocess.run([python, "-c", code], ...)'s answer."""

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen([sys.executable, "-c", SERVER.format(preloaded=PRELOADED)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.scratch = tempfile.TemporaryDirectory(prefix="snippet-forkserver-")
        self._pending = b""

    def _answer(self, timeout: float) -> dict:
        """The server's next line. Read from the pipe's fd into our own buffer, never through the text
        wrapper's: a line the wrapper had buffered would be invisible to select() (a snippet that ends
        before its pid line is read would look like a timeout)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.process.stdout.fileno()], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"snippet server ended: {self.process.poll()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, code: str, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        out, err = Path(self.scratch.name, "stdout"), Path(self.scratch.name, "stderr")
        request = {"code": code, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._answer(30)["pid"]
        try:
            status = self._answer(timeout)["status"]
        except TimeoutError:
            try:
                os.kill(pid, 9)  # still the server's unreaped child: its status line is not written yet
            except ProcessLookupError:
                pass  # it ended (and was reaped) just now: its status line follows
            self._answer(30)
            raise subprocess.TimeoutExpired(["-c", code], timeout) from None
        return subprocess.CompletedProcess([sys.executable, "-c", code], status, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.scratch.cleanup()


def enabled() -> bool:
    return os.environ.get("KIMI_TEST_SNIPPET_FORKSERVER", "1") != "0"
