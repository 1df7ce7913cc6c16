"""Multi-host end-to-end tests: simulated hosts in network namespaces (see cluster.py)."""
