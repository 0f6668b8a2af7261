"""dshal's PyTorch backend (entry point ``torch`` in ``dshal.backends``).

``plugin`` holds the hook implementations; ``device`` is the probe and the per-device
refusals; ``numerics`` the exact rounding, division and IEEE-fp32 matmul helpers that
``quantize``, ``gemm`` and ``gated`` compute with. Attention is ``dshal.torch.attention``
(dshal core: its autograd backward shares the forward's tiling). ``import dshal`` never imports
this package, and the plugin module imports torch only when a run hook needs it.
"""

__version__ = "0.1.0"
