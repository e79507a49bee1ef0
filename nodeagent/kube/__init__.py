"""The Kubernetes API server, for the few calls the agent makes to it.

`api` (pure) holds the interface the rest of the agent depends on (`KubeApi`),
the response type and the bodies it sends; `shutdown` (pure) decides upgrade
versus uninstall from the agent's DaemonSet; `client` is the HTTPS adapter.
"""
