"""sipfarm: a SIP/VoIP farm (load balancer, Redis-backed registrar/proxy nodes, RTP relays)."""

__version__ = "0.1.0"
