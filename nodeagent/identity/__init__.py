"""Workload identity: keys, CSRs, the CA client, the certificate manager, TLS contexts."""
