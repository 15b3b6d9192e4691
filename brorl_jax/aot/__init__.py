"""Ahead-of-time compiles for accelerators this host does not have: GPU
targets and topologies (`topology`), the devices a dry run compiles for and
their memory (`devices`), the cost of compiled programs (`hlo_cost`) and the
step-time estimate built on it (`estimate`)."""
