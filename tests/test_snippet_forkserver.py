"""The snippet fork server (tests/fakes/snippet_forkserver.py) answers like `python -c`, whenever the
caller reads: a snippet that ends before its caller reads the pid line still gets its status (the
server's lines were once read through a text buffer select() could not see, and such a caller timed out)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.fakes.snippet_forkserver import SnippetServer


def test_a_caller_that_reads_late_still_gets_each_status(tmp_path):
    server = SnippetServer(dict(os.environ))
    try:
        out, err = Path(server.scratch.name, "stdout"), Path(server.scratch.name, "stderr")
        for code, status in (("x = undefined_name", 1), ("import sys; sys.exit(3)", 3), ("print('ok')", 0)):
            request = {"code": code, "env": dict(os.environ), "cwd": str(tmp_path), "stdout": str(out),
                       "stderr": str(err)}
            server.process.stdin.write(json.dumps(request) + "\n")
            server.process.stdin.flush()
            time.sleep(0.2)  # the snippet ends, and the server writes both lines, before we read
            assert server._answer(30)["pid"] > 0
            assert server._answer(5)["status"] == status
        assert server.run("print('late')", dict(os.environ), tmp_path, 30).stdout == "late\n"
    finally:
        server.close()
