"""Build of dshal's compiled modules; everything else is declared in pyproject.toml.

``dshal.backends.numpy._native`` holds the numpy backend's fused elementwise loops. It is
optional: where no C compiler is available the build goes on without it and the backend runs
the same arithmetic in numpy passes (bitwise the same results, slower; ``dshal info`` says
which). ``-ffp-contract=off`` keeps every multiply and add rounded on its own, as numpy does;
``-fno-trapping-math`` lets the clipping compares vectorise (it changes no result).

``dshal.backends.numpy._attention`` is the numpy backend's compiled float32 attention, forward
and backward of sparse_attention (optional too: without it the forward runs in numpy passes and
the backward on another backend that declares it). It owes no bitwise agreement to a numpy
pass, so it contracts multiply-adds into FMAs, and ``-fopenmp-simd`` vectorises its loops
(OpenMP SIMD pragmas only: no runtime).
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"] if unix else []
backward_flags = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp-simd"] \
    if unix else []
exp2 = ["dshal/backends/numpy/_exp2.h"]
buffers = ["dshal/backends/numpy/_buffer.h"]
setup(ext_modules=[
    Extension("dshal.backends.numpy._native", ["dshal/backends/numpy/_native.c"],
              depends=exp2, extra_compile_args=flags, optional=True),
    Extension("dshal.backends.numpy._attention", ["dshal/backends/numpy/_attention.c"],
              depends=exp2 + buffers + ["dshal/backends/numpy/_attention_tiles.h"],
              extra_compile_args=backward_flags, optional=True),
    # the fused decode of the serving forms (dshal/backends/numpy/decode.py)
    Extension("dshal.backends.numpy._decode", ["dshal/backends/numpy/_decode.c"],
              depends=exp2 + buffers, extra_compile_args=flags, optional=True),
])
