"""Hand-written Triton kernels for blade's own ops; each module imports triton, this package does not.

attention -- blade::flash_attention's CUDA kernel (FlashAttention-2-style forward); `install()` registers it.
"""
