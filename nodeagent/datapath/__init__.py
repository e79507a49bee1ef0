"""In-pod capture: rule plans, the iptables backend, namespace helpers, pod discovery."""
