"""What the endpoint promises its clients beyond the OpenAI API: the routes and header the proxy
adds. Standard library only: the verification suite imports it on nodes, where the rest of the
package (and pydantic) is not installed."""

import re

#: The node's cold-start status, behind the key.
STATUS_PATH = "/kimi-fleet/status"
#: Which release answered: only on proxied (authenticated) answers.
RELEASE_HEADER = "X-Kimi-Fleet-Release"
RELEASE_PATTERN = re.compile(r"[0-9a-f]{16}")
