"""dshal's OpenCL backend (entry point ``opencl`` in ``dshal.backends``).

``plugin`` holds the hook implementations; ``device`` finds and opens the OpenCL device;
``programs`` builds kernels through the on-disk program cache (``cache``); the operators run
through the launch sequences shared with the CuPy backends (``dshal_kernels.host``), in a
``device.Session``. ``import dshal`` never imports this package, and this
package imports pyopencl only when a hook needs it.
"""

__version__ = "0.1.0"
