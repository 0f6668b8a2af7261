"""dshal's Huawei Ascend backend (entry point ``ascend`` in ``dshal.backends``).

``plugin`` declares the backend and takes its run hooks from :mod:`dshal_torch.plugin` (the
generic torch path: no logic of its own); ``device`` is the NPU probe and the
``DSHAL_ASCEND_DEVICE`` switch that serves torch CPU tensors instead, for certification on a
machine without an NPU. ``import dshal`` never imports this package; torch_npu is imported by
the probe only when it is installed.
"""

__version__ = "0.1.0"
