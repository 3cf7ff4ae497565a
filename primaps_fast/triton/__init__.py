"""Triton kernels (CUDA; on the CPU under TRITON_INTERPRET=1), one module per stage.

Modules here import triton at import time; ops import them only when the Triton backend is chosen.
"""
