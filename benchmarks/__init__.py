"""Benchmark building blocks: SIPp scenarios and runner, a Kamailio reference server, rate search."""
