"""Every snippet of docs/using-the-endpoint.md, run as written against the fake engine behind the
real Caddy a stack deploys (the stack's own Caddyfile renderer, key check, routes and release stamp).

curl snippets run in bash with the real curl, Python snippets as `python -c` runs them with the
official openai client (in forks of a process that imported it: tests/fakes/snippet_forkserver.py), the LiteLLM config through LiteLLM's own Router. They read the endpoint
from the environment (OPENAI_BASE_URL, OPENAI_API_KEY, KIMI_MODEL), as the page tells a user to set
it; the only additions are where to trust Caddy's internal CA (SSL_CERT_FILE, CURL_CA_BUNDLE).
Each snippet is also run with a wrong key and must fail with the 401, so no assertion here holds
whatever the snippet does.

vLLM answers the reasoning as `reasoning`, SGLang as `reasoning_content`; the fake engine writes
`reasoning_content`. A small shim between Caddy and the fake renames the field, so the Python
snippets and the LiteLLM config are proven against both spellings.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kimi_fleet.caddy import render_caddyfile
from kimi_fleet.verification.images import solid_png
from tests.fakes.fake_engine import ANSWER_TEXT, REASONING_TEXT
from tests.fakes import snippet_forkserver
from tests.fakes.harness import free_port, start_caddy, start_fake_engine
from tooling.mock_run import SECRET_SHOWN, run_stack

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "using-the-endpoint.md"
API_KEY = "snippet-test-key-0123456789"
MODEL = "kimi-k2.6"
RELEASE = "0123456789abcdef"
SERVED_CONTEXT = 131_072
STATUS = {"phase": "ready", "release": RELEASE}
SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)
NOT_RUN = re.compile(r"<!-- not run: [^>]{10,} -->\n```")
FENCE = re.compile(r"^```\w*$", re.MULTILINE)


def snippets() -> dict[str, tuple[str, str]]:
    """name -> (language, code)."""
    found: dict[str, tuple[str, str]] = {}
    for name, language, code in SNIPPET.findall(PAGE.read_text()):
        assert name not in found, f"two snippets named {name}"
        found[name] = (language, code)
    return found


# --- the endpoint: fake engine (optionally behind the vLLM-spelling shim) behind a real Caddy ---------


def _rename_reasoning(data: bytes) -> bytes:
    return data.replace(b'"reasoning_content"', b'"reasoning"')


class _VllmSpelling(BaseHTTPRequestHandler):
    """Forwards to the fake engine and renames reasoning_content to reasoning, streamed or not."""

    protocol_version = "HTTP/1.1"
    server: "_Shim"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        if (response.getheader("Content-Type") or "").startswith("text/event-stream"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in iter(response.readline, b""):
                line = _rename_reasoning(line)
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            data = _rename_reasoning(response.read())
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = _forward


class _Shim(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _VllmSpelling)
        self.upstream_port = upstream_port


@dataclass
class Endpoint:
    base_url: str
    root_ca: Path
    reasoning_field: str

    def env(self, api_key: str = API_KEY) -> dict[str, str]:
        """What a user's shell holds after the page's `outputs` snippet, plus the CA to trust."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "KIMI_"))}
        return {**env, "OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": api_key, "KIMI_MODEL": MODEL,
                "SSL_CERT_FILE": str(self.root_ca), "CURL_CA_BUNDLE": str(self.root_ca),
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@contextmanager
def serve(tmp: Path, reasoning_field: str):
    status_file = tmp / "status.json"
    status_file.write_text(json.dumps(STATUS))
    with start_fake_engine("good", "vllm", MODEL, options=("--max-model-len", str(SERVED_CONTEXT))) as fake:
        shim = None
        upstream = fake.upstream
        if reasoning_field == "reasoning":
            shim = _Shim(fake.port)
            threading.Thread(target=shim.serve_forever, daemon=True).start()
            upstream = f"127.0.0.1:{shim.server_address[1]}"
        try:
            https_port = free_port()
            caddyfile = render_caddyfile("localhost", [upstream], fake.health_uri, tls="internal",
                                         https_port=https_port, http_port=free_port(), bind_host="127.0.0.1",
                                         release=RELEASE, status_file=str(status_file))
            base_url = f"https://localhost:{https_port}/v1"
            with start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}, ready_url=f"{base_url}/models") as caddy:
                yield Endpoint(base_url, caddy.root_ca, reasoning_field)
        finally:
            if shim is not None:
                shim.shutdown()
                shim.server_close()


@pytest.fixture(scope="module")
def sglang_spelling(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("sglang-spelling"), "reasoning_content") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def vllm_spelling(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("vllm-spelling"), "reasoning") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def python_server():
    """Runs the Python snippets as `python -c` would, in forks of one process that imported openai
    (tests/fakes/snippet_forkserver.py), or None: each in an interpreter of its own."""
    if not snippet_forkserver.enabled():
        yield None
        return
    server = snippet_forkserver.SnippetServer({k: v for k, v in os.environ.items()
                                               if not k.startswith(("OPENAI_", "KIMI_"))})
    yield server
    server.close()


def run_snippet(name: str, env: dict[str, str], cwd: Path, python_server=None) -> subprocess.CompletedProcess:
    language, code = snippets()[name]
    if language == "python" and python_server is not None:
        return python_server.run(code, env, cwd, timeout=120)
    command = {"bash": ["bash", "-c", code], "python": [sys.executable, "-c", code]}[language]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def lines_starting(output: str, prefix: str) -> str:
    return "\n".join(line[len(prefix):].strip() for line in output.splitlines() if line.startswith(prefix))


# --- what each snippet must print ------------------------------------------------------------------


def check_curl_models(out: str, endpoint: Endpoint) -> None:
    assert [m["id"] for m in json.loads(out)["data"]] == [MODEL]


def check_curl_release(out: str, endpoint: Endpoint) -> None:
    assert out.strip().lower() == f"x-kimi-fleet-release: {RELEASE}"


def check_curl_status(out: str, endpoint: Endpoint) -> None:
    assert json.loads(out) == STATUS


def check_curl_instant(out: str, endpoint: Endpoint) -> None:
    message = json.loads(out)["choices"][0]["message"]
    assert message["content"] == ANSWER_TEXT
    assert not message.get("reasoning_content") and not message.get("reasoning")


def check_curl_stream(out: str, endpoint: Endpoint) -> None:
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(event)["choices"][0]["delta"] for event in events[:-1]]
    assert len(deltas) > 10  # streamed, not one answer
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING_TEXT
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER_TEXT


def check_thinking(out: str, endpoint: Endpoint) -> None:
    assert lines_starting(out, "reasoning:") == REASONING_TEXT
    assert lines_starting(out, "answer:") == ANSWER_TEXT


def check_instant(out: str, endpoint: Endpoint) -> None:
    assert lines_starting(out, "answer:") == ANSWER_TEXT


def check_tools(out: str, endpoint: Endpoint) -> None:
    name, arguments = lines_starting(out, "call:").split(" ", 1)
    assert name == "get_weather" and json.loads(arguments) == {"city": "Oslo", "unit": "celsius"}
    # The fake answers from the tool result only when it came back with the call's id.
    assert lines_starting(out, "answer:") == 'According to the tool: {"city": "Oslo", "temperature": 7, "unit": "celsius"}'


def check_image(out: str, endpoint: Endpoint) -> None:
    assert lines_starting(out, "answer:") == "The image is a solid blue square."


def check_context(out: str, endpoint: Endpoint) -> None:
    assert lines_starting(out, "served context:") == str(SERVED_CONTEXT)
    refused = lines_starting(out, "refused:")
    assert refused.startswith("400 ") and f"maximum context length is {SERVED_CONTEXT} tokens" in refused


CHECKS = {
    "curl-models": check_curl_models, "curl-release": check_curl_release, "curl-status": check_curl_status,
    "curl-instant": check_curl_instant, "curl-stream": check_curl_stream,
    "openai-thinking": check_thinking, "openai-instant": check_instant, "openai-stream": check_thinking,
    "openai-tools": check_tools, "openai-image": check_image, "openai-context": check_context,
}
#: checked by their own tests below
OTHERS = {"outputs", "litellm-config"}
PYTHON = [name for name in CHECKS if name.startswith("openai-")]
CURL = [name for name in CHECKS if name.startswith("curl-")]


def test_every_code_block_on_the_page_is_a_snippet_that_runs():
    text = PAGE.read_text()
    fences = len(FENCE.findall(text)) // 2
    assert fences == len(SNIPPET.findall(text)) + len(NOT_RUN.findall(text)), \
        "every code block is a named snippet (<!-- snippet: NAME -->) or says why it is not run"
    assert set(snippets()) == set(CHECKS) | OTHERS, "a snippet without a check here, or a check without its snippet"


@pytest.mark.parametrize("name", CURL)
def test_curl_snippet(name, sglang_spelling, tmp_path):
    done = run_snippet(name, sglang_spelling.env(), tmp_path)
    assert done.returncode == 0, done.stderr
    CHECKS[name](done.stdout, sglang_spelling)


@pytest.mark.parametrize("spelling", ["sglang_spelling", "vllm_spelling"])
@pytest.mark.parametrize("name", PYTHON)
def test_openai_snippet(name, spelling, request, tmp_path, python_server):
    endpoint = request.getfixturevalue(spelling)
    (tmp_path / "photo.png").write_bytes(solid_png((0, 0, 255)))
    done = run_snippet(name, endpoint.env(), tmp_path, python_server)
    assert done.returncode == 0, done.stderr
    CHECKS[name](done.stdout, endpoint)


@pytest.mark.parametrize("name", [*CURL, *PYTHON])
def test_every_snippet_fails_with_a_wrong_key(name, sglang_spelling, tmp_path, python_server):
    (tmp_path / "photo.png").write_bytes(solid_png((0, 0, 255)))
    done = run_snippet(name, sglang_spelling.env(api_key="wrong-key-0123456789"), tmp_path, python_server)
    assert done.returncode != 0
    assert "401" in done.stdout + done.stderr


def test_the_shim_really_renames(vllm_spelling):
    """The vLLM-spelling endpoint has no reasoning_content at all: the fallback is what passes."""
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(verify=str(vllm_spelling.root_ca), timeout=30) as client:
        message = client.post(f"{vllm_spelling.base_url}/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {API_KEY}"}).json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["reasoning"] == REASONING_TEXT


# --- the outputs snippet, with a `pulumi` that answers as the CLI does for this program's exports -----

PULUMI_STUB = '''#!{python}
"""`pulumi stack output [--show-secrets] NAME` for the outputs in $STUB_OUTPUTS; secrets masked."""
import json, os, sys
args = sys.argv[1:]
show = "--show-secrets" in args
args = [a for a in args if a != "--show-secrets"]
if args[:2] != ["stack", "output"] or len(args) != 3:
    sys.exit(f"stub pulumi: unsupported {{sys.argv[1:]}}")
outputs = json.load(open(os.environ["STUB_OUTPUTS"]))
name = args[2]
if name not in outputs["values"]:
    sys.exit(f"error: current stack does not have output property '{{name}}'")
print("[secret]" if name in outputs["secret"] and not show else outputs["values"][name])
'''


@pytest.fixture(scope="module")
def program_outputs():
    """The program's exports, and which are secret, from a mock run of a real stack."""
    run = run_stack("h200-int4-sglang")
    assert run.error is None, run.error
    return run.outputs


def test_outputs_snippet_reads_the_programs_real_outputs(program_outputs, sglang_spelling, tmp_path):
    secret = sorted(name for name, value in program_outputs.items() if value == SECRET_SHOWN)
    assert secret == ["api_key"]
    assert program_outputs["model"] == MODEL
    values = {**{name: str(value) for name, value in program_outputs.items()},
              "openai_base_url": sglang_spelling.base_url, "api_key": API_KEY}
    (tmp_path / "outputs.json").write_text(json.dumps({"values": values, "secret": secret}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "pulumi"
    stub.write_text(PULUMI_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {k: v for k, v in sglang_spelling.env().items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "KIMI_MODEL")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_OUTPUTS=str(tmp_path / "outputs.json"))
    # The page's outputs snippet, then its first request, in one shell.
    script = snippets()["outputs"][1] + "\n" + snippets()["curl-models"][1] + "\n" + 'printf "\\nmodel=%s\\n" "$KIMI_MODEL"'
    done = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listing, model_line = done.stdout.strip().rsplit("\n", 1)
    check_curl_models(listing, sglang_spelling)
    assert model_line == f"model={MODEL}"


# --- the LiteLLM config, loaded by LiteLLM itself ------------------------------------------------

LITELLM_RUN = textwrap.dedent('''
    import json, os, sys
    import litellm, yaml
    config = yaml.safe_load(sys.stdin.read())
    results = []
    for base_url, api_key in json.loads(os.environ["ENDPOINTS"]):
        os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = base_url, api_key
        router = litellm.Router(model_list=config["model_list"], num_retries=0)
        for entry in config["model_list"]:
            try:
                message = router.completion(model=entry["model_name"],
                                            messages=[{"role": "user", "content": "hi"}]).choices[0].message
                results.append({"model_name": entry["model_name"], "key": api_key, "content": message.content,
                                "reasoning_content": getattr(message, "reasoning_content", None)})
            except litellm.AuthenticationError as error:
                results.append({"model_name": entry["model_name"], "key": api_key, "error": "401",
                                "status": error.status_code})
    print(json.dumps(results))
''')


@pytest.mark.timeout(300)
def test_litellm_config_through_litellms_own_router(sglang_spelling, vllm_spelling, tmp_path):
    pytest.importorskip("litellm", reason="litellm is in requirements-dev.txt")
    config = yaml.safe_load(snippets()["litellm-config"][1])
    entries = config["model_list"]
    assert [e["model_name"] for e in entries] == [MODEL, f"{MODEL}-instant"]
    for entry in entries:
        params = entry["litellm_params"]
        assert params["model"] == f"openai/{MODEL}"
        assert params["api_base"] == "os.environ/OPENAI_BASE_URL" and params["api_key"] == "os.environ/OPENAI_API_KEY"
    endpoints = [(sglang_spelling.base_url, API_KEY), (vllm_spelling.base_url, API_KEY),
                 (sglang_spelling.base_url, "wrong-key-0123456789")]
    env = {**sglang_spelling.env(), "ENDPOINTS": json.dumps(endpoints),
           # both Caddies' internal CAs
           "SSL_CERT_FILE": str(_bundle(tmp_path, sglang_spelling.root_ca, vllm_spelling.root_ca))}
    done = subprocess.run([sys.executable, "-c", LITELLM_RUN], input=snippets()["litellm-config"][1], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    good = [r for r in results if r["key"] == API_KEY]
    assert len(good) == 4 and all(r["content"] == ANSWER_TEXT for r in good), results
    # Thinking by default, with the reasoning in reasoning_content whichever spelling the engine used;
    # the instant entry's extra_body turns it off.
    assert [r["reasoning_content"] for r in good] == [REASONING_TEXT, None, REASONING_TEXT, None]
    wrong = [r for r in results if r["key"] != API_KEY]
    assert [r.get("status") for r in wrong] == [401, 401], wrong


def _bundle(tmp_path: Path, *cas: Path) -> Path:
    bundle = tmp_path / "cas.pem"
    bundle.write_text("".join(ca.read_text() for ca in cas))
    return bundle
