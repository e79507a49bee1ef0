"""Delta-xDS client: sans-IO protocol core (protocol.py) and its gRPC edge (client.py)."""
