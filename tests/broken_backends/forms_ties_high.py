"""The serving forms' selection breaking exact ties toward the higher block index (a batched
decode ranking blocks with an unstable or descending-index sort); contiguous calls are
honest, so only the forms' exact-tie cases can catch it."""

from dataclasses import replace

import numpy as np

from dshal import reference
from dshal.forms import seq_keys, seq_summaries, sequences, uses_forms
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class FormsTiesHigh(Wrapped):
    """top-k ties to the higher block index in the varlen and paged forms"""

    name = "bb_forms_ties_high"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.top_k is None or not uses_forms(call):
            return super().dshal_sparse_attention_run(call)
        q, k = np.asarray(call.q), np.asarray(call.k)
        bs, Hkv = call.block_size, k.shape[1]
        seqs = sequences(call)
        width = max([-(-s.lk // bs) for s in seqs], default=0)
        chosen = np.full((q.shape[0], Hkv, q.shape[2], width), -1, np.int64)
        for s in seqs:
            rows = slice(s.q0, s.q0 + s.lq)
            qs = q[s.b:s.b + 1, :, rows]
            if call.block_keys is None:
                scores = reference.selection_scores(qs, seq_keys(k, s)[None], bs, call.scale)
            else:
                bk = seq_summaries(np.asarray(call.block_keys), s, bs, k.shape[2])[None]
                scores = reference.summary_scores(qs, bk, call.scale)
            nb = scores.shape[-1]
            # the bug: equal scores ordered by descending block index
            bumped = scores + np.abs(scores) * 1e-12 * np.arange(nb) + 1e-300 * np.arange(nb)
            sel = reference.select_blocks(bumped, call.top_k, s.lq, s.lk, bs, call.causal)
            chosen[s.b, :, rows, :sel.shape[-1]] = sel[0]
        return super().dshal_sparse_attention_run(
            replace(call, top_k=None, block_keys=None, indices=chosen))


plugin = FormsTiesHigh()
