#!/usr/bin/env python3
"""An example routing helper program for sipfarm (see sipfarm/routing/helpers.py).

sipfarm keeps it running and writes one query a line on its stdin, a JSON object of strings
chosen by the node (``method``, ``caller``, ``callee``, ``source``, selected headers); it must
write exactly one answer a line on stdout, in order, and flush it:

    {"action": "local"}
    {"action": "forward", "uri": "sip:+15551234@127.0.0.1:15090"}
    {"action": "alias", "targets": ["sip:alice@farm.test", "sip:bob@farm.test"]}
    {"action": "redirect", "uri": "sip:alice@elsewhere.test", "status": 302}
    {"action": "reject", "status": 403, "reason": "Forbidden"}

Here: callee numbers starting with +1555 go to the gateway (127.0.0.1:15090, or the host:port
given as the program's first argument), numbers starting with +1900 are refused, everything else
is a local user.  Configure it with

    [routing.helper]
    program = ["python3", "examples/route_helper.py"]          # or [..., "192.0.2.5:5060"]
"""

from __future__ import annotations

import json
import sys

DEFAULT_GATEWAY = "127.0.0.1:15090"


def route(query: dict[str, str], gateway: str = DEFAULT_GATEWAY) -> dict[str, object]:
    callee = query.get("callee", "")
    scheme, _, rest = callee.partition(":")
    if scheme.lower() not in ("sip", "sips"):
        return {"action": "local"}
    user = rest.partition("@")[0].partition(";")[0]
    if user.startswith("+1555") and user[1:].isdigit():
        return {"action": "forward", "uri": f"sip:{user}@{gateway}"}
    if user.startswith("+1900"):
        return {"action": "reject", "status": 403, "reason": "Premium numbers barred"}
    return {"action": "local"}


def main() -> None:
    gateway = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GATEWAY
    for line in sys.stdin:
        try:
            query = json.loads(line)
            answer = route(query, gateway) if isinstance(query, dict) else {"action": "local"}
        except ValueError:
            answer = {"action": "local"}  # one answer per line, whatever came in
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
