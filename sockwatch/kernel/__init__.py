"""Everything that talks to the kernel: BPF, netlink sock_diag, /proc, namespaces."""
