"""Helpers of the multi-host tests: an emulated cluster of namespaced hosts."""
