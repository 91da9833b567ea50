#!/usr/bin/env python3
"""A fleet node's calls to its steward (kimi_fleet/steward.py; standard library only, shipped beside
the watchdog and the drain, which import it).

The node's role may not complete lifecycle actions or set scale-in protection itself: it asks the
stack's steward, a Lambda function URL with AuthType AWS_IAM, with a POST signed by AWS Signature
Version 4 (service "lambda", the URL's region) under the instance profile's credentials. Those come
from IMDSv2 at each call and stay in this process's memory: never in an argv, an environment or a
file. The URL is read from the SSM parameter node.env names (STEWARD_URL_PARAMETER, under the
stack's prefix: only the deployer writes it) and must be a function URL of the node's own region.
The body names the action only (the steward takes the instance from the signature's identity).

    call(action, result=None, imds_get=..., aws=...) -> what the steward did, or StewardError

`imds_get` (path -> text, IMDSv2) and `aws` (argv -> CompletedProcess, the AWS CLI) are the caller's
(watchdog.imds_get, watchdog.aws): one metadata reader and one CLI runner per node.
KIMI_STEWARD_ENDPOINT (tests only): where to send the request; it is still signed for the URL's host.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

#: A Lambda function URL (Lambda developer guide: https://<url-id>.lambda-url.<region>.on.aws).
FUNCTION_URL = re.compile(r"https://([a-z0-9]{20,63})\.lambda-url\.([a-z]{2}(?:-[a-z]+)+-\d)\.on\.aws/?")
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
#: The instance profile's role name as IMDS lists it.
ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}")
ACTIONS = ("complete-admission", "complete-drain", "protect", "unprotect")
TIMEOUT_SECONDS = 30


class StewardError(RuntimeError):
    pass


def steward_url(parameter: str, region: str, aws) -> str:
    """The function URL from its SSM parameter, checked: a function URL of the node's own region."""
    if not parameter:
        raise StewardError("node.env names no STEWARD_URL_PARAMETER: this node is in no fleet")
    found = aws(["ssm", "get-parameter", "--name", parameter, "--query", "Parameter.Value", "--output", "text",
                 "--region", region])
    if found.returncode != 0:
        raise StewardError(f"reading {parameter}: {(found.stderr or found.stdout).strip()[-300:]}")
    url = found.stdout.strip()
    shape = FUNCTION_URL.fullmatch(url)
    if shape is None or shape.group(2) != region:
        raise StewardError(f"{parameter} holds {url[:120]!r}, not a Lambda function URL in {region}")
    return url.rstrip("/") + "/"


def instance_credentials(imds_get) -> dict:
    """The instance profile's current credentials (IMDSv2): AccessKeyId, SecretAccessKey, Token."""
    listed = imds_get(CREDENTIALS_PATH).splitlines()
    role = listed[0].strip() if listed else ""
    if not ROLE_NAME.fullmatch(role):
        raise StewardError(f"the instance metadata service names no instance profile role ({role[:64]!r})")
    found = json.loads(imds_get(CREDENTIALS_PATH + role))
    if found.get("Code", "Success") != "Success" or not all(found.get(k) for k in ("AccessKeyId", "SecretAccessKey",
                                                                                    "Token")):
        raise StewardError(f"the instance metadata service gave no credentials for {role} ({found.get('Code')})")
    return found


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signed_headers(url: str, region: str, body: bytes, credentials: dict, now: datetime.datetime) -> dict[str, str]:
    """SigV4 headers for a POST of `body` to `url` (AWS general reference, "Create a signed AWS API
    request"): every header below is signed, the payload's SHA-256 included."""
    parts = urllib.parse.urlsplit(url)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"content-type": "application/json", "host": parts.netloc, "x-amz-date": stamp,
               "x-amz-security-token": credentials["Token"]}
    names = ";".join(sorted(headers))
    payload = hashlib.sha256(body).hexdigest()
    canonical = "\n".join(["POST", parts.path or "/", "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", names,
                           payload])
    scope = f"{day}/{region}/lambda/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + credentials["SecretAccessKey"]).encode(), day), region), "lambda"),
                "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials['AccessKeyId']}/{scope}, "
                                f"SignedHeaders={names}, Signature={signature}")
    return headers


def call(action: str, result: str | None = None, *, parameter: str, region: str, imds_get, aws) -> str:
    """Ask the steward for `action` on this instance; what it did, or StewardError with its reason."""
    if action not in ACTIONS:
        raise ValueError(f"unknown steward action {action!r}")
    url = steward_url(parameter, region, aws)
    body = json.dumps({"action": action, **({"result": result} if result else {})}).encode()
    try:
        headers = signed_headers(url, region, body, instance_credentials(imds_get),
                                 datetime.datetime.now(datetime.timezone.utc))
    except (OSError, ValueError, KeyError) as error:
        raise StewardError(f"no instance credentials ({error.__class__.__name__}: {error})") from None
    override = os.environ.get("KIMI_STEWARD_ENDPOINT", "").rstrip("/")
    target = f"{override}/" if override else url
    request = urllib.request.Request(target, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read().decode())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            reason = json.loads(text).get("reason") or json.loads(text).get("Message") or text
        except (ValueError, AttributeError):
            reason = text
        raise StewardError(f"the steward refused {action} ({error.code}): {str(reason)[:300]}") from None
    except (OSError, ValueError) as error:
        raise StewardError(f"the steward did not answer {action} ({error.__class__.__name__}: {error})") from None
    if not answer.get("ok"):
        raise StewardError(f"the steward did not do {action}: {answer}")
    return str(answer.get("done"))
