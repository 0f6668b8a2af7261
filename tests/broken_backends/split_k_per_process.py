"""fp32 gemm with a split-K factor "autotuned" once per process: the depth is cut into a
random number of chunks whose float32 partial products are summed, so each process rounds
differently (bitwise reproducible within a process, not across processes)."""

import random
from itertools import pairwise

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped

#: the bug: picked at import, differently in every process
SPLIT = random.SystemRandom().randrange(2, 66)


class SplitKPerProcess(Wrapped):
    """split-K factor chosen at random once per process"""

    name = "bb_split_k_per_process"

    @hookimpl
    def dshal_gemm_run(self, call):
        a, b = np.asarray(call.a), np.asarray(call.b)
        if call.precision != "fp32" or a.dtype != np.float32 or b.dtype != np.float32 \
                or call.out_dtype != "float32" or b.shape[0] < SPLIT:
            return super().dshal_gemm_run(call)
        K = b.shape[0]
        cuts = np.linspace(0, K, SPLIT + 1).astype(int)
        out = np.zeros((*a.shape[:-1], b.shape[1]), np.float32)
        for k0, k1 in pairwise(cuts):
            out += a[..., k0:k1] @ b[k0:k1]
        if call.bias is not None:
            out += np.asarray(call.bias, np.float32)
        return out


plugin = SplitKPerProcess()
