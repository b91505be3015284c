"""Where a request goes: the one routing step of the proxy (router table, LDAP, helpers later)."""
