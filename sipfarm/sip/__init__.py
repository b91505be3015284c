"""Sans-IO SIP core: messages, parser, URIs, transactions, digest auth. No sockets, no clock."""
