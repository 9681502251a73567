"""sockwatch: the kernel's socket demultiplexing table, live, from stable BPF hooks."""

__version__ = "0.1.0"
