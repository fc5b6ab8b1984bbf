"""The DARE attention backend and its Triton kernels."""
