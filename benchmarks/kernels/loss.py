"""The loss: k2c's fused cross-entropy against torch's on fp32 logits (its reference), fwd+bwd in bf16.

k2-1b's head over 8 sequences of 2048 tokens: logits [16384, 32768], a target per row, one row in eight ignored (as
masked prompt tokens are). The loss and the logits' gradient are checked against the reference's before both are
timed.
"""

from __future__ import annotations

import torch
from harness import Harness
from kernels.norms import compare

from k2c.runtime.kernels.cross_entropy import IGNORE, cross_entropy, cross_entropy_reference

DEV = torch.device("cuda")
TOKENS, VOCAB = 8 * 2048, 32768


def run(h: Harness) -> None:
    torch.manual_seed(0)
    logits = (2 * torch.randn(TOKENS, VOCAB, device=DEV)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), device=DEV)
    targets[::8] = IGNORE
    compare(h, f"cross-entropy fwd+bwd, logits [{TOKENS}, {VOCAB}] bf16", lambda x: cross_entropy(x, targets),
            lambda x: cross_entropy_reference(x, targets), (logits,), ("dlogits",))
