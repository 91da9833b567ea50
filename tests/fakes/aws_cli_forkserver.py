"""The real AWS CLI, started without its start-up cost: a fork server for the scripts under test.

Every `aws` call the node scripts make in the tests is the venv's awscli (requirements-dev.txt) against
moto. Most of each call's ~0.4 s of CPU is Python importing awscli and botocore, and the applier,
compile-cache and mirror tests make hundreds of calls. Here one process per test process imports
awscli (and the plugins every call imports) once and parses the models of the services the tests
call; a call runs as a fork of it with the caller's own argv, environment, working directory and
standard streams (passed as file descriptors), so the CLI's code, its parsing, its configuration from
the environment and its exit status are the real ones. Only the imports and those parses happen once
(a call: 0.23 -> 0.12 s of CPU with the plugins and models preloaded).

    PATH="$(shim_dir()):$PATH"   # `aws` is then a 20-line client of this server

A caller killed mid-call (a script's `timeout`) closes its connection, and the server kills the
fork. Set KIMI_TEST_AWS_FORKSERVER=0 to run the venv's `aws` directly.
"""

from __future__ import annotations

import array
import atexit
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_STATE: dict = {}

CLIENT = r'''#!{python} -I
# Client of tests/fakes/aws_cli_forkserver.py: hands argv, the environment, the working directory and
# fds 0-2 to the server, which runs the real AWS CLI in a fork; exits with its status. Where the fork
# would not be the same process the caller would have started (a closed standard stream, another
# user, umask or network namespace), it runs the real CLI itself.
import array, json, os, socket, struct, sys

def same_context():
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        umask = os.umask(0)
        os.umask(umask)
        return (os.getuid(), umask, os.readlink("/proc/self/ns/net")) == ({uid}, {umask}, {netns!r})
    except OSError:
        return False

if not same_context():
    os.execv({real_aws!r}, [{real_aws!r}, *sys.argv[1:]])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect({socket_path!r})
payload = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
sock.sendmsg([struct.pack("!I", len(payload))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
sock.sendall(payload)
status = b""
while len(status) < 4:
    chunk = sock.recv(4 - len(status))
    if not chunk:
        sys.exit(255)
    status += chunk
sys.exit(struct.unpack("!i", status)[0])
'''


#: The CLI's plugins module: every call's create_clidriver() imports it (load_plugins), and with it
#: every customization (cloudformation, rsa, yaml, s3transfer...): most of a call's CPU after the
#: clidriver import itself. Imported once here; what it reads from the environment at import is done
#: again per call (_redo_import_time_environment).
PLUGINS_MODULE = "awscli.handlers"
#: The services the scripts under test call, whose models (and the CLI's own data) every call of them
#: reads and parses (json with OrderedDict pairs: 20-40 ms each for endpoints.json or a large
#: service-2.json). Parsed once here; a fork is handed each parsed file once (see _preload_models).
PRELOADED_SERVICES = ("s3", "ssm", "sts", "iam", "ec2", "autoscaling", "cloudwatch")
#: The module-level names that the plugins' import computes from $HOME (os.path.expanduser), by module:
#: the caller's HOME may differ from the server's. tests/test_aws_cli_forkserver.py checks that these
#: are all the import-time values that depend on the environment.
HOME_DEPENDENT = {
    "awscli.customizations.assumerole": {"CACHE_DIR": ("~", ".aws", "cli", "cache")},
    "awscli.customizations.eks.update_kubeconfig": {"DEFAULT_PATH": ("~/.kube/config",)},
    "awscli.customizations.history.constants": {"DEFAULT_HISTORY_FILENAME": ("~", ".aws", "cli", "history", "history.db")},
    "awscli.customizations.history": {"DEFAULT_HISTORY_FILENAME": ("~", ".aws", "cli", "history", "history.db")},
    "awscli.customizations.history.commands": {"DEFAULT_HISTORY_FILENAME": ("~", ".aws", "cli", "history", "history.db")},
}


def _preload() -> None:
    """What every call would import and parse the same way, done once before any fork."""
    import importlib

    import awscli.clidriver  # noqa: F401  (the import every fork inherits; it brings its own botocore)
    importlib.import_module(PLUGINS_MODULE)
    _preload_models()


def _preload_models() -> None:
    """JSONFileLoader.load_file returns, for a file parsed here, that parse, once per process (a fork's
    first read of the file; any later read parses the file again, as botocore always does): the same
    object a fresh parse of the same bytes gives, which nothing here has touched. Which file a call
    reads (its AWS_DATA_PATH, its service) is still the call's own path lookup."""
    import os.path

    import awscli
    import botocore
    from botocore import loaders

    parsed: dict[str, object] = {}
    original = loaders.JSONFileLoader.load_file
    reader = loaders.JSONFileLoader()
    roots = [os.path.join(os.path.dirname(awscli.__file__), "data"), os.path.join(os.path.dirname(botocore.__file__), "data")]
    names = ["cli", "endpoints", "partitions", "_retry", "sdk-default-configuration"]
    for root in roots:
        for service in PRELOADED_SERVICES:
            service_dir = os.path.join(root, service)
            for version in (os.listdir(service_dir) if os.path.isdir(service_dir) else []):
                names += [os.path.join(service, version, kind)
                          for kind in ("service-2", "paginators-1", "waiters-2", "endpoint-rule-set-1")]
        for name in names:
            path = os.path.join(root, name)
            data = original(reader, path)
            if data is not None:
                parsed[path] = data

    def load_file(self, file_path):
        data = parsed.pop(file_path, None)
        return data if data is not None else original(self, file_path)

    loaders.JSONFileLoader.load_file = load_file


def _serve(socket_path: str) -> None:
    """The server's main loop (run in its own process by `python -m`)."""
    _preload()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    while True:  # forks happen here, in the main thread; a thread per call only watches its fork
        conn, _ = listener.accept()
        _handle(conn)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client gone")
        data += chunk
    return data


def _handle(conn: socket.socket) -> None:
    fds = array.array("i")
    try:
        header, ancillary, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        header += _recv_exactly(conn, 4 - len(header))
        request = json.loads(_recv_exactly(conn, struct.unpack("!I", header)[0]))
    except (ConnectionError, OSError, ValueError):  # a caller gone before it asked: nothing to run
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the call: the real CLI with the caller's streams, environment and directory
        os._exit(_run_in_fork(conn, fds, request))
    for fd in fds:
        os.close(fd)
    threading.Thread(target=_watch, args=(conn, pid), daemon=True).start()


def _run_in_fork(conn: socket.socket, fds: array.array, request: dict) -> int:
    """The body of `aws`: its exit status, its output flushed (os._exit skips Python's own flush)."""
    status = 255
    try:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _redo_import_time_environment()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = ["aws", *request["argv"]]
        import awscli.clidriver
        status = awscli.clidriver.main()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001  (a crash is the call's failure, as with the real CLI)
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                status = 120  # what the interpreter exits with when its final flush fails
    return status if isinstance(status, int) else 0


def _watch(conn: socket.socket, pid: int) -> None:
    """Report the fork's exit status to its caller; kill the fork when the caller goes first."""
    conn.settimeout(0.05)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
            except OSError:
                pass
            conn.close()
            return
        try:
            if conn.recv(1) == b"":  # the caller was killed: so is its call
                os.kill(pid, signal.SIGKILL)
        except socket.timeout:
            pass
        except OSError:
            os.kill(pid, signal.SIGKILL)


def _redo_import_time_environment() -> None:
    """What `import awscli` does to the environment (awscli/__init__.py: its data directory appended
    to AWS_DATA_PATH), which the caller's environment replaced, and what the plugins' import read from
    $HOME (HOME_DEPENDENT): done again for this call."""
    import awscli
    paths = [os.path.expanduser(os.path.expandvars(p)) for p in os.environ.get("AWS_DATA_PATH", "").split(os.pathsep)
             if p]
    os.environ["AWS_DATA_PATH"] = os.pathsep.join([*paths, os.path.join(os.path.dirname(awscli.__file__), "data")])
    for module, names in HOME_DEPENDENT.items():  # what the plugins' import read from $HOME
        for name, parts in names.items():
            setattr(sys.modules[module], name, os.path.expanduser(os.path.join(*parts)))


def shim_dir() -> Path | None:
    """A directory whose `aws` runs the venv's real AWS CLI through this process's fork server
    (started on first use, stopped at exit); None when disabled."""
    if os.environ.get("KIMI_TEST_AWS_FORKSERVER", "1") == "0":
        return None
    server = _STATE.get("server")
    if server is not None and server.poll() is None:
        return _STATE["dir"]
    directory = Path(tempfile.mkdtemp(prefix="aws-forkserver-"))
    socket_path = str(directory / "socket")
    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.aws_cli_forkserver", socket_path],
                              cwd=Path(__file__).resolve().parents[2], stdin=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(socket_path) or server.poll() is not None:
            break
        time.sleep(0.05)
    if server.poll() is not None:
        raise RuntimeError("the AWS CLI fork server did not start")
    client = directory / "aws"
    umask = os.umask(0)
    os.umask(umask)
    client.write_text(CLIENT.format(python=sys.executable, socket_path=socket_path, uid=os.getuid(), umask=umask,
                                    netns=os.readlink("/proc/self/ns/net"), real_aws=str(Path(sys.executable).parent / "aws")))
    client.chmod(0o755)
    _STATE.update(server=server, dir=directory)
    atexit.register(_stop, server)
    return directory


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


if __name__ == "__main__":
    _serve(sys.argv[1])
