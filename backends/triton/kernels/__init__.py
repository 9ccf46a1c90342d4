"""Hand-written Triton kernels for blade's own ops; each module imports triton, this package does not.

attention -- blade::flash_attention's CUDA kernel (FlashAttention-2-style forward); `install()` registers it.
qgemm -- blade::qlinear's CUDA kernels (int8/fp8 activation quantization, int8 x int8 -> int32 and fp8 GEMMs,
         int8 weight-only GEMM, scales and bias in the epilogue); `install()` registers them.
"""
