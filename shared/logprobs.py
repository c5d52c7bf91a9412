"""Completion log-probs and entropy over a large vocabulary, a chunk of positions at a time.

At Qwen's 152k vocabulary one fp32 `[B, K, V]` tensor is B*K*0.6 MB (micro-batch 4 x 256
completion tokens: 623 MB), and the plain recipe (logits, masked copy, log_softmax, exp for the
entropy, the product, plus what autograd keeps) holds several at once. Here the head runs on at
most `chunk` valid positions at a time; under autograd each chunk is checkpointed, so the
backward recomputes its logits instead of keeping them. Peak: a few `[chunk, V]` fp32 tensors.
Padding positions are never scored. The results equal the unchunked computation (tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MASKED = -1e9  # finite, so that p * log p stays 0 (not nan) for masked tokens
DEFAULT_CHUNK = 256  # positions: 4 fp32 [256, 152064] temporaries ~ 0.6 GB


@dataclass
class TokenStats:
    logprobs_B_K: torch.Tensor
    """log softmax(masked logits / T)[target] at each valid position; 0 elsewhere."""
    entropy_B_K: torch.Tensor
    """Entropy of that tempered, masked distribution at each valid position; 0 elsewhere."""
    kl_logprobs_B_K: torch.Tensor | None
    """log softmax(unmasked logits / T_kl)[target] (what the teacher scores with); None unless asked."""


def completion_token_stats(hidden_B_K_H: torch.Tensor, targets_B_K: torch.Tensor, valid_B_K: torch.Tensor,
                           head: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0,
                           suppress_ids: Sequence[int] = (), kl_temperature: float | None = None,
                           entropy: bool = True, entropy_grad: bool = True,
                           chunk: int = DEFAULT_CHUNK) -> TokenStats:
    """Per-token log-prob (and entropy) of `targets` under `head(hidden)`, in fp32, chunked.

    `head` maps [n, H] hidden states to [n, V] logits (cast to fp32 here). `suppress_ids`
    are masked out of the scored distribution (the sampler never draws them). Gradients flow
    to `hidden_B_K_H` (and the head's parameters) unless grad is off; `entropy_grad=False`
    keeps the entropy out of the graph.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, K = targets_B_K.shape
    h_N_H = hidden_B_K_H[valid_B_K]
    t_N = targets_B_K[valid_B_K]
    mask_V: torch.Tensor | None = None
    grad = torch.is_grad_enabled() and h_N_H.requires_grad

    def one(h: torch.Tensor, t: torch.Tensor):
        nonlocal mask_V
        raw = head(h).float()
        logits = raw
        if suppress_ids:
            if mask_V is None or mask_V.shape[0] != raw.shape[-1]:
                mask_V = torch.zeros(raw.shape[-1], dtype=torch.bool, device=raw.device)
                mask_V[list(suppress_ids)] = True
            logits = raw.masked_fill(mask_V, MASKED)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        tok = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        outs = [tok]
        if entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                outs.append(-(lp.exp() * lp).sum(-1))
        if kl_temperature is not None:
            src = raw if kl_temperature == 1.0 else raw / kl_temperature
            outs.append(torch.log_softmax(src, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1))
        return tuple(outs)

    parts: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, h_N_H.shape[0], chunk):
        h, t = h_N_H[i:i + chunk], t_N[i:i + chunk]
        # Checkpointed: autograd keeps the [n, H] input, not the [n, V] intermediates.
        parts.append(checkpoint(one, h, t, use_reentrant=False) if grad else one(h, t))
    n_out = 1 + int(entropy) + int(kl_temperature is not None)
    cols = [torch.cat([p[j] for p in parts]) if parts else hidden_B_K_H.new_zeros(0, dtype=torch.float32)
            for j in range(n_out)]

    def scatter(x_N: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, K, dtype=torch.float32, device=x_N.device)
        return out.masked_scatter(valid_B_K, x_N)

    tok_B_K = scatter(cols[0])
    ent_B_K = scatter(cols[1]) if entropy else torch.zeros_like(tok_B_K)
    kl_B_K = scatter(cols[-1]) if kl_temperature is not None else None
    return TokenStats(tok_B_K, ent_B_K, kl_B_K)


def selective_logprobs(hidden_N_H: torch.Tensor, targets_N: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                       temperature: float = 1.0, top_k: int = 0, chunk: int = DEFAULT_CHUNK):
    """No-grad scoring (the teacher): log softmax(head(h) / T)[target] in fp32, and the top-k.

    Returns (logprobs [N], top_ids [N, k] | None, top_logprobs [N, k] | None).
    """
    lps, ids, vals = [], [], []
    for i in range(0, hidden_N_H.shape[0], chunk):
        lp = F.log_softmax(head(hidden_N_H[i:i + chunk]).float() / temperature, dim=-1)
        lps.append(lp.gather(-1, targets_N[i:i + chunk].unsqueeze(-1)).squeeze(-1))
        if top_k:
            v, idx = lp.topk(top_k, dim=-1)
            ids.append(idx)
            vals.append(v)
        del lp
    empty = hidden_N_H.new_zeros(0, dtype=torch.float32)
    out = torch.cat(lps) if lps else empty
    if not top_k:
        return out, None, None
    if not ids:
        return out, torch.zeros(0, top_k, dtype=torch.long, device=hidden_N_H.device), empty.reshape(0, top_k)
    return out, torch.cat(ids), torch.cat(vals)
