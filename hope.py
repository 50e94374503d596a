"""
hope.py — HOPE (Nested Learning) on the Titans neural long-term memory, in one file.

Read it top to bottom; each section builds on the ones before:
  1. Notation                 — what θ, η, α, C mean here
  2. Memory MLP               — a small network whose *weights* are the memory (Titans §3.1)
  3. Inner loss and surprise  — what the memory learns as it runs, and the gate (Titans Eq. 12)
  4. Update rule, token loop  — gradient descent with momentum and forgetting (Titans Eqs. 9-15)
  5. Update rule, in chunks   — the same numbers, computed fast (Titans §3.2, Eqs. 16-18)
  6. Plumbing                 — projections, causal conv, rate heads: what all memory layers share
  7. The Titans memory layer  — §5 behind projections (Titans §3.1, §4.4)
  8. Self-modification        — memories that generate their own keys, values, rates (NL §8)
  9. CMS                      — memories that update at different periods (NL §7)
 10. Mixers and blocks        — attention, and MAC / MAG / MAL / LMM (Titans §3.3, §4)
 11. Models                   — HOPEConfig, the language model (HOPE and the GPT baseline)

Papers: Titans (Behrouz et al. 2024), Nested Learning (2025, "NL") and the seed paper that dissects
HOPE. docs/deviations.md lists every departure from them ("deviation N" below).
"""
import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

# === 1. Notation ================================================================================
# Titans names, per token t and per head, and the names they have in the code:
#   θ_t  learning rate   `lr`              in (0, lr_max)  how far one token moves the memory
#   η_t  momentum decay  `momentum_decay`  in (0, 1)       how long a past surprise keeps pushing
#   α_t  forget gate     `forget`          in (0, 1)       how much of the old memory is erased
# C is the chunk size: a chunk's tokens take their gradients at (and by default read) the
# chunk-start memory. Shapes: B batch (every sequence has its own memory), H heads, T tokens, d head
# width; inside memory_update (§3-§5) B and H are one batch dim, BH: each product there is then
# one torch.bmm.
GATE_EPS = 1e-6  # η and α are clamped to [GATE_EPS, 1 - GATE_EPS] so their logs stay finite
# torch.compile(step), once per step function (§5's chunk_runner)
compiled = functools.cache(torch.compile)


# === 2. Memory MLP (Titans §3.1; NL Eq. 89) =====================================================
# The memory is a function M_W whose parameters W are the state, one per head: depth 1 is a linear
# map M_W(x) = x W (a classic fast-weight memory), depth >= 2 a residual MLP x + MLP_W(x) with SiLU.
def memory_forward(weights, x, layer_product=torch.matmul):
    """M_W(x). weights: tuple of [B, H, d_in, d_out]; x: [B, H, T, d]. layer_product(h, W) is h W
    (§5's in-chunk read passes its own terms as W, and the product that reads each token's W)."""
    h = x
    for layer, W in enumerate(weights):
        h = layer_product(h, W)                      # [B, H, T, d_out]
        h = F.silu(h) if layer < len(weights) - 1 else h
    return h if len(weights) == 1 else x + h


def memory_shapes(d, depth, expansion):
    """(d_in, d_out) of each layer: d -> h -> ... -> h -> d with h = expansion * d
    (depth 1: d -> d)."""
    h = expansion * d
    return [(d, d)] if depth == 1 else [(d, h)] + [(h, h)] * (depth - 2) + [(h, d)]


def init_memory_weights(heads, d, depth, expansion, branch_scale=0.1):
    """Learned initial weights W⁰ (the meta state), one [H, d_in, d_out] per layer. A
    residual memory's last layer is scaled by branch_scale: 0.1 starts M(x) ≈ x (§8's
    generators use 1)."""
    weights = []
    for layer, (d_in, d_out) in enumerate(memory_shapes(d, depth, expansion)):
        scale = branch_scale if depth > 1 and layer == depth - 1 else 1  # the branch's last layer
        weights.append(nn.Parameter(torch.randn(heads, d_in, d_out) / math.sqrt(d_in) * scale))
    return nn.ParameterList(weights)


@dataclass
class MemoryState:
    """Per-sample weights W and momentum S (tuples of [B, H, d_in, d_out]), the causal conv's
    last inputs (§6; None: zeros), and the surprise s_t [B, H, T] of the write that made it
    (§3; detached)."""
    weights: tuple
    momentum: tuple
    conv_tail: torch.Tensor = None
    surprise: torch.Tensor = None

    @classmethod
    def start(cls, initial_weights, batch):
        """The state a sequence starts from: the meta weights W⁰ per sample (a view), and
        S_0 = 0."""
        weights = tuple(W.unsqueeze(0).expand(batch, *W.shape) for W in initial_weights)
        return cls(weights, tuple(torch.zeros_like(w) for w in weights))


# === 3. Inner loss and surprise, and the surprise gate (Titans Eq. 12; seed paper §2, §4.4) =====
# The memory learns, inside the forward pass, to map keys to values:
# ℓ_t(W) = ‖M_W(k_t) − v_t‖², and the surprise s_t is ℓ_t where the token's gradient is
# taken. Each layer's gradient is an outer product x_tᵀ δ_t of its input and backpropagated
# error; we compute x and δ for all tokens at once, by hand, so §5's sums of gradients become
# matmuls. The surprise gate (flag `surprise`): a token whose score, s_t or s_t / its chunk's mean
# ("relative"), is below γ writes nothing (θ_t = 0).
def inner_loss_terms(weights, keys, values):
    """For keys, values [BH, n, d]: the prediction M_W(k) and error M_W(k) − v [BH, n, d], the
    loss ℓ_t [BH, n] (detached: only ever the surprise), and per layer its inputs x and
    pre-activations z [BH, n, ·]."""
    inputs, preacts, h = [], [], keys
    for layer, W in enumerate(weights):
        inputs.append(h)
        preacts.append(torch.bmm(h, W))              # [BH, n, d_out]
        h = preacts[-1] if layer == len(weights) - 1 else F.silu(preacts[-1])
    prediction = h if len(weights) == 1 else keys + h
    error = prediction - values                      # [BH, n, d]
    # [BH, n]   Titans Eq. 12 (a statistic: detached)
    loss = error.detach().pow(2).sum(-1)
    return prediction, error, loss, inputs, preacts


def silu_slope(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))                     # SiLU'(z)


def layer_deltas(weights, preacts, step):
    """Back-propagate an output-space step [BH, n, d] through the memory: per layer δ [BH, n, ·]
    such that the layer's write for token t is x_tᵀ δ_t. With step = 2 e_t this is ∇_W ℓ_t
    (the skip adds I)."""
    deltas = [step]
    for layer in range(len(weights) - 1, 0, -1):     # back through each SiLU
        through_layer = torch.bmm(deltas[0], weights[layer].transpose(-1, -2))
        deltas.insert(0, through_layer * silu_slope(preacts[layer - 1]))
    return deltas


def relative_surprise(surprise):
    """s_t / its chunk's mean, surprise: [..., n] for one chunk (seed paper §4.4); 0/0 := 1."""
    mean = surprise.mean(-1, keepdim=True)
    return torch.where(mean > 0, surprise / mean, torch.ones_like(surprise))


def surprise_gate(surprise, threshold, relative):
    """Float mask [BH, n] for one chunk: 1 where the score reaches γ (may write), else 0;
    None: no gate."""
    if threshold is None:
        return None
    score = relative_surprise(surprise) if relative else surprise
    return (score >= threshold).to(surprise.dtype)


# --- What a chunk writes: the write rule ---------------------------------------------------------
# A chunk takes every token's step at its start weights W_a. Each layer's step for token i is
# x_iᵀ δ_i, with δ back-propagated (layer_deltas) from an output-space step ẽ_i; the rule is
# the choice of ẽ. With E = M_{W_a}(K) − V the chunk's errors [n, d], B = diag(2θ) and G the
# kernel below:
#   titans    ẽ = B E               θ ∇ℓ (Titans Eq. 12): each token as if alone, all at W_a.
#                                   The C steps add up, so correlated keys overshoot once
#                                   2θ·λ_max(G) passes ~2.
#   proximal  ẽ = B (I + G B̃)⁻¹ E   the implicit step, solved for the chunk at once (one
#                                   n × n solve per chunk and head). Momentum applies a write
#                                   again and again, θ/(1 − η) in all, so the solve takes
#                                   those long-run rates, B̃ = B / (1 − η): W then heads for
#                                   W∞ = W_a − Σ θ̃_i ∇ℓ_i(W∞). For a linear memory the
#                                   errors left there are (I + G B̃)⁻¹ E: every direction
#                                   shrinks by 1/(1 + 2θ̃λ) ∈ (0, 1], so it never
#                                   overshoots, whatever θ, C or the keys.
#   longhorn  ẽ_i = 2θ_i e_i / (1 + 2θ̃_i G_ii)
#                                   the same implicit step for each token alone (at C = 1:
#                                   Longhorn's closed form); bounded per token, not across a
#                                   chunk.
#   delta     ẽ = (1 − η) (I + B̃ tril(G))⁻¹ B̃ E
#                                   the implicit step token by token, in order: token i solves
#                                   for its own write after tokens 1..i−1 of the chunk have
#                                   written (lower triangle of G: how their writes moved its
#                                   read). DeltaNet's chunk form, with Longhorn's step: for a
#                                   linear memory (η, α → 0) it is exactly the token loop, each
#                                   token's error shrinking by 1/(1 + 2θ̃‖k‖²), so it never
#                                   overshoots at any θ or C; and token i's write sees no
#                                   later token, so tokens may read inside their chunk (§4).
# G is the memory's Gauss–Newton (tangent) kernel between the chunk's tokens, averaged over its
# d outputs: G_ij = (1/d) Σ_o ⟨∂M(k_i)_o/∂W, ∂M(k_j)_o/∂W⟩, how far a write at token j
# moves the read at token i (G = KKᵀ for a linear memory; for the MLP the bound above holds to
# first order). θ = 0 (a gated token) writes 0. The default is proximal (HOPEConfig.write_rule):
# its bound lets θ_max be 10 (§11's LR_MAX) where the Titans rule's overshoot caps θ at 0.02 and
# the memory hardly stores what it reads (docs/deviations.md 7; the write-rule table in
# docs/results.md; `python bench.py probe`). The delta rule is as stable and causal inside a
# chunk, but it fits the tokens in turn, so where keys share a direction the later ones write
# over part of what the earlier ones stored; the proximal solve fits the chunk's pairs together
# and recalls more.
#   The MLP memory's hidden layers write at HIDDEN_LR·θ under the implicit rules: the step is
# taken in a metric that weighs a hidden layer's change 1/HIDDEN_LR, so G weighs that layer's
# term by HIDDEN_LR too and the bound above is kept. A hidden layer's write moves the features
# through which every stored pair is read, and does so nonlinearly (the solve sees it only to first
# order), so a large one there blurs what earlier chunks stored; the output layer, written at the
# full θ, then stores each chunk almost as a linear memory would, over features that move slowly
# (docs/benchmarks.md, what one write stores; docs/results.md, the write-rule table).
WRITE_RULES = ("titans", "proximal", "longhorn", "delta")
# a hidden layer's θ / the output layer's θ, by rule
HIDDEN_LR = {"titans": 1.0, "proximal": 0.1, "longhorn": 0.1, "delta": 0.1}


def token_kernel(weights, inputs, preacts, hidden_share=1.0):
    """G [BH, n, n] from the forward pass (inner_loss_terms). Per layer l with input x and J_i the
    Jacobian of M(k_i) w.r.t. the layer's output, G += (x_i · x_j) ⟨J_i, J_j⟩ / d, times
    hidden_share for the hidden layers (HIDDEN_LR); the last layer's J is I."""
    kernel = torch.bmm(inputs[-1], inputs[-1].transpose(-1, -2))          # [BH, n, n]
    d = weights[-1].shape[-1]
    for layer in range(len(weights) - 2, -1, -1):                   # the hidden layers, top down
        slope = silu_slope(preacts[layer])                                # [BH, n, h]
        if layer == len(weights) - 2:
            # J_i = diag(σ'_i) W_last: ⟨J_i, J_j⟩ = Σ_a σ'_ia σ'_ja ‖W_last[a]‖²
            row_norms = weights[-1].pow(2).sum(-1)                      # ‖W_last[a]‖²  [BH, h]
            overlap = torch.bmm(slope * row_norms[:, None], slope.transpose(-1, -2))
            # [BH, n, h, d], needed from depth 3 on
            jacobian = slope[..., None] * weights[-1][:, None] if layer else None
        else:
            jacobian = slope[..., None] * (weights[layer + 1][:, None] @ jacobian)   # [BH, n, h, d]
            overlap = torch.einsum("bnad,bmad->bnm", jacobian, jacobian)
        inner = torch.bmm(inputs[layer], inputs[layer].transpose(-1, -2))         # [BH, n, n]
        kernel = kernel + hidden_share * inner * overlap / d
    return kernel


def write_steps(rule, kernel, error, lr, momentum_decay):
    """ẽ [BH, n, d] for one chunk, from G [BH, n, n] (None for titans), the errors [BH, n, d],
    θ (0: no write) and η [BH, n]."""
    step = 2 * lr[..., None]                                             # diag(B)  [BH, n, 1]
    if rule == "titans":
        return step * error
    long_run = step / (1 - momentum_decay[..., None])                   # diag(B̃)  [BH, n, 1]
    if rule == "longhorn":
        return step * error / (1 + long_run * kernel.diagonal(dim1=-2, dim2=-1)[..., None])
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    if rule == "delta":                          # row i of B̃ tril(G): B̃_i G_ij for j ≤ i
        system = eye + long_run * kernel.tril()                         # [BH, n, n], diagonal ≥ 1
        solved = torch.linalg.solve_triangular(system, long_run * error, upper=False)
        return (1 - momentum_decay[..., None]) * solved        # (1 − η)(I + B̃ tril G)⁻¹ B̃ E
    # I + G B̃ has eigenvalues ≥ 1 and so is invertible, unless a memory has already blown up (G
    # so large that float32 loses the I): solve_ex then gives NaN, which train.py stops on with one
    # line, instead of raising.
    solved, _ = torch.linalg.solve_ex(eye + kernel * long_run.transpose(-1, -2), error)
    return step * solved                                                 # B (I + G B̃)⁻¹ E


# === 4. The update rule, token by token (Titans Eqs. 9-15) ======================================
#     S_t = η_t S_{t−1} − u_t                        momentum of surprise        (Eqs. 10, 12)
#     W_t = (1 − α_t) W_{t−1} + S_t                  forgetting + write          (Eq. 13)
#     y_t = M_{W_a(t)}(q_t)                          read before write           (Eq. 15)
# u_t is the token's write: θ_t ∇ℓ_t(W_a(t)) for the Titans rule, x_tᵀ δ_t(ẽ_t) for the
# write rules above (their ẽ solved at W_a, from the whole chunk or, under the delta rule, from
# the chunk's tokens up to t). The anchor a(t) is the last token of the previous chunk: a
# chunk's tokens take their steps at, and read, W_a (C = 1: the plain online rule). This loop
# is the reference (autograd gradients, and the solve written apart); §5 gives the same numbers
# fast. Read mode "in_chunk" (TTT's mini-batch form of Eq. 16) reads
# y_t = M_{W_{t−1}}(q_t), after the writes of the tokens before t; not with the relative gate nor
# the proximal rule (both see later tokens: the chunk's mean surprise, the whole chunk's solve).
READ_MODES = ("chunk_start", "in_chunk")


def _token_gradient(weights, key, value, create_graph, step=None):
    """∇_W ℓ(W) for one token (all samples and heads at once), by autograd: independent of
    §3's. With an output-space step ẽ (the other write rules), the layers' step instead:
    ∇_W ⟨M_W(k), ẽ⟩ = x_tᵀ δ_t(ẽ)."""
    with torch.enable_grad():
        # a view: its gradient counts the paths through M_W(k) only, not those through the
        # step ẽ(W_a)
        leaves = tuple(W.view_as(W) if (create_graph and W.requires_grad)
                       else W.detach().requires_grad_() for W in weights)
        prediction = memory_forward(leaves, key)
        loss = (prediction - value).pow(2).sum() if step is None else (prediction * step).sum()
        return torch.autograd.grad(loss, leaves, create_graph=create_graph)


def _reference_kernel(anchor, keys, create_graph, hidden_share):
    """G for one chunk by autograd, apart from token_kernel: each token reads its own copy of
    the weights, and one backward pass per output feature o gives every token's ∂M(k_i)_o/∂W
    at once; a hidden layer's gradients count hidden_share times in the inner products."""
    n, d = keys.shape[1], anchor[-1].shape[-1]
    with torch.enable_grad():
        copies = tuple(W[:, None].repeat(1, n, 1, 1) if create_graph and W.requires_grad
                       else W.detach()[:, None].repeat(1, n, 1, 1).requires_grad_() for W in anchor)
        reads = memory_forward(copies, keys[:, :, None])                         # [BH, n, 1, d]
        kernel = 0
        for o in range(d):
            grads = torch.autograd.grad(reads[..., o].sum(), copies, create_graph=create_graph,
                                        retain_graph=True)
            # √share for the hidden layers, 1 for the output layer
            weighs = [hidden_share ** 0.5] * (len(grads) - 1) + [1.0]
            flat = torch.cat([w * g.flatten(2) for w, g in zip(weighs, grads)], -1)   # [BH, n, ·]
            kernel = kernel + flat @ flat.transpose(-1, -2) / d
    return kernel if create_graph else kernel.detach()


def _reference_steps(rule, anchor, keys, values, lr, momentum_decay, create_graph):
    """ẽ for one chunk of the proximal, longhorn and delta rules, apart from write_steps: G by
    autograd, the solve as (1 − η)(I + B̃ G)⁻¹ B̃ E (the same identity, the other way round), and
    the delta rule's token by token."""
    kernel = _reference_kernel(anchor, keys, create_graph, HIDDEN_LR[rule])    # [BH, n, n]
    long_run = 2 * lr / (1 - momentum_decay)                                    # B̃  [BH, n]
    keep = (1 - momentum_decay)[..., None]                                    # 1 − η  [BH, n, 1]
    scaled_error = long_run[..., None] * (memory_forward(anchor, keys) - values)  # B̃ E [BH, n, d]
    diagonal = kernel.diagonal(dim1=-2, dim2=-1)[..., None]                     # G_ii  [BH, n, 1]
    if rule == "longhorn":
        return keep * scaled_error / (1 + long_run[..., None] * diagonal)
    if rule == "delta":
        # token i's long-run write ũ_i = B̃_i (e_i − Σ_{j<i} G_ij ũ_j − G_ii ũ_i): its own
        # implicit step, taken after the chunk's earlier tokens have written (to first order)
        writes = []
        for i in range(keys.shape[1]):
            moved = sum((kernel[:, i, j, None] * writes[j] for j in range(i)),
                        torch.zeros_like(scaled_error[:, i]))                # [BH, d]
            rate = long_run[:, i, None]                                        # [BH, 1]
            writes.append((scaled_error[:, i] - rate * moved) / (1 + rate * diagonal[:, i]))
        return keep * torch.stack(writes, dim=1)
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype)
    return keep * torch.linalg.solve(eye + long_run[..., None] * kernel, scaled_error)


def _memory_update_sequential(weights, momentum, keys, values, queries, lr, momentum_decay, forget,
                              chunk_size, threshold, relative, write_rule, read_mode):
    T, outputs, surprises = keys.shape[1], [], []
    create_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*weights, *momentum, keys, values, lr, momentum_decay, forget))
    for start in range(0, T, chunk_size):
        anchor = weights                             # W_a: the weights at the chunk start
        chunk = slice(start, min(start + chunk_size, T))
        surprises.append(inner_loss_terms(anchor, keys[:, chunk], values[:, chunk])[2])  # [BH, n]
        gate = surprise_gate(surprises[-1], threshold, relative)
        chunk_lr = lr[:, chunk] if gate is None else lr[:, chunk] * gate                 # [BH, n]
        steps = None if write_rule == "titans" else \
            _reference_steps(write_rule, anchor, keys[:, chunk], values[:, chunk], chunk_lr,
                             momentum_decay[:, chunk], create_graph)                   # [BH, n, d]
        for i, t in enumerate(range(chunk.start, chunk.stop)):
            if queries is not None:                  # W_a(t), or W_{t−1} in the in-chunk mode
                read_weights = weights if read_mode == "in_chunk" else anchor
                outputs.append(memory_forward(read_weights, queries[:, t:t + 1]))
            if steps is None:                        # Titans: θ_t ∇ℓ_t(W_a)
                grads = _token_gradient(anchor, keys[:, t:t + 1], values[:, t:t + 1], create_graph)
                grads = tuple(chunk_lr[:, i, None, None] * g for g in grads)
            else:
                grads = _token_gradient(anchor, keys[:, t:t + 1], None, create_graph,
                                        steps[:, i:i + 1])
                share = HIDDEN_LR[write_rule]                   # the hidden layers' θ (§3)
                grads = tuple(g * share for g in grads[:-1]) + grads[-1:]
            decay_t, forget_t = (r[:, t, None, None] for r in (momentum_decay, forget))
            momentum = tuple(decay_t * S - g for S, g in zip(momentum, grads))
            weights = tuple((1 - forget_t) * W + S for W, S in zip(weights, momentum))
    outputs = torch.cat(outputs, dim=1) if queries is not None else None
    return outputs, weights, momentum, torch.cat(surprises, dim=1)


# === 5. The update rule, one chunk at a time (Titans §3.2, Eqs. 16-18, with momentum) ===========
# Unroll §4 over a chunk from the anchor (W_a, S_a), with u_i the token's step (θ_i ∇ℓ_i(W_a)
# for the Titans rule, x_iᵀ δ_i(ẽ_i) for any write rule) and the decay products
# E(t,i) = Π_{i<j≤t} η_j, A(t,i) = Π_{i<j≤t} (1 − α_j) and
# K(t,i) = Σ_{r=max(i,1)..t} A(t,r) E(r,i):
#     S_t = E(t,0) S_a − Σ_{i≤t} E(t,i) u_i
#     W_t = A(t,0) W_a + K(t,0) S_a − Σ_{i≤t} K(t,i) u_i
# Every step is an outer product x_iᵀ δ_i (§3), so at the chunk's end (t = n) Σ_i c_i u_i =
# Xᵀ diag(c) Δ is one matmul. Decay products are masked sums of logs (never differences of
# cumulative sums: −inf − (−inf) = NaN). In-chunk reads (§4) need no W_{t−1} either: for a
# layer's input h_t,
#     h_t W_{t−1} = A(t−1,0) h_t W_a + K(t−1,0) h_t S_a
#                   − Σ_{i<t} K(t−1,i) (h_t · x_i) δ_i,
# and over the chunk the last sum is one masked matmul ((H Xᵀ) ⊙ [K(t−1,i)]) Δ (TTT's dual
# form). Lines marked "fast path" only save work; the tests hold them to §4's loop.
def segment_sum(x):
    """out[..., t, i] = Σ_{i<j≤t} x[..., j] for i ≤ t, −inf above the diagonal.
    x: [..., m]."""
    x = x.unsqueeze(-1).expand(*x.shape, x.shape[-1])                         # [..., j, i] = x_j
    below = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril(-1)   # j > i
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    return sums.masked_fill(below.T, -math.inf)                                    # i > t


def chunk_coefficients(momentum_decay, forget, in_chunk_reads=False):
    """The coefficients of the formulas above for chunks of rates [..., n]: state_coeffs
    [..., 3, 1, 1] E(n,0), A(n,0), K(n,0); token_coeffs [..., n, 2] E(n,i), K(n,i). With
    in_chunk_reads also read_state_coeffs [..., n, 2] A(t−1,0), K(t−1,0) and read_token_coeffs
    [..., n, n] K(t−1,i)."""
    # Both decays in one batch; position 0 is the anchor, whose own factor is never used.
    log_decays = torch.stack([torch.log(momentum_decay), torch.log1p(-forget)])    # [2, ..., n]
    logs = F.pad(log_decays, (1, 0))                                               # [2, ..., n+1]
    E, A = segment_sum(logs).exp().unbind(0)                  # each [..., n+1, n+1]
    E_last, A_last = E[..., -1, :], A[..., -1, :]             # E(n, i), A(n, r)   [..., n+1]
    # K[i] = Σ_{r=1..n} A(n,r) E(r,i): E(r,i) = 0 for r < i, so the sum runs over r ≥ max(i, 1)
    K = (A_last[..., None, 1:] @ E[..., 1:, :]).squeeze(-2)   # [..., n+1]
    state_coeffs = torch.stack([E_last[..., 0], A_last[..., 0], K[..., 0]], -1)[..., None, None]
    token_coeffs = torch.stack([E_last[..., 1:], K[..., 1:]], -1)
    if not in_chunk_reads:
        return state_coeffs, token_coeffs
    # The other rows of the same product: K(t,i) for t = 0..n−1, the states the tokens read.
    # Row 0 is W_a itself (A(0,r) = 0 for r ≥ 1), and K(t,i) = 0 for i > t.
    K_read = A[..., :-1, 1:] @ E[..., 1:, :]                   # [..., n, n+1]
    read_state_coeffs = torch.stack([A[..., :-1, 0], K_read[..., 0]], -1)
    read_token_coeffs = K_read[..., 1:]
    return state_coeffs, token_coeffs, read_state_coeffs, read_token_coeffs


def _read_in_chunk(weights, momentum, queries, inputs, deltas, read_state_coeffs,
                   read_token_coeffs):
    """y_t = M_{W_{t−1}}(q_t) for every token t of a chunk, no W_{t−1} built (Titans Eq. 16)."""
    weight_keep, momentum_into_weight = read_state_coeffs[..., None].unbind(-2)   # each [BH, n, 1]
    def product_with_read_weights(h, layer):
        W, S, x, delta = layer                                # h: [BH, n, d_in]
        earlier_writes = (h @ x.transpose(-1, -2)) * read_token_coeffs    # [BH, n, n]
        return weight_keep * (h @ W) + momentum_into_weight * (h @ S) - earlier_writes @ delta
    layers = tuple(zip(weights, momentum, inputs, deltas))
    return memory_forward(layers, queries, product_with_read_weights)


def _chunk_step(weights, momentum, keys, values, queries, lr, momentum_decay, coefficients,
                threshold, relative, write_rule):
    """Advance (W, S) over one chunk, read before write (W_{t−1} if `coefficients` has read
    terms)."""
    state_coeffs, token_coeffs, *read_coeffs = coefficients  # [BH, 3, 1, 1], [BH, n, 2]
    momentum_keep, weight_keep, momentum_into_weight = state_coeffs.unbind(1)
    prediction, error, surprise, inputs, preacts = inner_loss_terms(weights, keys, values)
    gate = surprise_gate(surprise, threshold, relative)
    lr = lr if gate is None else lr * gate                    # gated tokens write nothing (§3)
    share = HIDDEN_LR[write_rule]                             # the hidden layers' θ (§3)
    kernel = None if write_rule == "titans" else token_kernel(weights, inputs, preacts, share)
    steps = write_steps(write_rule, kernel, error, lr, momentum_decay)     # ẽ  [BH, n, d]
    deltas = layer_deltas(weights, preacts, steps)
    if share != 1:
        deltas = [share * delta for delta in deltas[:-1]] + deltas[-1:]
    outputs = None
    if read_coeffs:                                           # read W_{t−1}
        outputs = _read_in_chunk(weights, momentum, queries, inputs, deltas, *read_coeffs)
    elif queries is not None:                                 # read at the chunk-start weights
        # fast path: reading the keys is the prediction already made
        outputs = prediction if queries is keys else memory_forward(weights, queries, torch.bmm)
    new_weights, new_momentum = [], []
    for W, S, x, delta in zip(weights, momentum, inputs, deltas):
        # Σ_i c_i x_iᵀ δ_i for both coefficient sets in one matmul: Xᵀ [c_S·Δ ‖ c_W·Δ]
        weighted = (token_coeffs[..., None] * delta[..., None, :]).flatten(-2)  # [BH, n, 2·d_out]
        # each [BH, d_in, d_out]
        sum_S, sum_W = torch.bmm(x.transpose(-1, -2), weighted).chunk(2, dim=-1)
        new_momentum.append(momentum_keep * S - sum_S)
        new_weights.append(weight_keep * W + momentum_into_weight * S - sum_W)
    return outputs, tuple(new_weights), tuple(new_momentum), surprise


def compiles(compile, device):
    """Whether chunk steps run compiled: as asked, or (None) on CUDA only. On a CPU a cold compile
    takes longer to repay than a preset's run, and eager steps reproduce the documented CPU results
    exactly (docs/benchmarks.md, Compilation)."""
    return compile if compile is not None else device.type == "cuda"


def chunk_runner(step, checkpoint, compile, device):
    """The per-chunk `step` as it runs: recomputed in backward if checkpoint (only the chunk
    states kept), under torch.compile if compiles() (speed: one small graph for every chunk;
    eager where compiling fails)."""
    if compiles(compile, device):
        torch._dynamo.config.suppress_errors = True     # dynamo warns and runs the step eagerly
        step = compiled(step)
    if not (checkpoint and torch.is_grad_enabled()):
        return step
    return lambda *args: recompute_in_backward(step, *args, use_reentrant=False)


def _memory_update_parallel(weights, momentum, keys, values, queries, lr, momentum_decay, forget,
                            chunk_size, threshold, relative, write_rule, checkpoint, read_mode,
                            compile):
    T, rates = keys.shape[1], (momentum_decay, forget)
    in_chunk_reads = read_mode == "in_chunk" and queries is not None
    # fast path: the coefficients do not depend on the memory, so all full chunks get theirs at once
    n_full, split = T // chunk_size, T // chunk_size * chunk_size
    full_chunks = (r[:, :split].unflatten(1, (n_full, chunk_size)) for r in rates)
    full_coefficients = chunk_coefficients(*full_chunks, in_chunk_reads)
    blocks = list(zip(*(c.unbind(1) for c in full_coefficients)))              # one per chunk
    if split < T:                                                        # a final partial chunk
        blocks.append(chunk_coefficients(*(r[:, split:] for r in rates), in_chunk_reads))
    outputs, surprises, step = [], [], chunk_runner(_chunk_step, checkpoint, compile, keys.device)
    chunk_keys, chunk_values = keys.split(chunk_size, dim=1), values.split(chunk_size, dim=1)
    chunk_queries = chunk_keys if queries is keys else \
        queries.split(chunk_size, dim=1) if queries is not None else [None] * len(blocks)
    chunk_rates = zip(lr.split(chunk_size, dim=1), momentum_decay.split(chunk_size, dim=1))
    chunks = zip(chunk_keys, chunk_values, chunk_queries, chunk_rates, blocks)
    for k, v, q, (chunk_lr, chunk_decay), coefficients in chunks:
        out, weights, momentum, surprise = step(weights, momentum, k, v, q, chunk_lr, chunk_decay,
                                                coefficients, threshold, relative, write_rule)
        outputs.append(out)
        surprises.append(surprise)
    outputs = torch.cat(outputs, dim=1) if queries is not None else None
    return outputs, weights, momentum, torch.cat(surprises, dim=1)


def check_inputs(weights, momentum, keys, values, queries, rates):
    """One ValueError naming the argument whose shape or dtype does not fit memory_update's
    contract."""
    def fail(name, tensor, expected):
        got = f"{tuple(tensor.shape)} {tensor.dtype}"
        raise ValueError(f"memory_update: {name} must be {expected}, got {got}")
    if keys.dim() != 4 or not keys.is_floating_point():
        fail("keys", keys, "a floating-point [B, H, T, d]")
    B, H, T, d = keys.shape
    widths = [d]
    for i, W in enumerate(weights):
        if W.dim() != 4 or W.shape[:3] != (B, H, widths[-1]) or not W.is_floating_point():
            expected = f"floating-point [{B}, {H}, {widths[-1]}, d_out] (layers chain from d = {d})"
            fail(f"weights[{i}]", W, expected)
        widths.append(W.shape[-1])
    if widths[-1] != d:
        fail(f"weights[{len(weights) - 1}]", weights[-1],
             f"[{B}, {H}, ·, {d}] (the memory maps d to d)")
    if len(momentum) != len(weights):
        raise ValueError(f"memory_update: momentum must hold one tensor per layer "
                         f"({len(weights)}), got {len(momentum)}")
    for i, (S, W) in enumerate(zip(momentum, weights)):
        if S.shape != W.shape or not S.is_floating_point():
            fail(f"momentum[{i}]", S, f"floating-point {tuple(W.shape)}, as weights[{i}]")
    for name, x in [("values", values), ("queries", keys if queries is None else queries)]:
        if x.shape != keys.shape or not x.is_floating_point():
            fail(name, x, f"floating-point {tuple(keys.shape)}, as keys")
    for name, rate in zip(("lr", "momentum_decay", "forget"), rates):
        if rate.shape != (B, H, T) or not rate.is_floating_point():
            fail(name, rate, f"floating-point [{B}, {H}, {T}]")


def memory_update(weights, momentum, keys, values, queries, lr, momentum_decay, forget, chunk_size,
                  parallel=True, threshold=None, relative=False, checkpoint=False,
                  read_mode="chunk_start", writes=True, compile=False, write_rule="titans"):
    """Read and write a neural memory over a sequence: the functional core. weights, momentum:
    W, S as tuples of [B, H, d_in, d_out]; keys, values (k_t -> v_t), queries (None: write
    only): [B, H, T, d]; lr, momentum_decay, forget: θ, η, α [B, H, T]; parallel: §5 (else
    §4); threshold γ, relative: §3; read_mode: §4; write_rule: §3's WRITE_RULES; writes=False:
    read W, write nothing; checkpoint, compile: §5's chunk_runner. Returns (outputs or None,
    new W, new S, surprise [B, H, T] detached), nothing changed in place; a final partial chunk
    is updated with its own tokens only."""
    check_inputs(weights, momentum, keys, values, queries, (lr, momentum_decay, forget))
    if chunk_size < 1 or read_mode not in READ_MODES:
        raise ValueError(f"chunk_size must be >= 1 and read_mode in {READ_MODES}: "
                         f"got {chunk_size}, {read_mode!r}")
    if read_mode == "in_chunk" and threshold is not None and relative:
        raise ValueError("read_mode 'in_chunk' takes no relative surprise gate "
                         "(its chunk mean sees later tokens)")
    if write_rule not in WRITE_RULES:
        raise ValueError(f"unknown write_rule {write_rule!r} ({', '.join(WRITE_RULES)})")
    if read_mode == "in_chunk" and write_rule == "proximal":
        raise ValueError("read_mode 'in_chunk' takes no proximal write rule "
                         "(its chunk solve sees later tokens)")
    with torch.autocast(keys.device.type, enabled=False):    # the memory always runs in fp32+
        B, H = keys.shape[:2]
        dtype = torch.promote_types(keys.dtype, torch.float32)
        read_keys = queries is keys
        # [B, H, ...] -> [BH, ...]
        memories = lambda t: t if t is None else t.flatten(0, 1).to(dtype)
        weights, momentum = (tuple(map(memories, ts)) for ts in (weights, momentum))
        keys, values, queries, lr = map(memories, (keys, values, queries, lr))
        queries = keys if read_keys else queries              # fast path: keeps `queries is keys`
        momentum_decay, forget = (memories(t).clamp(GATE_EPS, 1 - GATE_EPS)
                                  for t in (momentum_decay, forget))
        args = (weights, momentum, keys, values, queries, lr, momentum_decay, forget, chunk_size,
                threshold, relative, write_rule)
        if not writes:                                        # a control: the memory stays as it is
            reads = memory_forward(weights, queries, torch.bmm) if queries is not None else None
            result = (reads, weights, momentum, inner_loss_terms(weights, keys, values)[2])
        elif parallel:
            result = _memory_update_parallel(*args, checkpoint, read_mode, compile)
        else:
            result = _memory_update_sequential(*args, read_mode)
    per_sample = lambda t: t if t is None else t.unflatten(0, (B, H))   # [BH, ...] -> [B, H, ...]
    outputs, weights, momentum, surprise = result
    return (per_sample(outputs), tuple(map(per_sample, weights)), tuple(map(per_sample, momentum)),
            per_sample(surprise))


# === 6. Plumbing: what every memory layer shares ================================================
# Around memory_update a layer needs projections in and out, a short causal convolution over time
# (Titans §4.4), per-head linear maps and the per-token rates θ, η, α.
def update_settings(config):
    """memory_update's keyword arguments that the config sets (gate, read mode, path, recompute)."""
    return dict(threshold=config.surprise_threshold if config.surprise else None,
                read_mode=config.read_mode,
                write_rule=config.write_rule,
                relative=config.surprise and config.surprise_mode == "relative",
                parallel=config.parallel,
                checkpoint=config.checkpoint,
                writes=config.writes,
                compile=config.compile_chunks)


class CausalConv(nn.Module):
    """Depthwise causal conv, y_t = b + Σ_j w_j ⊙ x_{t−window+1+j}; its state: the last
    window − 1 inputs. Speed: shifted multiply-adds beat nn.Conv1d on a CPU."""
    def __init__(self, channels, window=4):
        super().__init__()
        self.window = window
        bound = 1 / math.sqrt(window)                                 # nn.Conv1d's default init
        self.weight = nn.Parameter(torch.empty(window, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x, tail=None):
        """x: [B, T, channels]; tail: [B, window-1, channels] or None (zeros). Returns (y, tail)."""
        tail = x.new_zeros(x.shape[0], self.window - 1, x.shape[2]) if tail is None else tail
        padded = torch.cat([tail, x], dim=1)                        # [B, window-1+T, channels]
        T = x.shape[1]
        y = self.bias
        for j in range(self.window):
            # y + x_{t−window+1+j} · w_j
            y = torch.addcmul(y, padded[:, j:j + T], self.weight[j])
        return y, padded[:, -(self.window - 1):]


def split_heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)          # [B, T, H·d] -> [B, H, T, d]


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)                          # [B, H, T, d] -> [B, T, H·d]


class HeadLinear(nn.Module):
    """Independent linear maps per head: [B, H, T, d_in] -> [B, H, T, d_out]."""
    def __init__(self, heads, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, d_in, d_out) / math.sqrt(d_in))

    def forward(self, x):
        return torch.einsum("bhti,hio->bhto", x, self.weight)


# Where the rates start, by write rule: (θ / θ_max, η) at init, RateHeads' biases; α starts at
# σ(−6) ≈ 0.0025 for every rule. The proximal rule starts at θ = 1 with momentum off
# (η ≈ 0.0025), so a chunk's solved write lands at once instead of spread over 1/(1 − η)
# chunks, and its θ_max of 10 leaves the model room to fit a chunk almost exactly where recall
# asks for it (docs/results.md, the write-rule table).
RATE_START = {"titans": (0.5, 0.5), "proximal": (0.1, 0.0025), "longhorn": (0.5, 0.5),
              "delta": (0.1, 0.0025)}


class RateHeads(nn.Module):
    """Per-head, per-token θ = lr_max·σ(·)·(1 − η), η = σ(·), α = σ(·) from linear
    read-outs. (1 − η) offsets momentum's 1/(1 − η): whatever η, a token's write adds up to
    lr_max·σ(·) (deviation 7)."""
    def __init__(self, heads, d, lr_max, write_rule):
        super().__init__()
        self.lr_max = lr_max
        self.weight = nn.Parameter(torch.randn(heads, d, 3) / math.sqrt(d))    # columns: θ, η, α
        start = torch.logit(torch.tensor([*RATE_START[write_rule], 0.0025]))  # σ(bias) = the start
        self.bias = nn.Parameter(start.repeat(heads, 1, 1))                      # [H, 1, 3]

    def forward(self, *feats):
        """θ, η, α, each [B, H, T], from feats [B, H, T, d]: one input for all, or one per rate
        (§8)."""
        # all three, or one each
        weights = [self.weight] if len(feats) == 1 else self.weight.split(1, dim=-1)
        logits = torch.cat([torch.einsum("bhtd,hdr->bhtr", f, w) for f, w in zip(feats, weights)],
                           dim=-1)
        lr, momentum_decay, forget = torch.sigmoid(logits + self.bias).unbind(-1)
        return self.lr_max * lr * (1 - momentum_decay), momentum_decay, forget


class MemoryLayer(nn.Module):
    """x [B, T, dim] -> projection, causal conv -> features [B, H, T, d] -> memory ->
    [B, T, dim]."""
    def __init__(self, config):
        super().__init__()
        H, d = config.heads, config.d_head
        self.heads, self.chunk_size, self.settings = H, config.chunk_size, update_settings(config)
        self.in_proj = nn.Linear(config.dim, H * d, bias=False)
        self.conv = CausalConv(H * d)
        self.out_proj = nn.Linear(H * d, config.dim, bias=False)

    def initial_state(self, batch):
        return MemoryState.start(self.initial_weights, batch)

    def features(self, x, conv_tail):
        feats, conv_tail = self.conv(self.in_proj(x), conv_tail)         # x [B, T, dim]
        return split_heads(feats, self.heads), conv_tail         # [B, H, T, d], the new conv tail

    def output(self, memory_out, dtype):
        # reads [B, H, T, d] -> [B, T, dim]
        return self.out_proj(merge_heads(memory_out.to(dtype)))

    def forward(self, x, state):
        """Read before write over x: [B, T, dim]. Returns (y [B, T, dim], the new state)."""
        feats, conv_tail = self.features(x, state.conv_tail)
        out, state = self.read_write(feats, state)
        return self.output(out, x.dtype), replace(state, conv_tail=conv_tail)


# === 7. The Titans memory layer (Titans §3.1, §4.4) =============================================
# q, k, v = SiLU of per-head linear maps of the conv's features (q, k unit-norm), θ, η, α from
# RateHeads; read M(q), then write k -> v with §5. The state carries over calls: a long sequence
# can come in pieces.
class NeuralMemory(MemoryLayer):
    """Titans neural long-term memory: read before write, chunk-parallel, state carried."""
    def __init__(self, config):
        super().__init__(config)
        H, d = config.heads, config.d_head
        self.to_query = HeadLinear(H, d, d)
        self.to_key_value = HeadLinear(H, d, 2 * d)
        self.rates = RateHeads(H, d, config.lr_max, config.write_rule)
        self.initial_weights = init_memory_weights(H, d, config.memory_depth, config.expansion)

    def queries(self, feats):
        return F.normalize(F.silu(self.to_query(feats)), dim=-1)    # [B, H, T, d]

    def keys_values(self, feats):
        k, v = F.silu(self.to_key_value(feats)).chunk(2, dim=-1)     # each [B, H, T, d]
        return F.normalize(k, dim=-1), v

    def read_write(self, feats, state, read=True):
        """Read M_W(q) (if read) before writing every k -> v (Titans Eqs. 9-15): (reads or None,
        state)."""
        k, v = self.keys_values(feats)
        out, weights, momentum, surprise = memory_update(
            state.weights, state.momentum, k, v, self.queries(feats) if read else None,
            *self.rates(feats), self.chunk_size, **self.settings)
        return out, replace(state, weights=weights, momentum=momentum, surprise=surprise)

    def read(self, feats, state):
        """M_W(q) at the given state for every token (no write). Returns [B, T, dim]."""
        return self.output(memory_forward(state.weights, self.queries(feats)), feats.dtype)


# === 8. Self-modification (NL §8.1-8.2, Eqs. 76-93) — flag `self_mod` ========================
# With self_mod off, keys, values, queries and rates come from fixed linear maps (§7). With it on,
# each head holds six memories M_k, M_v, M_q, M_lr, M_forget, M_mem; the first five *generate*
# what M_mem needs (NL Eqs. 80-88), and all six are written in context: the maps that make the
# keys and values change as the sequence goes. Per chunk, from the chunk-start states of all six:
#   1. generate k = M_k(x), v = M_v(x), q = M_q(x), θ = lr_max·σ(w_lr·M_lr(x)),
#      α = σ(w_α·M_forget(x))
#   2. self-generated targets v̂_□ = M_□(v) for every memory (NL Eq. 84), unit-norm
#   3. write all six with keys k, values v̂_□ and the same η, α, through one memory_update
#      call; M_mem with θ, the five generators with GENERATOR_LR·θ (below)
#   4. the layer's output is M_mem(q), read before the write (every write: §4's rule; NL's: DGD)
# Three guards keep this loop stable (docs/deviations.md 6). Everything generated is unit-norm,
# the rate features too, so a growing M_lr cannot push θ to θ_max and write bigger still. Under
# the proximal rule the generators write at a tenth of M_mem's θ: a solved write fits M_□(k) to
# a target M_□(v) that moves with it, and at the full θ that chase can blow M_k and M_v up
# (docs/benchmarks.md, Stability). And the targets are unit-norm too: M_mem writes M_mem(k)
# toward M_mem(v), so with a raw target a solved write multiplies M_mem by I + (v − k)(…)kᵀ,
# whose norm can pass 1 chunk after chunk; a bounded target makes each write a contraction
# toward it (docs/results.md, the self-modifying memory past the training context).
# The six memories, in the order the state stacks them (seed paper: m_k, m_v, m_q, m_η, m_α,
# m_memory). The code reaches each by name: component(weights, "q"), generators(weights).
SELF_MOD_COMPONENTS = ("k", "v", "q", "lr", "forget", "mem")
# M_k .. M_forget, which generate M_mem's inputs (step 1); they come first in the state
GENERATORS = tuple(name for name in SELF_MOD_COMPONENTS if name != "mem")
# the generators' θ / M_mem's θ, by rule
GENERATOR_LR = {"titans": 1.0, "proximal": 0.1, "longhorn": 1.0, "delta": 0.1}


def component(weights, name):
    """The memory `name` of SELF_MOD_COMPONENTS, from by_component's weights: per layer
    [B, H, d_in, d_out]."""
    return tuple(W[:, SELF_MOD_COMPONENTS.index(name)] for W in weights)


def generators(weights):
    """The GENERATORS, from by_component's weights: per layer [B, 5, H, d_in, d_out] (they come
    first, so one slice of the state)."""
    return tuple(W[:, :len(GENERATORS)] for W in weights)


class SelfModifyingMemory(MemoryLayer):
    """Six stacked per-head memories; the state is [B, 6·H, d_in, d_out] per layer,
    component-major."""
    def __init__(self, config):
        super().__init__(config)
        H, d, n = config.heads, config.d_head, len(SELF_MOD_COMPONENTS)
        # full-scale residual branches (with M(x) ≈ x, k ≈ v ≈ q: nothing to memorize)
        self.initial_weights = init_memory_weights(n * H, d, config.memory_depth, config.expansion,
                                                   branch_scale=1.0)
        # w_lr, w_forget read-outs and η's linear map
        self.rates = RateHeads(H, d, config.lr_max, config.write_rule)
        self.generator_lr = GENERATOR_LR[config.write_rule]
        # chunk-start reads in either read mode (step 1 needs that state); each chunk recomputed
        # whole
        self.checkpoint = self.settings.pop("checkpoint")
        self.compile = self.settings.pop("compile")
        self.settings["read_mode"] = "chunk_start"

    def features(self, x, conv_tail):
        """Unit-norm features: a fixed input scale keeps the generators' recurrence from
        exploding."""
        feats, conv_tail = super().features(x, conv_tail)
        return F.normalize(feats, dim=-1), conv_tail

    def by_component(self, weights):
        """The state's six memories apart: per layer [B, 6, H, ...], in SELF_MOD_COMPONENTS
        order."""
        return tuple(W.unflatten(1, (len(SELF_MOD_COMPONENTS), self.heads)) for W in weights)

    def generate(self, feats, weights):
        """Step 1: k, v, q [B, H, n, d] and θ, η, α [B, H, n] from the memories at `weights`."""
        outputs = memory_forward(generators(self.by_component(weights)), feats[:, None])
        generated = dict(zip(GENERATORS, outputs.unbind(1)))          # name -> [B, H, n, d]
        lr_feats = F.normalize(generated["lr"], dim=-1)
        forget_feats = F.normalize(generated["forget"], dim=-1)
        lr, momentum_decay, forget = self.rates(lr_feats, feats, forget_feats)
        # v unit-norm too (deviation 6): a write multiplies M = I + A by (I − 2θ(k − v)kᵀ),
        # unbounded if k·v > 1
        k, v, q = (F.normalize(generated[name], dim=-1) for name in ("k", "v", "q"))
        return k, v, q, lr, momentum_decay, forget

    def read(self, feats, state):
        """M_mem(M_q(x)) at the given state for every token (no write). Returns [B, T, dim]."""
        W = self.by_component(state.weights)
        q = F.normalize(memory_forward(component(W, "q"), feats), dim=-1)
        return self.output(memory_forward(component(W, "mem"), q), feats.dtype)

    def _chunk(self, feats, weights, momentum, read):
        """One chunk [B, H, n, d] of steps 1-4; returns (M_mem(q) or None, weights, momentum,
        surprise)."""
        k, v, q, lr, momentum_decay, forget = self.generate(feats, weights)
        W = self.by_component(weights)
        out = memory_forward(component(W, "mem"), q) if read else None             # step 4
        # step 2, unit-norm like everything generated: [B, 6H, n, d]
        targets = F.normalize(memory_forward(W, v[:, None]), dim=-1).flatten(1, 2)
        # all six share k, η, α: [B, 6H, n, ·]
        keys, momentum_decay, forget = (
            t[:, None].expand(-1, len(SELF_MOD_COMPONENTS), *t.shape[1:]).flatten(1, 2)
            for t in (k, momentum_decay, forget))
        # θ for each memory, [B, 6H, n] component-major like the state: the generators'
        # GENERATOR_LR·θ, and M_mem's own
        generator_lr = self.generator_lr * lr
        rates = [lr if name == "mem" else generator_lr for name in SELF_MOD_COMPONENTS]
        lr = torch.stack(rates, dim=1).flatten(1, 2)
        _, weights, momentum, surprise = memory_update(                           # step 3
            weights, momentum, keys, targets, None, lr, momentum_decay, forget, self.chunk_size,
            **self.settings)
        return out, weights, momentum, surprise

    def read_write(self, feats, state, read=True):
        """Steps 1-4 chunk by chunk: (M_mem(q) if read, else None; the state after the writes)."""
        step = chunk_runner(self._chunk, self.checkpoint, self.compile, feats.device)
        weights, momentum, outs, surprises = state.weights, state.momentum, [], []
        for chunk in feats.split(self.chunk_size, dim=2):
            out, weights, momentum, surprise = step(chunk, weights, momentum, read)
            outs.append(out)
            surprises.append(surprise)
        state = replace(state, weights=weights, momentum=momentum, surprise=torch.cat(surprises, 2))
        return (torch.cat(outs, 2) if read else None), state


# === 9. CMS, the Continuum Memory System (NL §7, Eqs. 70-74) — flag `cms` ====================
# CMS replaces the feed-forward by memories that keep learning in context at their own pace: a
# level of period p is a per-head memory of chunk size p (p = 8, 32), keyed by its input, valued
# by a learned projection of it. Two arrangements (`cms_arrangement`): "parallel", every level
# reads the block's input and a per-token softmax gate mixes their outputs (the seed paper's
# "combined via learned gating"); "chained", NL's y = M_(p_K)(… M_(p_1)(x)) (NL §7): each
# level reads the output of the one before, fastest first, and the last one's output is the
# block's.
CMS_ARRANGEMENTS = ("parallel", "chained")


class CMSLevel(nn.Module):
    """One level: a per-head memory of chunk size `period`, read with its own keys."""
    def __init__(self, config, period):
        super().__init__()
        H, d = config.heads, config.d_head
        self.heads, self.period, self.settings = H, period, update_settings(config)
        self.in_proj = nn.Linear(config.dim, H * d, bias=False)
        self.to_value = HeadLinear(H, d, d)
        lr_max = config.lr_max if config.cms_lr_max is None else config.cms_lr_max
        self.rates = RateHeads(H, d, lr_max, config.write_rule)
        self.initial_weights = init_memory_weights(H, d, config.memory_depth, config.expansion)
        self.out_proj = nn.Linear(H * d, config.dim, bias=False)

    initial_state = MemoryLayer.initial_state                            # W⁰ per sample, S = 0

    def forward(self, x, state):
        feats = split_heads(self.in_proj(x), self.heads)                  # [B, H, T, d]
        keys = F.normalize(feats, dim=-1)                                 # also the queries
        # unit-norm: raw ones went NaN in training (docs/deviations.md 8)
        values = F.normalize(self.to_value(feats), dim=-1)
        out, weights, momentum, surprise = memory_update(
            state.weights, state.momentum, keys, values, keys, *self.rates(feats), self.period,
            **self.settings)
        state = MemoryState(weights, momentum, surprise=surprise)
        return self.out_proj(merge_heads(out.to(x.dtype))), state


class CMS(nn.Module):
    """The levels, gated side by side or chained; the state is one MemoryState per level."""
    def __init__(self, config):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(config, p) for p in config.cms_periods)
        self.chained = config.cms_arrangement == "chained"
        self.gate = None if self.chained else nn.Linear(config.dim, len(config.cms_periods))

    def initial_state(self, batch):
        return [level.initial_state(batch) for level in self.levels]

    def forward(self, x, states):
        if self.chained:                                      # NL §7: level k reads level k-1
            new_states = []
            for level, state in zip(self.levels, states):
                x, state = level(x, state)                                          # [B, T, dim]
                new_states.append(state)
            return x, new_states
        outs, states = zip(*(level(x, s) for level, s in zip(self.levels, states)))
        mix = torch.softmax(self.gate(x), dim=-1)                                   # [B, T, levels]
        return sum(mix[..., i:i + 1] * out for i, out in enumerate(outs)), list(states)


class MLP(nn.Module):
    """The plain feed-forward (CMS off, and the GPT baseline); it has no state."""
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.dim
        self.up, self.down = nn.Linear(config.dim, hidden), nn.Linear(hidden, config.dim)

    def initial_state(self, batch):
        return None

    def forward(self, x, state):
        return self.down(F.gelu(self.up(x))), None


# === 10. Mixers and blocks (Titans §3.3, §4) ====================================================
# Attention has rotary position embeddings (RoPE: models run past their training length) and N_p
# persistent tokens, learned inputs prepended to every context (Titans §3.3). Mixers (each with
# initial_state(batch) and a small state type of its own) combine the memory with attention:
#   mac  memory as context: attention over [persistent ‖ memory read ‖ segment] (Titans §4.1)
#   mag  memory as gate: sliding-window attention ⊗ σ(memory)                   (Titans §4.2)
#   mal  memory as layer: memory, then sliding-window attention                 (Titans §4.3)
#   lmm  memory only (NL's HOPE has no attention)
def rope(x, rotation):
    """Rotate feature pairs of x [B, T, heads, d] (token-major: faster on a CPU) by rotation()'s
    (cos, sin)."""
    (cos, sin), (x1, x2) = rotation, x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal attention with RoPE, an optional sliding window and persistent tokens (the GPT
    mixer); its state: a cache of earlier (keys, values). Speed: keys_values uses qkv's k, v rows
    alone (MAC's h)."""
    def __init__(self, config, window=None, persistent_tokens=0):
        super().__init__()
        self.dim, self.heads, self.window = config.dim, config.heads, window
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(persistent_tokens, config.dim) * 0.02) \
            if persistent_tokens else None

    def initial_state(self, batch):
        return None                                                  # no cache yet

    def rotation(self, positions, dtype):
        """RoPE's cos and sin, each [T, 1, dh/2], of angles proportional to positions [T]."""
        d = self.dim // self.heads
        inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=positions.device, dtype=dtype) / d)
        angles = positions.to(dtype)[:, None, None] * inv_freq                         # [T, 1, d/2]
        return angles.cos(), angles.sin()

    def project(self, x, rotation):
        """q, k, v [B, h, T, dh] of x [B, T, dim]; q and k rotated (rotation: rotation()'s
        (cos, sin))."""
        q_k, v = self.qkv(x).unflatten(-1, (3 * self.heads, -1)).split(2 * self.heads, dim=2)
        q, k = rope(q_k, rotation).transpose(1, 2).chunk(2, dim=1)              # [B, h, T, dh] each
        return q, k, v.transpose(1, 2)

    def keys_values(self, x, rotation=None):
        """k, v [B, h, T, dh] of x [B, T, dim] without the queries; k rotated unless rotation is
        None."""
        keys_values = F.linear(x, self.qkv.weight[self.dim:])                 # [B, T, 2·dim]
        k, v = keys_values.unflatten(-1, (2 * self.heads, -1)).chunk(2, dim=2)
        k = k if rotation is None else rope(k, rotation)
        return k.transpose(1, 2), v.transpose(1, 2)

    def persistent_keys_values(self, batch, dtype):
        """Keys and values [B, h, N_p, dh] of the persistent tokens (no position), or None."""
        if self.persistent is not None:
            keys_values = self.keys_values(self.persistent.to(dtype)[None])   # each [1, h, N_p, dh]
            return tuple(t.expand(batch, -1, -1, -1) for t in keys_values)

    @staticmethod
    def prepend(persistent, k, v, visible):
        """[persistent ‖ k], [persistent ‖ v], and the mask visible [Tq, Tk] with every query
        seeing them."""
        if persistent is None:
            return k, v, visible
        return (torch.cat([persistent[0], k], 2), torch.cat([persistent[1], v], 2),
                F.pad(visible, (persistent[0].shape[2], 0), value=True))

    def attend(self, q, k, v, mask):
        """softmax(q kᵀ/√d + mask) v, heads merged and projected. mask: bool [Tq, Tk] or None
        (causal)."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(merge_heads(y))

    def forward(self, x, cache, position, keep_state=True):
        T = x.shape[1]
        positions = torch.arange(position, position + T, device=x.device)
        q, k, v = self.project(x, self.rotation(positions, x.dtype))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        if self.window is None:
            new_cache = (k, v)
        else:
            new_cache = (k[:, :, -self.window:], v[:, :, -self.window:])
        if self.persistent is None and cache is None and self.window is None:
            return self.attend(q, k, v, None), new_cache                # plain causal: fused kernel
        # One mask over all keys: the window limits what a query sees, not the cost (O(T²)).
        key_positions = torch.arange(position + T - k.shape[2], position + T, device=x.device)
        back = positions[:, None] - key_positions
        visible = (back >= 0) & (back < (self.window or position + T))                 # [T, Tk]
        persistent = self.persistent_keys_values(x.shape[0], x.dtype)
        return self.attend(q, *self.prepend(persistent, k, v, visible)), new_cache


class MACState(NamedTuple):
    memory: MemoryState          # the memory, with the conv tail of the stream it writes (y)
    query_tail: torch.Tensor     # the conv tail of the stream it reads with (x)


class MACMixer(nn.Module):
    """Memory as context (Titans Eqs. 21-25), per segment, from its start state: h = M(q) of
    the inputs; y = attention over [persistent ‖ h ‖ segment] (h_i seen from j ≥ i); write y
    into M; output y ⊗ σ(M(y)). Speed: keep_state=False (training) skips the last segment's
    unread write."""
    def __init__(self, config):
        super().__init__()
        self.segment_len = config.segment_len
        self.memory = SelfModifyingMemory(config) if config.self_mod else NeuralMemory(config)
        self.attention = Attention(config, None, config.persistent_tokens)

    def initial_state(self, batch):
        return MACState(self.memory.initial_state(batch), None)

    def attend_segment(self, q, k, v, retrieved, rotation, persistent):
        """Attention of the segment's q [B, h, L, dh] over [persistent ‖ h ‖ segment keys]."""
        k_h, v_h = self.attention.keys_values(retrieved, rotation)   # h_i sits at position i
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
        keys, values = torch.cat([k_h, k], 2), torch.cat([v_h, v], 2)
        mask = torch.cat([causal, causal], dim=1)                       # [L, 2L]: h, segment
        k, v, visible = self.attention.prepend(persistent, keys, values, mask)
        return self.attention.attend(q, k, v, visible)

    def forward(self, x, state, position, keep_state=True):
        T = x.shape[1]
        # what depends on x alone is computed for the whole sequence; the loop carries the memory
        # state
        positions = torch.arange(position, position + T, device=x.device)
        cos, sin = self.attention.rotation(positions, x.dtype)
        query_feats, query_tail = self.memory.features(x, state.query_tail)      # [B, H, T, d]
        q, k, v = self.attention.project(x, (cos, sin))                           # [B, h, T, dh]
        persistent = self.attention.persistent_keys_values(x.shape[0], x.dtype)
        memory, outs, written = state.memory, [], []
        L, last = self.segment_len, (T - 1) // self.segment_len
        streams = (t.split(L, dim=2) for t in (query_feats, q, k, v))
        segments = zip(*streams, cos.split(L), sin.split(L))
        for index, (feats, q_s, k_s, v_s, cos_s, sin_s) in enumerate(segments):
            retrieved = self.memory.read(feats, memory)                           # h  [B, L, dim]
            y = self.attend_segment(q_s, k_s, v_s, retrieved, (cos_s, sin_s), persistent)
            y_feats, conv_tail = self.memory.features(y, memory.conv_tail)
            gate = self.memory.read(y_feats, memory)
            if keep_state or index < last:
                memory = self.memory.read_write(y_feats, memory, read=False)[1]
                written.append(memory.surprise)
            memory = replace(memory, conv_tail=conv_tail)
            outs.append(y * torch.sigmoid(gate))
        state = None
        if keep_state:
            state = MACState(replace(memory, surprise=torch.cat(written, -1)), query_tail)
        return torch.cat(outs, 1), state


class WindowState(NamedTuple):
    memory: MemoryState          # the memory, with its conv tail
    cache: tuple = None          # the sliding-window attention's (keys, values) of earlier tokens


class LMMMixer(nn.Module):
    """The memory alone (NL's HOPE has no attention); MAG and MAL add sliding-window attention."""
    window_attention = False

    def __init__(self, config):
        super().__init__()
        self.memory = SelfModifyingMemory(config) if config.self_mod else NeuralMemory(config)
        if self.window_attention:
            self.attention = Attention(config, config.segment_len, config.persistent_tokens)

    def initial_state(self, batch):
        return WindowState(self.memory.initial_state(batch))

    def forward(self, x, state, position, keep_state=True):
        y, memory = self.memory(x, state.memory)
        return y, WindowState(memory)


class MAGMixer(LMMMixer):
    """Memory as gate: LayerNormed sliding-window attention y and memory read, y ⊗ σ(M(x))
    (Eqs. 26-28)."""
    window_attention = True

    def __init__(self, config):
        super().__init__(config)
        self.norm_attention, self.norm_memory = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)

    def forward(self, x, state, position, keep_state=True):
        y, cache = self.attention(x, state.cache, position)
        m, memory = self.memory(x, state.memory)
        gated = self.norm_attention(y) * torch.sigmoid(self.norm_memory(m))
        return gated, WindowState(memory, cache)


class MALMixer(LMMMixer):
    """Memory as layer: the memory's output goes through sliding-window attention (Titans
    Eqs. 29-31)."""
    window_attention = True

    def forward(self, x, state, position, keep_state=True):
        m, memory = self.memory(x, state.memory)
        y, cache = self.attention(m, state.cache, position)
        return y, WindowState(memory, cache)


MIXERS = {"mac": MACMixer, "mag": MAGMixer, "mal": MALMixer, "lmm": LMMMixer}


class BlockState(NamedTuple):
    mixer: object                # the mixer's state type
    ffn: list                    # one MemoryState per CMS level, or None (MLP)


class Block(nn.Module):
    """Pre-norm residual block: x + Mixer(norm x), then x + FFN(norm x); FFN = CMS or MLP."""
    def __init__(self, config):
        super().__init__()
        transformer = config.model == "transformer"
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.mixer = Attention(config) if transformer else MIXERS[config.mixer](config)
        self.ffn = CMS(config) if config.cms and not transformer else MLP(config)

    def initial_state(self, batch):
        return BlockState(self.mixer.initial_state(batch), self.ffn.initial_state(batch))

    def forward(self, x, state, position, keep_state=True):
        y, mixer_state = self.mixer(self.norm1(x), state.mixer, position, keep_state)
        x = x + y
        y, ffn_state = self.ffn(self.norm2(x), state.ffn)
        return x + y, BlockState(mixer_state, ffn_state)


# === 11. Models: the configuration, and the language model (HOPE, its ablations and GPT) ========
def option(default, help, choices=None):
    """A config field with the help and choices of its command-line flag (train.py makes the
    flags)."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    return field(default=default, metadata=metadata)


# θ_max by write rule (docs/deviations.md 7). The Titans step grows with θ and with the chunk's key
# Gram matrix, so its cap is small and falls as heads widen. The implicit rules solve for their
# write: for a linear memory each direction's error shrinks by 1/(1 + 2θ̃λ) at any θ, and an MLP
# memory is solved through its linearisation, so there θ_max sets how fully a chunk is fitted.
LR_MAX = {"proximal": 10.0, "longhorn": 1.0, "delta": 10.0}


def default_lr_max(write_rule, d_head):
    """θ_max for a write rule: LR_MAX, or 0.02·√(16/d_head) for the Titans rule (None if
    unknown)."""
    return 0.02 * (16 / d_head) ** 0.5 if write_rule == "titans" else LR_MAX.get(write_rule)


@dataclass
class HOPEConfig:
    model: str = option("hope", "hope, or transformer for the GPT baseline",
                        ("hope", "transformer"))
    vocab_size: int = option(256, "token vocabulary (set by the tokenizer or the recall task)")
    dim: int = option(256, "model width")
    layers: int = option(6, "blocks")
    heads: int = option(None, "memory and attention heads (default: dim / d_head)")
    d_head: int = option(None, "memory head width (default: dim / heads if heads is given, "
                               "else 64)")
    mixer: str = option("mac", "how memory and attention combine (§10)", tuple(MIXERS))
    cms: bool = option(True, "continuum memory levels instead of the MLP (§9, NL Eqs. 70-74)")
    self_mod: bool = option(True, "self-modifying memories instead of linear maps "
                                  "(§8, NL Eqs. 76-93)")
    surprise: bool = option(True, "surprise-gated memory writes (§3)")
    writes: bool = option(True, "memories write in context (§4); off: every memory reads W⁰ "
                                "forever, a control")
    surprise_threshold: float = option(0.02, "γ, the surprise gate's threshold")
    surprise_mode: str = option("absolute", "gate on s_t, or on s_t / chunk mean",
                                ("absolute", "relative"))
    chunk_size: int = option(16, "C, tokens per memory chunk")
    read_mode: str = option("chunk_start", "the weights a token reads (§4)", READ_MODES)
    write_rule: str = option("proximal", "how a chunk's tokens write (§3): Titans' θ∇ℓ, solved "
                                         "at once, each alone, or solved in order",
                             WRITE_RULES)
    parallel: bool = option(True, "the memory update's chunk form (§5); off: the token loop (§4)")
    segment_len: int = option(64, "MAC segment, MAG/MAL attention window")
    persistent_tokens: int = option(4, "N_p, learned tokens prepended to every attention context")
    memory_depth: int = option(2, "layers of the memory MLP")
    expansion: int = option(2, "memory MLP hidden width = expansion x d_head")
    lr_max: float = option(None, "θ_max, the largest inner learning rate (default: by write "
                                 "rule, default_lr_max)")
    cms_lr_max: float = option(None, "θ_max of the CMS levels (default: lr_max; 0 freezes CMS "
                                     "alone)")
    mlp_hidden: int = option(None, "hidden width of the plain MLP feed-forward (default: 4 x dim)")
    cms_periods: tuple = option((8, 32), "CMS level periods, e.g. 8,32")
    cms_arrangement: str = option("parallel", "CMS levels side by side behind a gate (seed paper), "
                                              "or chained as NL's HOPE has them (§9)",
                                  CMS_ARRANGEMENTS)
    seq_len: int = option(512, "training context (RoPE lets models run past it)")
    checkpoint: bool = option(False, "recompute each memory chunk in backward (memory ∝ T/C)")
    compile_chunks: bool = option(None, "torch.compile each memory chunk's step, one graph for "
                                        "all (None: CUDA)")
    embed_std: float = option(1.0, "token embedding init ~ N(0, x²)")
    init_std: float = option(None, "linear maps init ~ N(0, x²) (default: PyTorch's own init)")
    tied_head: bool = option(False, "output head = the token embedding (transposed)")

    # not a field; the other numbers must be > 0
    MAY_BE_ZERO = ("surprise_threshold", "persistent_tokens", "lr_max", "cms_lr_max")

    def __post_init__(self):
        """Fill in what None leaves open; a given heads or d_head is kept as it is."""
        self.cms_periods = tuple(self.cms_periods)
        if self.d_head is None:
            self.d_head = self.dim // self.heads if self.heads else 64
        if self.heads is None:
            self.heads = max(1, self.dim // self.d_head)
        if self.lr_max is None:
            self.lr_max = default_lr_max(self.write_rule, self.d_head)

    def validate(self):
        """Raise ValueError with a one-line message if the configuration cannot be built."""
        for f in fields(self):
            value, zero_ok = getattr(self, f.name), f.name in self.MAY_BE_ZERO
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} '{value}' ({', '.join(f.metadata['choices'])})")
            numeric = f.type in (int, float) and value is not None
            if numeric and not (value >= 0 if zero_ok else value > 0):
                bound = ">= 0" if zero_ok else "positive"
                raise ValueError(f"{f.name} must be {bound}, got {value}")
        # every number is valid by now, so heads and chunk_size are not 0
        for ok, message in [
                (self.dim % self.heads == 0,
                 f"dim {self.dim} is not divisible by heads {self.heads}"),
                (self.d_head % 2 == 0, f"head width {self.d_head} must be even (RoPE)"),
                (self.segment_len % self.chunk_size == 0,
                 f"segment_len {self.segment_len} must be a multiple of chunk size "
                 f"{self.chunk_size}"),
                (min(self.cms_periods, default=0) > 0,
                 f"CMS periods must be positive, got {self.cms_periods}"),
                (not (self.read_mode == "in_chunk" and self.surprise
                      and self.surprise_mode == "relative"),
                 "read mode in_chunk takes no relative surprise gate (its chunk mean sees later "
                 "tokens)"),
                (not (self.read_mode == "in_chunk" and self.write_rule == "proximal"),
                 "read mode in_chunk takes no proximal write rule (its chunk solve sees later "
                 "tokens): use --write-rule delta, longhorn or titans")]:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def period(self):
        """Tokens between states that every chunk, segment and CMS level agree on (1 for GPT)."""
        segment = self.segment_len if self.mixer == "mac" else 1
        cms = self.cms_periods if self.cms else ()
        return 1 if self.model == "transformer" else math.lcm(self.chunk_size, segment, *cms)


class ModelState(NamedTuple):
    """Where a sequence stands: its next position and every block's BlockState."""
    position: int
    layers: list


class LanguageModel(nn.Module):
    """Token embedding -> blocks -> norm -> output head: HOPE, its ablations and GPT. Init:
    docs/results.md, "The training recipe" (GPT-2's N(0, 0.02) and tied head leave every model
    here on a plateau at MQAR)."""
    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = (None if config.tied_head
                     else nn.Linear(config.dim, config.vocab_size, bias=False))
        self.apply(lambda module: self._init_weights(module, config))

    @staticmethod
    def _init_weights(module, config):
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=config.embed_std)
        elif isinstance(module, nn.Linear) and config.init_std is not None:
            nn.init.normal_(module.weight, std=config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def initial_state(self, batch):
        return ModelState(0, [block.initial_state(batch) for block in self.blocks])

    def advance(self, idx, state, keep_state=True):
        """Process idx [B, T] as the continuation of `state`, which sits on a multiple of
        config.period. Returns (logits [B, T, V], new state); keep_state=False (training) lets
        MAC skip a write."""
        if state.position % self.config.period:
            raise ValueError(f"state at position {state.position} is not on a period boundary")
        x, layers = self.embed(idx), []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, state.position, keep_state)
            layers.append(layer_state)
        x = self.norm(x)
        logits = x @ self.embed.weight.T if self.head is None else self.head(x)      # [B, T, V]
        return logits, ModelState(state.position + idx.shape[1], layers) if keep_state else None

    def forward(self, idx, targets=None):
        """Fresh memory per sequence. Returns (logits [B, T, V], the mean cross-entropy over the
        targets that are not -100 (recall tasks score only the answers), or None)."""
        logits, _ = self.advance(idx, self.initial_state(idx.shape[0]), keep_state=False)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss
