"""Triton kernels (GPU, or the CPU under TRITON_INTERPRET=1 in float32). Imported lazily: triton is optional."""
