"""A fleet steward's function URL on loopback, as Lambda fronts it with AuthType AWS_IAM: it checks the
request's SigV4 signature (recomputed with botocore's SigV4Auth from the credentials it was given:
not the node's own signer), answers 403 {"Message": "Forbidden"} as Lambda does to a request it cannot
authenticate, and otherwise calls the real handler (kimi_fleet.steward.handle) with the event Lambda
would build: requestContext.authorizer.iam.userArn the session of `role` named for `instance` (an
instance profile's credentials), the body as sent. Every request is kept (headers, body, verdict)."""

from __future__ import annotations

import datetime
import http.server
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kimi_fleet import steward

from tests.fakes.harness import serve_on_loopback

ACCOUNT = "123456789012"
URL_ID = "abcdefghijklmnopqrstuvwxyz012345"
CREDENTIALS = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAEXAMPLENODEKEY01",
               "SecretAccessKey": "node-secret-key/+example0123456789abcdefg", "Token": "node-session-token-Zx9==",
               "Expiration": "2026-12-08T09:00:00Z"}


def function_url(region: str) -> str:
    return f"https://{URL_ID}.lambda-url.{region}.on.aws/"


def instance_metadata(role: str) -> dict[str, str]:
    """What IMDS serves for the instance profile (tests/fakes/imds.py paths)."""
    return {"iam/security-credentials/": role, f"iam/security-credentials/{role}": json.dumps(CREDENTIALS)}


def expected_signature(method: str, url: str, headers: dict[str, str], body: bytes, region: str) -> str:
    """The signature botocore computes for the same request, headers and time."""
    request = AWSRequest(method=method, url=url, data=body, headers=headers)
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(CREDENTIALS["AccessKeyId"], CREDENTIALS["SecretAccessKey"], CREDENTIALS["Token"]),
                       "lambda", region)
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)


@contextmanager
def start_steward(region: str, role: str, instance: str, autoscaling, environment: dict[str, str],
                  verdicts: list | None = None, before_answer: Callable[[dict], None] | None = None) -> Iterator[str]:
    """Serve the function URL; yields its loopback address (KIMI_STEWARD_ENDPOINT). `autoscaling`: the
    handler's Auto Scaling client; `verdicts`: filled with one dict per request; `before_answer`: called
    with the request's record (and the caller's port) before the answer, the caller still waiting."""
    verdicts = [] if verdicts is None else verdicts
    host = f"{URL_ID}.lambda-url.{region}.on.aws"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            record = {"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body.decode()}
            verdicts.append(record)
            if before_answer is not None:
                before_answer({**record, "client_port": self.client_address[1]})
            reason = self._authenticate(body, record["headers"])
            record["authenticated"] = reason is None
            if reason is not None:
                record["reason"] = reason
                return self._answer(403, json.dumps({"Message": "Forbidden"}))
            event = {"version": "2.0", "rawPath": self.path, "rawQueryString": "", "isBase64Encoded": False,
                     "headers": record["headers"], "body": body.decode(),
                     "requestContext": {"http": {"method": "POST", "path": self.path},
                                        "authorizer": {"iam": {
                                            "accessKey": CREDENTIALS["AccessKeyId"], "accountId": ACCOUNT,
                                            "userArn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{instance}"}}}}
            answer = steward.handle(event, autoscaling, environment)
            record["status"] = answer["statusCode"]
            self._answer(answer["statusCode"], answer["body"])

        def _authenticate(self, body: bytes, headers: dict[str, str]) -> str | None:
            authorization = headers.get("authorization", "")
            if not authorization.startswith("AWS4-HMAC-SHA256 "):
                return "no SigV4 authorization"
            fields = dict(part.strip().split("=", 1) for part in authorization.removeprefix("AWS4-HMAC-SHA256 ")
                          .split(","))
            key, day, scope_region, service, terminator = fields["Credential"].split("/")
            if (key, scope_region, service, terminator) != (CREDENTIALS["AccessKeyId"], region, "lambda",
                                                            "aws4_request"):
                return f"credential scope {fields['Credential']}"
            if headers.get("host") != host:
                return f"host {headers.get('host')}"
            signed = fields["SignedHeaders"].split(";")
            if not {"host", "x-amz-date", "x-amz-security-token"} <= set(signed):
                return f"signed headers {signed}"
            stamp = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
            if abs((datetime.datetime.utcnow() - stamp).total_seconds()) > 300 or day != stamp.strftime("%Y%m%d"):
                return f"stale date {headers['x-amz-date']}"
            expected = expected_signature("POST", f"https://{host}{self.path}", {h: headers[h] for h in signed},
                                          body, region)
            if fields["Signature"] != expected:
                return "signature mismatch"
            if headers["x-amz-security-token"] != CREDENTIALS["Token"]:
                return "session token"
            return None

    with serve_on_loopback(Handler) as url:
        yield url


class RecordingAutoScaling:
    """The handler's Auto Scaling client where a test has no API behind the steward: it answers the
    lookup from `describe` (instance -> (group, lifecycle state)) and records each call it makes
    (one JSON object per line of `calls`: the operation and its parameters); `on_call` sees each."""

    def __init__(self, calls, describe: Callable[[str], tuple[str, str] | None],
                 on_call: Callable[[str, dict], None] | None = None):
        self.calls, self.describe, self.on_call = calls, describe, on_call

    def describe_auto_scaling_instances(self, InstanceIds):  # noqa: N803  (boto3's names)
        found = self.describe(InstanceIds[0])
        return {"AutoScalingInstances": [] if found is None else [
            {"InstanceId": InstanceIds[0], "AutoScalingGroupName": found[0], "LifecycleState": found[1]}]}

    def _record(self, operation: str, parameters: dict) -> dict:
        with open(self.calls, "a") as out:
            out.write(json.dumps({"operation": operation, **parameters}) + "\n")
        if self.on_call:
            self.on_call(operation, parameters)
        return {}

    def complete_lifecycle_action(self, **parameters):
        return self._record("complete_lifecycle_action", parameters)

    def set_instance_protection(self, **parameters):
        return self._record("set_instance_protection", parameters)


def recorded(calls, operation: str) -> list[dict]:
    try:
        lines = open(calls).read().splitlines()
    except FileNotFoundError:
        return []
    return [c for c in map(json.loads, lines) if c["operation"] == operation]
