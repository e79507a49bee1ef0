"""nodeagent-cni: the chained CNI plugin that hands each new pod to the agent before it starts.

`protocol` is the pure part (network config, CNI_* environment, spec errors, the agent
request and reply), `plugin` the executable, `install` the node CNI configuration step.
This package is imported by the plugin on every pod start: keep its imports cheap.
"""
