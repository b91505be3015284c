"""A full transaction table answers 503 (memory bounded) and the node stays up."""

from __future__ import annotations

import os
import secrets

from fixtures.farm import DOMAIN, SipClient


def test_transaction_table_full_gives_503_and_node_stays_up(redis_url, accounts, start_node, monkeypatch):
    monkeypatch.setenv("SIPFARM_MAX_TRANSACTIONS", "10")
    node = start_node(redis_url)
    assert os.environ["SIPFARM_MAX_TRANSACTIONS"] == "10"
    client = SipClient()
    statuses = []
    try:
        # OPTIONS routed to the node are answered at once in a transaction, which then absorbs
        # retransmissions for Timer J (32 s over UDP), so the table fills (a bare keep-alive
        # OPTIONS is answered statelessly and would not)
        host, port = node.address
        for _ in range(15):
            route = (("route", f"<sip:{host}:{port};lr>"),)
            req = client.request("OPTIONS", f"sip:{DOMAIN}", call_id=secrets.token_hex(6), headers=route)
            client.send(req, node.address)
            reply = client.recv_final(call_id=req.call_id)  # a late answer to the last one is not this one's
            statuses.append(reply.status if reply is not None else None)
        assert 200 in statuses
        assert 503 in statuses
        full = [s for s in statuses if s == 503]
        assert len(full) >= 5
        assert node.process.poll() is None
    finally:
        client.close()
