"""overcommit: trace KSM and memory ballooning with eBPF."""
__version__ = "0.1.0"
