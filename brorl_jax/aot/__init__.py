"""Ahead-of-time compiles for accelerators this host does not have: GPU
targets and topologies (`topology`), the cost of compiled programs
(`hlo_cost`) and the step-time estimate built on it (`estimate`)."""
