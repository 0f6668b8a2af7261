"""Deliberately broken backends: each is the numpy backend with one realistic bug.

Each module exposes ``plugin``, registered through the ``dshal.backends`` entry-point group by
``tests/test_conformance_selftest.py``; certification must fail each of them, naming the
operator and the case that caught the bug.
"""

#: backend name -> (module, the operator whose certification must fail)
BROKEN = {
    "bb_window_off_by_one": ("window_off_by_one", "sparse_attention"),
    "bb_causal_top_left": ("causal_top_left", "sparse_attention"),
    "bb_nan_leak": ("nan_leak", "sparse_attention"),
    "bb_gqa_ignored": ("gqa_ignored", "sparse_attention"),
    "bb_own_block_missing": ("own_block_missing", "sparse_attention"),
    "bb_swallowed_error": ("swallowed_error", "sparse_attention"),
    "bb_fp32_as_bf16": ("fp32_as_bf16", "gemm"),
    "bb_per_tensor_scales": ("per_tensor_scales", "quantize"),
    "bb_int8_wrap": ("int8_wrap", "gemm"),
    "bb_fp8_no_saturation": ("fp8_no_saturation", "quantize"),
    "bb_closed_channels_computed": ("closed_channels_computed", "gated_channels"),
    "bb_soft_threshold": ("soft_threshold", "gated_channels"),
    "bb_varlen_boundary_off_by_one": ("varlen_boundary_off_by_one", "sparse_attention"),
    "bb_varlen_packed_alignment": ("varlen_packed_alignment", "sparse_attention"),
    "bb_pages_in_pool_order": ("pages_in_pool_order", "sparse_attention"),
    "bb_block_keys_ignored": ("block_keys_ignored", "sparse_attention"),
}
