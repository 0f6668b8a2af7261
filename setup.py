"""Build of dshal's one compiled module; everything else is declared in pyproject.toml.

``dshal.backends.numpy._native`` holds the numpy backend's fused elementwise loops. It is
optional: where no C compiler is available the build goes on without it and the backend runs
the same arithmetic in numpy passes (bitwise the same results, slower; ``dshal info`` says
which). ``-ffp-contract=off`` keeps every multiply and add rounded on its own, as numpy does;
``-fno-trapping-math`` lets the clipping compares vectorise (it changes no result).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
setup(ext_modules=[Extension("dshal.backends.numpy._native", ["dshal/backends/numpy/_native.c"],
                             extra_compile_args=flags, optional=True),
                   # the fused decode of the serving forms (dshal/backends/numpy/decode.py)
                   Extension("dshal.backends.numpy._decode", ["dshal/backends/numpy/_decode.c"],
                             extra_compile_args=flags, optional=True)])
