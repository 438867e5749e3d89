"""Triton attention kernels against PyTorch SDPA, on a GPU (smoke runs on a CPU under TRITON_INTERPRET=1)."""
