"""The data path: outbound, inbound and the byte relay between connections."""
