"""The kernel through netlink: veths, addresses, routes, tunnels, neighbours and FDB."""
