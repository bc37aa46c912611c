"""Policies, critics and the algorithms; algorithms/registry.py names them for ``--algo``."""
