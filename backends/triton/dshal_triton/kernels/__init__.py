"""The Triton kernel sources of the triton backend: one ``@triton.jit`` kernel per stage, no
launch logic (the launchers live in :mod:`dshal_triton.gemm`, :mod:`~dshal_triton.quantize`,
:mod:`~dshal_triton.gated` and :mod:`~dshal_triton.attention`). The same sources are run on
GPUs, under Triton's interpreter, and compiled ahead of time by :mod:`dshal_triton.aot`."""
