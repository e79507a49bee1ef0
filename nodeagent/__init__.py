"""nodeagent: an ambient-style (sidecarless) service-mesh node agent."""

__version__ = "0.1.0"
