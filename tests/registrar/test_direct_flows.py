"""DirectFlows: the UDP flows registered straight to a node, whose STUN keep-alives it answers."""

from __future__ import annotations

from sipfarm.registrar.flows import DirectFlows
from sipfarm.sip.address import Address

PHONE = Address("udp", "192.0.2.10", 5060)
OTHER = Address("udp", "192.0.2.10", 5062)


def test_a_registered_flow_is_allowed_until_its_binding_expires() -> None:
    flows = DirectFlows()
    assert not flows.allows(PHONE, 100.0)
    flows.registered(PHONE, 400.0)
    assert flows.allows(PHONE, 399.0)
    assert not flows.allows(OTHER, 399.0)  # another port of the same host is another flow
    assert not flows.allows(PHONE, 400.0)
    assert len(flows) == 0  # an expired flow is forgotten when looked at


def test_removing_the_bindings_ends_the_flow() -> None:
    flows = DirectFlows()
    flows.registered(PHONE, 400.0)
    flows.registered(PHONE, 0.0)
    assert not flows.allows(PHONE, 100.0)


def test_at_most_size_flows_the_oldest_registration_forgotten_first() -> None:
    flows = DirectFlows(size=3)
    phones = [Address("udp", "192.0.2.10", 5000 + i) for i in range(4)]
    for phone in phones[:3]:
        flows.registered(phone, 1000.0)
    flows.registered(phones[0], 1000.0)  # a refresh makes it the newest
    flows.registered(phones[3], 1000.0)
    assert len(flows) == 3
    assert [flows.allows(p, 0.0) for p in phones] == [True, False, True, True]
