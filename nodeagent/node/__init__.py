"""Lifecycle of the meshed pods on this node: discovery, capture, listeners, retries."""
