"""Attention kernels: Triton on CUDA, a pure-PyTorch reference everywhere."""
