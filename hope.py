"""
hope.py — HOPE (Nested Learning) on the Titans neural long-term memory, in one file.

Read it top to bottom; it follows the order of the design notes:

  1. Notation                 — what θ, η, α, C mean here
  2. Memory MLP               — a small network whose *weights* are the memory (Titans §3.1)
  3. Inner loss and surprise  — what the memory is trained on, inside the forward pass (Titans Eq. 12)
  4. Update rule, sequential  — gradient descent with momentum and forgetting (Titans Eqs. 9-14)
  5. Update rule, in chunks   — the same rule, computed fast (Titans §3.2, Eqs. 16-18)
     + NeuralMemory           — the Titans memory layer that wraps the rule
  6. Self-modification        — memories that generate their own keys, values, rates (NL §8)
  7. CMS                      — memories that update at different periods (NL §7)
  8. Surprise gate            — skip writes for unsurprising tokens (seed paper §2)
  9. Mixers and blocks        — MAC / MAG / MAL / LMM with attention (Titans §4)
 10. Models                   — HOPEConfig, HOPE, the GPT baseline, the ablation rows

Papers: Titans (Behrouz, Zhong, Mirrokni 2024, "Learning to Memorize at Test Time"), Nested Learning
(Behrouz et al. 2025, NL below). The README lists every place where this file departs from them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

# Gradients pushed through long products of decays underflow into denormal floats, which are ~3x
# slower on CPUs. Flushing them to zero changes nothing visible and keeps the memory update fast.
torch.set_flush_denormal(True)

# -------------------------------------------------------------------------------------------------
# 1. Notation
# -------------------------------------------------------------------------------------------------
# Titans names, per token t and per head:
#   θ_t  learning rate      (`lr`,    in (0, lr_max))   how far one token moves the memory
#   η_t  momentum decay     (`beta`,  in (0, 1))        how long a past surprise keeps pushing
#   α_t  forget gate        (`alpha`, in (0, 1))        how much of the old memory is erased
# C is the chunk size: tokens inside one chunk all see the memory as it was at the chunk start.
# Every memory state carries a leading batch dimension: each sequence has its own memory.
# Shapes: B batch, H heads, T tokens, d head width, h hidden width of the memory MLP.

GATE_EPS = 1e-6  # η and α are clamped to [GATE_EPS, 1 - GATE_EPS] so their logs stay finite


# -------------------------------------------------------------------------------------------------
# 2. Memory MLP (Titans §3.1; NL Eq. 89)
# -------------------------------------------------------------------------------------------------
# The memory is a function M_W whose parameters W are the state. Depth 1 is a linear map
# M_W(x) = x W (the classic fast-weight memory); depth L >= 2 is a residual MLP
# M_W(x) = x + MLP_W(x) with SiLU between layers. Each head has its own memory.

def memory_forward(weights, x):
    """Apply the memory M_W to x. weights: tuple of [B, H, d_in, d_out]; x: [B, H, T, d]."""
    h = x
    for layer, W in enumerate(weights):
        h = h @ W                                    # [B, H, T, d_out]
        if layer < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def memory_shapes(d, depth, expansion):
    """(d_in, d_out) of each layer: d -> h -> ... -> h -> d with h = expansion * d."""
    if depth == 1:
        return [(d, d)]
    h = expansion * d
    return [(d, h)] + [(h, h)] * (depth - 2) + [(h, d)]


def init_memory_weights(heads, d, depth, expansion):
    """Learned initial weights W⁰ (the meta state), one [H, d_in, d_out] tensor per layer."""
    weights = []
    for d_in, d_out in memory_shapes(d, depth, expansion):
        W = torch.randn(heads, d_in, d_out) / math.sqrt(d_in)
        if depth > 1 and d_out == d:
            W = W * 0.1  # the residual branch starts small, so M(x) ≈ x at initialization
        weights.append(nn.Parameter(W))
    return nn.ParameterList(weights)


def per_sample(weights, batch):
    """Broadcast meta weights [H, ...] to a per-sample state [B, H, ...] (a view, no copy)."""
    return tuple(W.unsqueeze(0).expand(batch, *W.shape) for W in weights)


# -------------------------------------------------------------------------------------------------
# 3. Inner loss and surprise (Titans Eq. 12)
# -------------------------------------------------------------------------------------------------
# The memory is trained, inside the forward pass, to map keys to values:
#     ℓ_t(W) = ‖M_W(k_t) − v_t‖²      (summed over features)
# The per-token surprise s_t is ℓ_t at the weights the token's gradient is taken at. The gradient
# of ℓ_t w.r.t. each layer's weights is an outer product x_tᵀ δ_t of that layer's input and its
# backpropagated error. We compute x and δ for all tokens at once, by hand (it is the textbook
# backward pass of an MLP), so that weighted sums of gradients become matmuls in §5.

def silu_derivative(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def inner_loss_terms(weights, keys, values):
    """Per-token loss ℓ_t and, per layer, the inputs x and errors δ with ∇_W ℓ_t = x_tᵀ δ_t.

    weights: tuple of [B, H, d_in, d_out]; keys, values: [B, H, n, d].
    Returns loss [B, H, n], inputs and deltas (lists, one [B, H, n, ·] tensor per layer).
    """
    inputs, preacts = [], []
    h = keys
    for layer, W in enumerate(weights):
        inputs.append(h)
        z = h @ W                                    # [B, H, n, d_out]
        if layer < len(weights) - 1:
            preacts.append(z)
            h = F.silu(z)
        else:
            h = z
    prediction = h if len(weights) == 1 else keys + h
    error = prediction - values                      # [B, H, n, d]
    loss = error.pow(2).sum(-1)                      # [B, H, n]   Titans Eq. 12
    delta = 2 * error                                # dℓ/d(last layer's output); the skip adds I
    deltas = [None] * len(weights)
    for layer in reversed(range(len(weights))):
        deltas[layer] = delta
        if layer > 0:
            delta = (delta @ weights[layer].transpose(-1, -2)) * silu_derivative(preacts[layer - 1])
    return loss, inputs, deltas


def surprise_gate(surprise, threshold, relative, eps=1e-12):
    """1 for tokens that may write, 0 for tokens whose surprise is below the threshold γ.

    Absolute mode compares s_t with γ. Relative mode compares s_t / (mean s over its chunk) with γ,
    so it adapts to the scale of the loss. (With C = 1 every token's relative score is 1.)
    surprise: [B, H, n] for one chunk; returns a float mask of the same shape.
    """
    if threshold is None:
        return None
    score = surprise / (surprise.mean(-1, keepdim=True) + eps) if relative else surprise
    return (score >= threshold).to(surprise.dtype)


# -------------------------------------------------------------------------------------------------
# 4. The update rule, token by token (Titans Eqs. 9-14)
# -------------------------------------------------------------------------------------------------
#     S_t = η_t S_{t−1} − θ_t ∇ℓ_t(W_a(t))          momentum of surprise        (Eqs. 10, 12)
#     W_t = (1 − α_t) W_{t−1} + S_t                  forgetting + write          (Eq. 13)
#     y_t = M_{W_a(t)}(q_t)                          read before write           (Eq. 15)
# a(t) is the last token of the previous chunk: every token of a chunk takes its gradient at, and
# reads, the chunk-start weights (C = 1 is the plain online rule). This loop is the readable
# reference; §5 computes exactly the same numbers much faster.

def _token_gradient(weights, key, value, create_graph):
    """∇_W ℓ(W) for one token (all samples and heads at once) via autograd on the weights."""
    with torch.enable_grad():
        leaves = tuple(W if (create_graph and W.requires_grad) else W.detach().requires_grad_()
                       for W in weights)
        loss = (memory_forward(leaves, key) - value).pow(2).sum()
        return torch.autograd.grad(loss, leaves, create_graph=create_graph)


def _memory_update_sequential(weights, momentum, keys, values, queries, lr, beta, alpha,
                              chunk_size, threshold, relative):
    T = keys.shape[2]
    create_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*weights, *momentum, keys, values, lr, beta, alpha))
    outputs, surprises = [], []
    for start in range(0, T, chunk_size):
        anchor = weights                             # W_a: the weights at the chunk start
        chunk = slice(start, min(start + chunk_size, T))
        surprise = inner_loss_terms(anchor, keys[:, :, chunk], values[:, :, chunk])[0].detach()
        surprises.append(surprise)                   # [B, H, n]
        gate = surprise_gate(surprise, threshold, relative)
        for i, t in enumerate(range(chunk.start, chunk.stop)):
            if queries is not None:
                outputs.append(memory_forward(anchor, queries[:, :, t:t + 1]))
            grads = _token_gradient(anchor, keys[:, :, t:t + 1], values[:, :, t:t + 1], create_graph)
            lr_t = lr[:, :, t] if gate is None else lr[:, :, t] * gate[:, :, i]
            lr_t, beta_t, alpha_t = (g[:, :, None, None] for g in (lr_t, beta[:, :, t], alpha[:, :, t]))
            momentum = tuple(beta_t * S - lr_t * g for S, g in zip(momentum, grads))
            weights = tuple((1 - alpha_t) * W + S for W, S in zip(weights, momentum))
    outputs = torch.cat(outputs, dim=2) if queries is not None else None
    return outputs, weights, momentum, torch.cat(surprises, dim=2)


# -------------------------------------------------------------------------------------------------
# 5. The update rule, one chunk at a time (Titans §3.2, Eqs. 16-18, with momentum)
# -------------------------------------------------------------------------------------------------
# Unroll §4 over a chunk of n tokens from the anchor (W_a, S_a), with u_i = θ_i ∇ℓ_i(W_a) and the
# decay products E(t,i) = Π_{i<j≤t} η_j and A(t,i) = Π_{i<j≤t} (1 − α_j):
#     S_n = E(n,0) S_a − Σ_i E(n,i) u_i
#     W_n = A(n,0) W_a + [Σ_{r=1..n} A(n,r) E(r,0)] S_a − Σ_i [Σ_{r=i..n} A(n,r) E(r,i)] u_i
# So the chunk's end state is a weighted sum of its tokens' gradients. Every gradient is an outer
# product x_iᵀ δ_i (§3), hence Σ_i c_i u_i = Xᵀ diag(c θ) Δ: one matmul, no per-token gradients.
# Products of decays are sums of logs, taken as masked segment sums (never differences of
# cumulative sums, which turn into −inf − (−inf) = NaN, and never divisions of cumulative products).

def segment_sum(x):
    """out[..., t, i] = Σ_{i<j≤t} x[..., j] for i ≤ t, −inf above the diagonal. x: [..., m]."""
    m = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, m)          # [..., j, i] = x_j
    below = torch.tril(torch.ones(m, m, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    on_or_below = torch.tril(torch.ones(m, m, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~on_or_below, -math.inf)


def chunk_coefficients(beta, alpha):
    """Decay coefficients of the chunk form for chunks laid out as beta, alpha: [..., n].

    Returns (momentum_keep, weight_keep, momentum_into_weight, momentum_coef, weight_coef):
    E(n,0), A(n,0), Σ_{r≥1} A(n,r)E(r,0) of shape [...], and E(n,i), Σ_{r≥i} A(n,r)E(r,i) of
    shape [..., n] (to be multiplied by θ_i). Index 0 of the segment sums is the anchor.
    """
    pad = (1, 0)  # position 0 = the anchor, whose own factor is never used
    log_E = segment_sum(F.pad(torch.log(beta), pad))          # [..., n+1, n+1]
    log_A = segment_sum(F.pad(torch.log1p(-alpha), pad))
    E, A = log_E.exp(), log_A.exp()
    E_last, A_last = E[..., -1, :], A[..., -1, :]             # E(n, i), A(n, r)   [..., n+1]
    # K[i] = Σ_{r=1..n} A(n,r) E(r,i): E(r,i) = 0 for r < i, so the sum runs over r ≥ max(i, 1)
    K = (A_last[..., None, 1:] @ E[..., 1:, :]).squeeze(-2)   # [..., n+1]
    return E_last[..., 0], A_last[..., 0], K[..., 0], E_last[..., 1:], K[..., 1:]


def _chunk_step(weights, momentum, keys, values, queries, lr, coefficients, threshold, relative):
    """Advance (W, S) over one chunk of n tokens; read before write. Shapes as in memory_update."""
    momentum_keep, weight_keep, momentum_into_weight, momentum_coef, weight_coef = coefficients
    outputs = memory_forward(weights, queries) if queries is not None else None
    loss, inputs, deltas = inner_loss_terms(weights, keys, values)
    surprise = loss.detach()                                  # [B, H, n]
    gate = surprise_gate(surprise, threshold, relative)
    if gate is not None:
        lr = lr * gate                                        # gated tokens write nothing (§8)
    coef = torch.stack([momentum_coef * lr, weight_coef * lr], dim=2)   # [B, H, 2, n]
    E0, A0, K0 = (c[:, :, None, None] for c in (momentum_keep, weight_keep, momentum_into_weight))
    new_weights, new_momentum = [], []
    for W, S, x, delta in zip(weights, momentum, inputs, deltas):
        # Σ_i c_i x_iᵀ δ_i for both coefficient sets in one batched matmul     [B, H, 2, d_in, d_out]
        weighted = (x.unsqueeze(2) * coef[..., None]).transpose(-1, -2) @ delta.unsqueeze(2)
        new_momentum.append(E0 * S - weighted[:, :, 0])
        new_weights.append(A0 * W + K0 * S - weighted[:, :, 1])
    return outputs, tuple(new_weights), tuple(new_momentum), surprise


def _memory_update_parallel(weights, momentum, keys, values, queries, lr, beta, alpha,
                            chunk_size, threshold, relative, checkpoint):
    B, H, T, _ = keys.shape
    n_full, tail = divmod(T, chunk_size)
    # Decay coefficients do not depend on the memory, so all chunks get theirs in one batch.
    split = n_full * chunk_size
    full = chunk_coefficients(*(g[:, :, :split].reshape(B, H, n_full, chunk_size)
                                for g in (beta, alpha)))           # each [B, H, chunks, ...]
    blocks = [tuple(c[:, :, index] for c in full) for index in range(n_full)]
    if tail:
        blocks.append(chunk_coefficients(beta[:, :, split:], alpha[:, :, split:]))
    outputs, surprises = [], []
    step = _chunk_step
    if checkpoint and torch.is_grad_enabled():
        def step(*args):
            return recompute_in_backward(_chunk_step, *args, use_reentrant=False)
    for index, coefficients in enumerate(blocks):
        chunk = slice(index * chunk_size, min((index + 1) * chunk_size, T))
        out, weights, momentum, surprise = step(
            weights, momentum, keys[:, :, chunk], values[:, :, chunk],
            queries[:, :, chunk] if queries is not None else None, lr[:, :, chunk],
            coefficients, threshold, relative)
        outputs.append(out)
        surprises.append(surprise)
    outputs = torch.cat(outputs, dim=2) if queries is not None else None
    return outputs, weights, momentum, torch.cat(surprises, dim=2)


def memory_update(params, momentum, keys, values, queries, lr, beta, alpha, chunk_size,
                  parallel=True, threshold=None, relative=False, checkpoint=False):
    """Read and write a neural memory over a sequence: the functional core of the project.

    params, momentum: tuples of [B, H, d_in, d_out] (the memory state, §2, and its momentum)
    keys, values:     [B, H, T, d]     what to store (k_t -> v_t)
    queries:          [B, H, T, d]     what to read, or None when only the write is needed
    lr, beta, alpha:  [B, H, T]        θ_t, η_t, α_t (η and α are clamped to [1e-6, 1 − 1e-6])
    chunk_size:       C; tokens of a chunk read and take gradients at the chunk-start weights
    parallel:         True: the chunk form of §5; False: the token loop of §4 (same numbers)
    threshold:        surprise gate γ of §8 (None: no gate); relative: score s_t / chunk mean
    checkpoint:       recompute each chunk in backward, keeping only the chunk-boundary states

    Returns (outputs [B, H, T, d] or None, new params, new momentum, surprise [B, H, T] detached).
    Nothing is modified in place; a final partial chunk is updated with its own tokens only.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    params, momentum = tuple(params), tuple(momentum)
    device_type = keys.device.type
    with torch.autocast(device_type, enabled=False):         # the memory always runs in fp32+
        dtype = torch.promote_types(keys.dtype, torch.float32)
        params, momentum = (tuple(t.to(dtype) for t in ts) for ts in (params, momentum))
        keys, values, lr, beta, alpha = (t.to(dtype) for t in (keys, values, lr, beta, alpha))
        queries = queries.to(dtype) if queries is not None else None
        beta = beta.clamp(GATE_EPS, 1 - GATE_EPS)
        alpha = alpha.clamp(GATE_EPS, 1 - GATE_EPS)
        if parallel:
            return _memory_update_parallel(params, momentum, keys, values, queries, lr, beta,
                                           alpha, chunk_size, threshold, relative, checkpoint)
        return _memory_update_sequential(params, momentum, keys, values, queries, lr, beta,
                                         alpha, chunk_size, threshold, relative)


# -------------------------------------------------------------------------------------------------
# The Titans memory layer (Titans §3.1 and §4.4)
# -------------------------------------------------------------------------------------------------
# x -> shared input projection -> depthwise causal conv (window 4) -> heads of width d. From there:
# q, k, v = SiLU of per-head linear maps (k, q then L2-normalized), and the per-head, per-token
# rates θ = lr_max·σ(·), η = σ(·), α = σ(·) from linear maps. The layer reads the memory with q and
# writes k -> v into it with §5. Its state (weights, momentum, conv tail) can be carried across
# calls, so a caller can feed a long sequence in pieces.

@dataclass
class MemoryState:
    """One layer's memory: per-sample weights and momentum (tuples of [B, H, d_in, d_out])."""
    weights: tuple
    momentum: tuple

    def detach(self):
        return MemoryState(tuple(w.detach() for w in self.weights),
                           tuple(s.detach() for s in self.momentum))


def zero_momentum(weights):
    return tuple(torch.zeros_like(w) for w in weights)


class CausalConv(nn.Module):
    """Depthwise causal 1-D convolution over time; the last `window - 1` inputs are its state."""

    def __init__(self, channels, window=4):
        super().__init__()
        self.window = window
        self.conv = nn.Conv1d(channels, channels, window, groups=channels)

    def forward(self, x, tail=None):
        """x: [B, T, channels]; tail: [B, window-1, channels] or None (zeros). Returns (y, tail)."""
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.window - 1, x.shape[2])
        padded = torch.cat([tail, x], dim=1)                       # [B, window-1+T, channels]
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)      # [B, T, channels]
        return y, padded[:, -(self.window - 1):]


def split_heads(x, heads):
    """[B, T, H*d] -> [B, H, T, d]"""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def merge_heads(x):
    """[B, H, T, d] -> [B, T, H*d]"""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


class HeadLinear(nn.Module):
    """Independent linear maps per head: [B, H, T, d_in] -> [B, H, T, d_out]."""

    def __init__(self, heads, d_in, d_out, bias=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.full((heads, 1, d_out), float(bias)))

    def forward(self, x):
        return x @ self.weight + self.bias


class NeuralMemory(nn.Module):
    """Titans neural long-term memory: read before write, chunk-parallel, state carried."""

    def __init__(self, dim, heads, d_head, depth=2, expansion=2, chunk_size=16, lr_max=0.1,
                 threshold=None, relative=False, checkpoint=False):
        super().__init__()
        self.heads, self.chunk_size, self.lr_max = heads, chunk_size, lr_max
        self.threshold, self.relative, self.checkpoint = threshold, relative, checkpoint
        self.in_proj = nn.Linear(dim, heads * d_head, bias=False)
        self.conv = CausalConv(heads * d_head)
        self.to_qkv = HeadLinear(heads, d_head, 3 * d_head)
        # θ, η, α biases start at lr_max/2, η ≈ 0.88, α ≈ 0.02
        self.to_rates = HeadLinear(heads, d_head, 1)
        self.to_momentum_decay = HeadLinear(heads, d_head, 1, bias=2.0)
        self.to_forget = HeadLinear(heads, d_head, 1, bias=-4.0)
        self.initial_weights = init_memory_weights(heads, d_head, depth, expansion)
        self.out_proj = nn.Linear(heads * d_head, dim, bias=False)

    def initial_state(self, batch):
        weights = per_sample(self.initial_weights, batch)
        return MemoryState(weights, zero_momentum(weights))

    def features(self, x, conv_tail=None):
        """x: [B, T, dim] -> per-head features [B, H, T, d] and the new conv tail."""
        feats, conv_tail = self.conv(self.in_proj(x), conv_tail)
        return split_heads(feats, self.heads), conv_tail

    def queries_keys_values(self, feats):
        q, k, v = F.silu(self.to_qkv(feats)).chunk(3, dim=-1)      # each [B, H, T, d]
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def rates(self, feats):
        """θ, η, α, each [B, H, T]."""
        lr = self.lr_max * torch.sigmoid(self.to_rates(feats)).squeeze(-1)
        momentum_decay = torch.sigmoid(self.to_momentum_decay(feats)).squeeze(-1)
        forget = torch.sigmoid(self.to_forget(feats)).squeeze(-1)
        return lr, momentum_decay, forget

    def _update(self, feats, state, read):
        q, k, v = self.queries_keys_values(feats)
        out, weights, momentum, surprise = memory_update(
            state.weights, state.momentum, k, v, q if read else None, *self.rates(feats),
            self.chunk_size, threshold=self.threshold, relative=self.relative,
            checkpoint=self.checkpoint)
        self.last_surprise = surprise                               # [B, H, T], for analysis
        return out, MemoryState(weights, momentum)

    def read(self, feats, state):
        """M_W(q) at the given state for every token (no write). Returns [B, T, dim]."""
        q, _, _ = self.queries_keys_values(feats)
        return self.out_proj(merge_heads(memory_forward(state.weights, q).to(feats.dtype)))

    def write(self, feats, state):
        """Write every token of feats into the memory (Titans Eqs. 9-14); no read."""
        return self._update(feats, state, read=False)[1]

    def forward(self, x, state=None, conv_tail=None):
        """Read before write over x: [B, T, dim]. Returns (y [B, T, dim], state, conv_tail)."""
        state = state if state is not None else self.initial_state(x.shape[0])
        feats, conv_tail = self.features(x, conv_tail)
        out, state = self._update(feats, state, read=True)
        return self.out_proj(merge_heads(out.to(x.dtype))), state, conv_tail
