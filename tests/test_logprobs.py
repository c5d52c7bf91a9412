"""Chunked completion log-probs (shared.logprobs) against the plain full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch

from shared.logprobs import MASKED, completion_token_stats, selective_logprobs

B, K, H, V = 3, 7, 16, 301
SUPPRESS = [5, 17, 300]


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, K, H, generator=g, dtype=torch.float64).float().requires_grad_(True)
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 2.0)
        head.bias.copy_(torch.randn(V, generator=g))
    targets = torch.randint(0, V, (B, K), generator=g)
    lens = torch.tensor([7, 3, 0])  # a full row, a short (left-padded) one, an empty one
    valid = torch.arange(K).unsqueeze(0) >= (K - lens).unsqueeze(1)
    return hidden, head, targets, valid


def _plain(hidden, head, targets, valid, temperature, kl_temperature):
    """The recipe the trainer used before chunking: whole [B, K, V] tensors."""
    raw = head(hidden).float()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[SUPPRESS] = True
    lp = torch.log_softmax(raw.masked_fill(mask, MASKED) / temperature, dim=-1)
    tok = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
    ent = -(lp.exp() * lp).sum(-1) * valid
    kl = torch.log_softmax(raw / kl_temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
    return tok, ent, kl


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_stats_and_gradients_equal_the_plain_computation(chunk):
    hidden, head, targets, valid = _case()
    ref_tok, ref_ent, ref_kl = _plain(hidden, head, targets, valid, 0.7, 1.0)
    (ref_tok.sum() + 0.3 * ref_ent.sum()).backward()
    ref_gh, ref_gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    st = completion_token_stats(hidden, targets, valid, head, temperature=0.7, suppress_ids=SUPPRESS,
                                kl_temperature=1.0, chunk=chunk)
    torch.testing.assert_close(st.logprobs_B_K, ref_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.entropy_B_K, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.kl_logprobs_B_K, ref_kl, rtol=1e-5, atol=1e-5)
    assert (st.logprobs_B_K[~valid] == 0).all() and (st.entropy_B_K[~valid] == 0).all()
    (st.logprobs_B_K.sum() + 0.3 * st.entropy_B_K.sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_gw, rtol=1e-4, atol=1e-5)
    assert hidden.grad[~valid].abs().max() == 0  # padding positions get no gradient


def test_entropy_grad_off_keeps_entropy_out_of_the_graph():
    hidden, head, targets, valid = _case(1)
    st = completion_token_stats(hidden, targets, valid, head, 1.0, SUPPRESS, entropy_grad=False, chunk=2)
    assert st.logprobs_B_K.requires_grad and not st.entropy_B_K.requires_grad
    _, ref_ent, _ = _plain(hidden, head, targets, valid, 1.0, 1.0)
    torch.testing.assert_close(st.entropy_B_K, ref_ent.detach(), rtol=1e-5, atol=1e-5)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward (what a long [B, K, V] graph would pin)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_chunked_graph_keeps_no_full_vocabulary_tensor():
    hidden, head, targets, valid = _case(2)
    n = int(valid.sum())
    one_full = n * V * 4  # a single fp32 [N, V]
    plain_bytes, _ = _saved_bytes(lambda: _plain(hidden, head, targets, valid, 0.7, 1.0))
    chunked_bytes, st = _saved_bytes(lambda: completion_token_stats(
        hidden, targets, valid, head, 0.7, SUPPRESS, kl_temperature=1.0, chunk=2))
    assert plain_bytes >= 3 * one_full  # the old recipe pins several (that is the problem)
    assert chunked_bytes < one_full / 4, (chunked_bytes, one_full)
    st.logprobs_B_K.sum().backward()  # and the backward still works (recomputes each chunk)
    assert hidden.grad is not None


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_selective_logprobs_with_top_k_equals_plain(chunk):
    hidden, head, targets, valid = _case(3)
    h, t = hidden.detach()[valid], targets[valid]
    with torch.no_grad():
        lp = torch.log_softmax(head(h).float() / 0.5, dim=-1)
        ref = lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        ref_v, ref_i = lp.topk(4, dim=-1)
        got, ids, vals = selective_logprobs(h, t, head, temperature=0.5, top_k=4, chunk=chunk)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(vals, ref_v)
    assert torch.equal(ids, ref_i)


def test_empty_completions():
    hidden, head, targets, _ = _case(4)
    none = torch.zeros(B, K, dtype=torch.bool)
    st = completion_token_stats(hidden, targets, none, head, 1.0, SUPPRESS, kl_temperature=1.0)
    assert st.logprobs_B_K.shape == (B, K) and st.logprobs_B_K.abs().sum() == 0
    lp, ids, vals = selective_logprobs(hidden[none], targets[none], head, top_k=2)
    assert lp.shape == (0,) and ids.shape == (0, 2) and vals.shape == (0, 2)
