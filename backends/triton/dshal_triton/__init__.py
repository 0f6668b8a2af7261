"""dshal-triton: dshal's operators as Triton kernels (tensor-core tiles, fp32 accumulation) on
every GPU family Triton reaches, certified on the CPU under Triton's interpreter."""

__version__ = "0.1.0"
