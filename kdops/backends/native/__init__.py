"""Launchers of the native kernels (``csrc/``): one module per family, all through ``_module``."""
