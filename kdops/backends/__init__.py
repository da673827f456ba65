"""The kernels of kdops, one folder per backend: triton/ (Triton), native/ (launchers of the C++ / CUDA modules)."""
