"""blade's hand-written kernels for its own ops, and the one registry (registry.py) that picks among them per call.

registry -- which kernel runs blade::flash_attention / blade::qlinear on a device, in what order; describe() for reports
attention_native -- flash_attention's fused bf16 CPU kernel (attention_bf16.cpp, compiled on first use)
attention_blocked -- flash_attention's bf16 CPU kernel in Python: query blocks through PyTorch's bf16 GEMMs
attention_triton -- flash_attention's CUDA kernel (FlashAttention-2-style forward, Triton)
qgemm_triton -- qlinear's CUDA kernels (int8/fp8 activation quantization and GEMMs, int8 weight-only GEMM, Triton)

Importing this package loads none of them (registry.py imports a kernel's module on the first call it could take).
"""
