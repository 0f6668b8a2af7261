"""Deliberately broken backends: each is the numpy backend with one realistic bug.

Each module exposes ``plugin``, registered through the ``dshal.backends`` entry-point group by
``tests/test_conformance_selftest.py``; certification must fail each of them, naming the
operator and the case that caught the bug.
"""

#: backend name -> (module, or module:attribute of the plugin object when a module holds
#: several; the operator whose certification must fail)
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
    # the backward of sparse_attention (plugin API 2)
    "bb_dk_no_scale": ("backward_bugs:dk_no_scale", "sparse_attention_backward"),
    "bb_grad_leak": ("backward_bugs:grad_leak", "sparse_attention_backward"),
    "bb_nan_reaches_dq": ("backward_bugs:nan_reaches_dq", "sparse_attention_backward"),
    "bb_dv_per_query_head": ("backward_bugs:dv_per_query_head", "sparse_attention_backward"),
    "bb_lse_grad_ignored": ("backward_bugs:lse_grad_ignored", "sparse_attention_backward"),
    "bb_varlen_boundary_off_by_one": ("varlen_boundary_off_by_one", "sparse_attention"),
    "bb_varlen_packed_alignment": ("varlen_packed_alignment", "sparse_attention"),
    "bb_pages_in_pool_order": ("pages_in_pool_order", "sparse_attention"),
    "bb_block_keys_ignored": ("block_keys_ignored", "sparse_attention"),
    "bb_forms_ties_high": ("forms_ties_high", "sparse_attention"),
}

#: backends the suite once passed (issue 16), proven caught by
#: tests/test_conformance_blindspots.py: name -> (module, the operator that must fail)
BLIND_SPOTS = {
    "bb_tiled_nan_leak": ("tiled_nan_leak", "sparse_attention"),
    "bb_gated_rows_multiply": ("gated_rows_multiply", "gated_channels"),
    "bb_topk_ties_high": ("topk_ties_high", "sparse_attention"),
    "bb_keep_ties_high": ("keep_ties_high", "gated_channels"),
    "bb_round_half_away": ("round_half_away", "quantize"),
    "bb_truncated_attention": ("truncated_attention", "sparse_attention"),
    "bb_truncated_gemm": ("truncated_gemm", "gemm"),
    "bb_int8_fp32_accumulation": ("int8_fp32_accumulation", "gemm"),
    "bb_threshold_ge": ("threshold_ge", "gated_channels"),
    "bb_nan_opens": ("nan_opens", "gated_channels"),
    # caught only across processes: certification's fresh-process reruns
    "bb_split_k_per_process": ("split_k_per_process", "gemm"),
}
