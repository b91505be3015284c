"""RTP media relays for sipfarm."""
