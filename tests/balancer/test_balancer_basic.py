"""A balancer in front of two nodes: REGISTER and calls through it with SIPp-free clients."""

from __future__ import annotations

from fixtures.farm import SipClient, wait_nodes_usable


def test_register_through_balancer_adds_path(redis_url, accounts, start_node, start_balancer):
    start_node(redis_url, "node1")
    start_node(redis_url, "node2")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 2)
    client = SipClient()
    try:
        reply = client.register(lb.address, "alice", accounts["alice"], extra=(("supported", "path"),))
        assert reply is not None and reply.status == 200, lb.log()[-2000:]
        paths = reply.values("path")
        assert paths and b"@127.0.0.1:%d" % lb.port in paths[0]
    finally:
        client.close()


def test_no_node_gives_503_with_retry_after(redis_url, start_balancer):
    lb = start_balancer(redis_url)
    client = SipClient()
    try:
        req = client.request("INVITE", "sip:bob@farm.test")
        client.send(req, lb.address)
        reply = client.recv_final()
        assert reply is not None and reply.status == 503
        assert reply.get("retry-after") is not None
    finally:
        client.close()
