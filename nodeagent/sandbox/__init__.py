"""A local "cluster" of network namespaces: an underlay, nodes, pods and demo apps.

`plan` computes names, addresses and routes as pure data; `netns` and
`processes` are the OS adapters (pyroute2, process spawning); `manager`
drives them and keeps the state file that lets `down` finish any half-built
sandbox; `demoapp` is the HTTP/echo app run in every pod; `demo` is the
newcomer's tour.
"""
