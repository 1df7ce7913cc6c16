"""Routing between hosts: the node registry, the pure route planner and the route writer."""
