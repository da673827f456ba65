"""Triton kernels of kdops (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
