"""
test_hope.py — pytest + Hypothesis tests for hope.py and its scripts.

    python -m pytest -q                  # everything: what .ci/run runs (with CI set: derandomized)
    python -m pytest -q -m "not slow"    # the quick loop: no subprocesses, torchrun or compiles

Four sections, in the order of the code they test:
  1. The memory core (hope.py §2-7): memory_update against its token loop and independent write-ups.
     The discrete flags (write rule × depth 1-3 × read mode × gate × queries = keys) are pytest
     parameters (Cell), so every valid cell runs on every run; Hypothesis draws only shapes (batch,
     heads, widths, expansion, T, C from 1 to beyond T) and continuous values (rates anywhere in
     (0, 1), 1e-6 from either end mixed in, nonzero initial momentum). It shows that the chunk form
     equals the token loop (values and gradients w.r.t. every input), C = 1 is the online rule, the
     write rules solve what they claim, state carries across calls, nothing sees the future, samples
     never interact, the gate is the rates zeroed below γ (formula written out here), float32 agrees
     with float64, clamped rates, no side effects, checkpointing, write-only and frozen calls, torch.compile,
     and bad input give what they should.
  2. The HOPE model (hope.py §8-11), tiny float64 configs, every ablation row and every mixer.
  3. Training (train.py): end to end, data, flags, checkpoints and resume, what stops a run, torchrun,
     sampling.
  4. The scripts: ablate.py, analyze.py, and what bench.py's numbers are made of.
"Agree" means |a − b| ≤ atol + rtol·|b| element by element (assert_close): rtol = atol = 1e-9 between
the two paths, 1e-12 where the same numbers should come out. Examples whose values pass 1e6 are
skipped as blown up (assume_tame), and a disagreement that a 1e-12 nudge of the inputs reproduces is
skipped as rounding amplified by the dynamics (assert_paths_agree).
"""
import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.compile_fx
from hypothesis import Phase, assume, example, given, settings
from hypothesis import strategies as st

import ablate
import analyze
import bench
import hope
import train
from hope import NeuralMemory, memory_shapes, memory_update

torch.set_num_threads(1)              # tiny ops: see conftest.py
train.fast_cpu_math()                 # as the scripts do


# ===============================================================================================
# 1. The memory core (hope.py §2-7): memory_update and NeuralMemory, float64 unless stated
# ===============================================================================================

# --- 1.1 problems, cells, comparisons

PATHS_RTOL = 1e-9      # parallel vs sequential, values and gradients (hope.py §5)
SAME_RTOL = 1e-12      # "changes nothing": a real leak is many orders of magnitude larger
RATE_EXTREMES = (1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6)   # all inside hope.py's clamp [1e-6, 1-1e-6]
SEQUENCE_FIELDS = ("keys", "values", "queries", "lr", "momentum_decay", "forget")


@dataclass
class MemoryProblem:
    """The arguments of one memory_update call (float64 unless built otherwise)."""
    weights: tuple
    momentum: tuple
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    lr: torch.Tensor
    momentum_decay: torch.Tensor
    forget: torch.Tensor
    chunk_size: int
    seed: int
    read_mode: str = "chunk_start"
    write_rule: str = "titans"

    @property
    def T(self):
        return self.keys.shape[2]

    def tensors(self):
        return [*self.weights, *self.momentum, *(getattr(self, f) for f in SEQUENCE_FIELDS)]

    def with_tensors(self, tensors):
        """The same problem with `tensors` (in the order of tensors()) substituted."""
        n = len(self.weights)
        return replace(self, weights=tuple(tensors[:n]), momentum=tuple(tensors[n:2 * n]),
                       **dict(zip(SEQUENCE_FIELDS, tensors[2 * n:])))

    def run(self, parallel, **kwargs):
        return memory_update(self.weights, self.momentum, self.keys, self.values, self.queries,
                             self.lr, self.momentum_decay, self.forget, self.chunk_size, parallel=parallel,
                             read_mode=self.read_mode, write_rule=self.write_rule, **kwargs)

    def time_slice(self, start, stop, weights, momentum):
        """Tokens [start, stop) starting from the state (weights, momentum)."""
        t = slice(start, stop)
        return replace(self, weights=weights, momentum=momentum,
                       **{f: getattr(self, f)[:, :, t] for f in SEQUENCE_FIELDS})


def titans_memory(dim, heads, d_head, depth=2, chunk_size=16):
    """A NeuralMemory with no surprise gate (the rest as HOPEConfig's defaults)."""
    return NeuralMemory(hope.HOPEConfig(dim=dim, heads=heads, d_head=d_head, memory_depth=depth,
                                        chunk_size=chunk_size, surprise=False))


def unit_vectors(gen, shape, dtype=torch.float64):
    """Random vectors of norm 1 along the last axis (NeuralMemory L2-normalizes keys, queries)."""
    x = torch.randn(shape, generator=gen, dtype=dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@st.composite
def rate_tensors(draw, shape):
    """[B, H, T] rates in (0, 1): per token a uniform draw or one of the extremes (1e-6 from
    either end), or one such value for every token."""
    value = st.one_of(st.floats(1e-6, 1 - 1e-6), st.sampled_from(RATE_EXTREMES))
    n = math.prod(shape)
    values = ([draw(value)] * n if draw(st.booleans())
              else draw(st.lists(value, min_size=n, max_size=n)))
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


DEPTHS = (1, 2, 3)
GATES = (None, "absolute", "relative")


@dataclass(frozen=True)
class Cell:
    """One point of the memory core's discrete flag space: the equivalence tests run every valid cell
    (pytest parameters) and let Hypothesis draw only shapes and continuous values inside it."""
    write_rule: str = "titans"
    depth: int = 2
    read_mode: str = "chunk_start"
    gate: str = None                      # None, "absolute" or "relative" (gate_kwargs picks γ)
    queries_are_keys: bool = False        # one tensor passed as both (NeuralMemory's fast path)

    def valid(self):
        """memory_update rejects in-chunk reads with the relative gate or the proximal rule (their chunk
        mean and chunk solve see later tokens)."""
        return not (self.read_mode == "in_chunk" and (self.gate == "relative" or self.write_rule == "proximal"))

    def __str__(self):
        return "-".join([self.write_rule, f"depth{self.depth}", self.read_mode, self.gate or "ungated"]
                        + ["q=k"] * self.queries_are_keys)


def cells(write_rules=hope.WRITE_RULES, depths=DEPTHS, read_modes=hope.READ_MODES, gates=GATES,
          queries_are_keys=(False,)):
    """Every valid Cell of these flags, as pytest parameters named by their flags."""
    grid = [Cell(*flags) for flags in itertools.product(write_rules, depths, read_modes, gates, queries_are_keys)]
    return [pytest.param(cell, id=str(cell)) for cell in grid if cell.valid()]


@st.composite
def memory_problems(draw, cell=None, min_batch=1, max_batch=2, min_T=1, max_T=20, several_chunks=False):
    """A random memory_update call in `cell` (its depth, rule, read mode, queries; None: depth drawn,
    the rest as Cell's defaults). C runs from 1 to beyond T (T < C, T % C != 0 included), or below T
    when `several_chunks`; initial momentum is usually nonzero."""
    B = draw(st.integers(min_batch, max_batch), label="batch")
    H = draw(st.integers(1, 2), label="heads")
    d = draw(st.integers(1, 6), label="d_head")
    cell = cell or Cell(depth=draw(st.sampled_from(DEPTHS), label="depth"))
    depth = cell.depth
    expansion = draw(st.integers(1, 2), label="expansion")
    T = draw(st.integers(max(min_T, 2 if several_chunks else 1), max_T), label="T")
    C = draw(st.integers(1, T - 1) if several_chunks else st.integers(1, T + 4), label="C")
    momentum_scale = draw(st.sampled_from([0.0, 0.1, 1.0]), label="momentum scale")
    lr, momentum_decay, forget = (draw(rate_tensors((B, H, T)), label=name) for name in ("θ", "η", "α"))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    weights = tuple(torch.randn(B, H, d_in, d_out, generator=gen, dtype=torch.float64)
                   / math.sqrt(d_in) for d_in, d_out in memory_shapes(d, depth, expansion))
    momentum = tuple(momentum_scale * torch.randn(W.shape, generator=gen, dtype=torch.float64)
                     / math.sqrt(W.shape[-2]) for W in weights)
    keys, queries = (unit_vectors(gen, (B, H, T, d)) for _ in range(2))
    values = torch.randn(B, H, T, d, generator=gen, dtype=torch.float64)
    return MemoryProblem(weights, momentum, keys, values, keys if cell.queries_are_keys else queries, lr,
                         momentum_decay, forget, C, seed, cell.read_mode, cell.write_rule)


def named(result):
    """(name, tensor) pairs of a memory_update result (outputs, weights, momentum, surprise)."""
    outputs, weights, momentum, surprise = result
    return ([("outputs", outputs)] + [(f"weights[{i}]", W) for i, W in enumerate(weights)]
            + [(f"momentum[{i}]", S) for i, S in enumerate(momentum)] + [("surprise", surprise)])


def assert_close(actual, expected, rtol, what, atol=None):
    """|actual − expected| ≤ atol + rtol·|expected| element by element (atol = rtol unless given: the
    inputs are O(1), so an element that cancels to ~0 is held to rtol of that scale); NaN fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = rtol if atol is None else atol
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    if expected.numel() and not bool((excess <= 0).all()):                 # NaN compares False
        i = tuple(torch.nonzero(~(excess <= 0))[0].tolist())
        raise AssertionError(f"{what}: at {i}, {actual[i].item():.17g} != {expected[i].item():.17g} "
                             f"(rtol {rtol:g}, atol {atol:g})")


def assert_results_close(actual, expected, rtol, prefix=""):
    for (name, a), (_, e) in zip(named(actual), named(expected)):
        assert_close(a, e, rtol, prefix + name)


NUDGE = 1e-12          # see assert_paths_agree


def nudged(problem):
    """The problem with every input multiplied by 1 + NUDGE·noise: a perturbation some ten thousand
    roundings large (keys passed as queries stay one tensor)."""
    gen = torch.Generator().manual_seed(problem.seed + 1)
    moved = {id(t): t * (1 + NUDGE * torch.randn(t.shape, generator=gen, dtype=t.dtype)) for t in problem.tensors()}
    return problem.with_tensors([moved[id(t)] for t in problem.tensors()])


def assert_paths_agree(actual, expected, names, reference_of, problem, rtol=PATHS_RTOL):
    """assert_close tensor by tensor. A disagreement is no failure where rounding explains it: if the
    reference computed on the nudged problem, reference_of(nudged(problem)), moves as far from
    `expected` as `actual` is, the dynamics amplify rounding past any fixed tolerance in this example
    (a deep memory near chaos, a solve near singular), and the example is skipped."""
    try:
        for name, a, e in zip(names, actual, expected):
            assert_close(a, e, rtol, name)
    except AssertionError:
        moved = reference_of(nudged(problem))
        if any((a - e).abs().max() > (m - e).abs().max() for a, e, m in zip(actual, expected, moved)):
            raise
        assume(False)


def assert_results_agree(actual, expected, reference_of, problem, prefix=""):
    """assert_paths_agree on two memory_update results (outputs, weights, momentum, surprise)."""
    names = [prefix + name for name, _ in named(expected)]
    assert_paths_agree(result_tensors(actual), result_tensors(expected), names,
                       lambda p: result_tensors(reference_of(p)), problem)


TAME = 1e6             # examples whose values or gradients pass this are skipped (assume_tame)


def assume_tame(tensors):
    """Skip examples whose dynamics blew up (θ near 1 can make a deep memory diverge): every value
    finite and at most TAME, so that per-element tolerances are taken on numbers of sane size."""
    assume(all(t.numel() == 0 or (bool(torch.isfinite(t).all()) and t.abs().max().item() <= TAME)
               for t in tensors if t is not None))


def result_tensors(result):
    return [t for _, t in named(result)]


def gate_scores(surprise, chunk_size, relative):
    """What the gate compares with γ: s_t, or s_t / (mean of s over t's chunk), 1 where that mean is 0."""
    if not relative:
        return surprise
    scores = []
    for s in surprise.split(chunk_size, dim=-1):
        mean = s.mean(-1, keepdim=True)
        scores.append(torch.where(mean > 0, s / mean, torch.ones_like(s)))
    return torch.cat(scores, dim=-1)


def threshold_in_widest_gap(scores):
    """γ in the middle of the widest gap between the sorted scores; below all if they are equal."""
    v = torch.unique(scores.flatten())                       # sorted
    if v.numel() >= 2:
        gaps = v[1:] - v[:-1]
        i = int(gaps.argmax())
        if gaps[i] > 1e-6 * v[-1]:
            return float((v[i] + v[i + 1]) / 2)
    return float(v[0]) / 2


def gated_reference(problem, relative):
    """(γ, sequential result with that γ) such that every gate score of the gated run is at
    least 1e-6·γ away from γ, so a one-ulp difference between the paths cannot flip a gate.
    Scores after the first chunk depend on earlier gate decisions, so γ is re-picked from the
    gated run's own scores until it is consistent."""
    ungated = problem.run(False)
    assume_tame(result_tensors(ungated))
    scores = gate_scores(ungated[3], problem.chunk_size, relative)
    for _ in range(4):
        threshold = threshold_in_widest_gap(scores)
        result = problem.run(False, threshold=threshold, relative=relative)
        assume_tame(result_tensors(result))
        scores = gate_scores(result[3], problem.chunk_size, relative)
        if bool(((scores - threshold).abs() > 1e-6 * abs(threshold)).all()):
            return threshold, result
    assume(False)


def gate_kwargs(problem, mode):
    """threshold/relative keyword arguments for a gate mode, γ picked as in gated_reference."""
    if mode is None:
        return {}
    relative = mode == "relative"
    threshold, _ = gated_reference(problem, relative)
    return dict(threshold=threshold, relative=relative)


def plain_memory(weights, x):
    """M_W(x) written out here from Titans §3.1 (not with hope.py's code): x @ W for depth 1, else
    x + MLP(x) with SiLU between layers. Works on one head ([d] and [d_in, d_out]) or batched."""
    h = x
    for layer, W in enumerate(weights):
        h = h @ W
        if layer < len(weights) - 1:
            h = h * torch.sigmoid(h)
    return h if len(weights) == 1 else x + h


def perturb(problem, gen, fields, start, stop=None, samples=slice(None)):
    """A copy of `problem` whose `fields` get fresh values at positions [start, stop)."""
    changes = {}
    for name in fields:
        x = getattr(problem, name).clone()
        region = x[samples, :, start:stop]
        if name in ("lr", "momentum_decay", "forget"):
            fresh = torch.rand(region.shape, generator=gen, dtype=x.dtype) * 0.98 + 0.01
        else:
            fresh = region + torch.randn(region.shape, generator=gen, dtype=x.dtype)
        x[samples, :, start:stop] = fresh
        changes[name] = x
    return replace(problem, **changes)


# --- 1.2 the chunk form equals the token loop

def examples(n):
    """n Hypothesis examples under the ci profile (30 a test), a third of them under dev (10)."""
    return max(1, n * settings.default.max_examples // 30)


CELL_EXAMPLES = examples(3)      # in each discrete cell: the cells themselves all run


@pytest.mark.parametrize("cell", cells(queries_are_keys=(False, True)))
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_parallel_equals_sequential(cell, data):
    """The chunk form (§5) equals the token loop (§4): outputs, final weights, final momentum and
    surprise agree to 1e-9 per element, in every cell: each write rule, depth 1-3, both read modes
    (in_chunk: the dual form of §5 against reads of the loop's current weights), the gate off,
    absolute or relative (γ in the widest gap of the scores), queries apart or the keys themselves."""
    problem = data.draw(memory_problems(cell), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    reference = problem.run(False, **kwargs)
    assume_tame(result_tensors(reference))
    assert_results_agree(problem.run(True, **kwargs), reference, lambda p: p.run(False, **kwargs), problem)


def leaf_copies(tensors):
    """Fresh leaves that require grad; a tensor passed twice (queries = keys) stays one leaf."""
    copies = {}
    return [copies.setdefault(id(t), t.detach().clone().requires_grad_()) for t in tensors]


def random_projections(problem, reference):
    """Fixed random weights, one per output tensor (outputs, weights, momentum), to reduce them to
    a scalar whose gradient checks every output at once."""
    gen = torch.Generator().manual_seed(problem.seed)
    return [torch.randn(t.shape, generator=gen, dtype=t.dtype)
            for t in (reference[0], *reference[1], *reference[2])]


def project(projections, result):
    """Σ P·outputs + Σ P·new weights + Σ P·new momentum: one scalar that every output reaches."""
    outputs, weights, momentum, _ = result
    return sum((P * t).sum() for P, t in zip(projections, (outputs, *weights, *momentum)))


def gradients(problem, parallel, projections, **kwargs):
    """d/d(every input) of the projected result."""
    leaves = leaf_copies(problem.tensors())
    return torch.autograd.grad(project(projections, problem.with_tensors(leaves).run(parallel, **kwargs)), leaves)


def gradient_names(problem):
    n = len(problem.weights)
    return ([f"weights[{i}]" for i in range(n)] + [f"momentum[{i}]" for i in range(n)]
            + list(SEQUENCE_FIELDS))


@pytest.mark.parametrize("cell", cells(queries_are_keys=(False, True)))
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_gradients_parallel_equal_sequential(cell, data):
    """Gradients of a random scalar of the outputs and final state w.r.t. weights, momentum, keys,
    values, queries, θ, η, α agree between the paths to 1e-9 per element, in every cell (with the
    keys passed as queries: one tensor, one gradient)."""
    problem = data.draw(memory_problems(cell), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    reference = problem.run(False, **kwargs)
    assume_tame(result_tensors(reference))
    projections = random_projections(problem, reference)
    expected = gradients(problem, False, projections, **kwargs)
    assume_tame(expected)
    actual = gradients(problem, True, projections, **kwargs)
    assert_paths_agree(actual, expected, [f"d/d {name}" for name in gradient_names(problem)],
                       lambda p: gradients(p, False, projections, **kwargs), problem)


# --- 1.3 C = 1 is the online rule

def online_loop(problem):
    """The online recurrence written out here per sample and head, ∇ from torch.autograd.grad:
    y_t = M_{W_{t-1}}(q_t), s_t = ‖M_{W_{t-1}}(k_t) − v_t‖², S_t = η_t S_{t−1} − θ_t ∇s_t,
    W_t = (1 − α_t) W_{t−1} + S_t."""
    B, H, T, _ = problem.keys.shape
    outputs, surprise = torch.zeros_like(problem.queries), torch.zeros_like(problem.lr)
    final_W = [torch.zeros_like(W) for W in problem.weights]
    final_S = [torch.zeros_like(W) for W in problem.weights]
    for b, h in itertools.product(range(B), range(H)):
        W = [p[b, h] for p in problem.weights]
        S = [s[b, h] for s in problem.momentum]
        for t in range(T):
            outputs[b, h, t] = plain_memory(W, problem.queries[b, h, t])
            leaves = [w.detach().requires_grad_() for w in W]
            with torch.enable_grad():
                loss = (plain_memory(leaves, problem.keys[b, h, t]) - problem.values[b, h, t]).pow(2).sum()
                grads = torch.autograd.grad(loss, leaves)
            surprise[b, h, t] = loss.detach()
            theta, eta, forget = (float(r[b, h, t]) for r in (problem.lr, problem.momentum_decay, problem.forget))
            S = [eta * s - theta * g for s, g in zip(S, grads)]
            W = [(1 - forget) * w + s for w, s in zip(W, S)]
        for i in range(len(W)):
            final_W[i][b, h], final_S[i][b, h] = W[i], S[i]
    return outputs, tuple(final_W), tuple(final_S), surprise


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("depth", DEPTHS)
@settings(max_examples=examples(8))
@given(st.data())
def test_chunk_size_one_is_the_online_loop(depth, parallel, data):
    """With C = 1 the Titans rule equals the online recurrence (online_loop), at every depth; the
    chunk start is then t − 1, so both read modes read W_{t−1}: they agree exactly."""
    problem = replace(data.draw(memory_problems(Cell(depth=depth), max_T=12), label="problem"), chunk_size=1)
    reference = online_loop(problem)
    assume_tame(result_tensors(reference))
    chunk_start = problem.run(parallel)
    assert_results_agree(chunk_start, reference, online_loop, problem)
    assert_results_close(replace(problem, read_mode="in_chunk").run(parallel), chunk_start, 0.0, "in_chunk ")


# --- 1.4 the write rules

def linear_memory_chunk(gen, B, H, n, d, correlation):
    """One chunk for a linear memory (depth 1): W_a, unit keys sharing a common direction with weight
    `correlation` (0: independent), random values, zero momentum."""
    shared = unit_vectors(gen, (B, H, 1, d))
    keys = correlation * shared + (1 - correlation) * unit_vectors(gen, (B, H, n, d))
    keys = keys / keys.norm(dim=-1, keepdim=True)
    W = torch.randn(B, H, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    return W, keys, torch.randn(B, H, n, d, generator=gen, dtype=torch.float64)


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 6), st.floats(0.0, 0.95, allow_subnormal=False),
       st.floats(1e-3, 1e3))
def test_proximal_write_is_the_implicit_step(seed, n, d, correlation, theta):
    """For a linear memory, the proximal rule's steps ẽ (hope.write_steps) carry W, once momentum has
    applied each θ/(1 − η) times over, to W∞ = W_a − Kᵀ diag(1/(1 − η)) ẽ, which solves its defining equation
    W∞ = W_a − Σ_i θ̃_i ∇ℓ_i(W∞), θ̃ = θ/(1 − η), the gradients taken here by autograd at W∞ itself: for any
    θ up to 1e3 (some tokens at θ = 0, as a closed gate leaves them), any η, and correlated keys."""
    gen = torch.Generator().manual_seed(seed)
    W, keys, values = linear_memory_chunk(gen, 2, 2, n, d, correlation)
    keys, values, W = keys.flatten(0, 1), values.flatten(0, 1), W.flatten(0, 1)      # [BH, ...] as inside
    lr = theta * torch.rand(4, n, generator=gen, dtype=torch.float64) * (torch.rand(4, n, generator=gen) > 0.2)
    momentum_decay = torch.rand(4, n, generator=gen, dtype=torch.float64) * 0.99
    kernel = hope.token_kernel((W,), [keys], [keys @ W])                           # KKᵀ
    assert_close(kernel, keys @ keys.transpose(-1, -2), 1e-15, "a linear memory's kernel")
    steps = hope.write_steps("proximal", kernel, keys @ W - values, lr, momentum_decay)
    W_end = (W - keys.transpose(-1, -2) @ (steps / (1 - momentum_decay[..., None]))).requires_grad_()
    weighted_losses = ((keys @ W_end - values).pow(2).sum(-1) * lr / (1 - momentum_decay)).sum()   # Σ θ̃_i ℓ_i(W∞)
    residual = W - torch.autograd.grad(weighted_losses, W_end)[0]
    # θ̃ up to 1e5 makes the solve's condition number ~1e6, so float64 holds the equation to ~1e-10 × 1e6 =
    # 1e-6 per element; a wrong step (a missing 1/(1 − η), a Titans step) misses it by O(1)
    assert_close(W_end, residual, 1e-6, "W∞ vs W_a − Σ θ̃_i ∇ℓ_i(W∞)")


# how far a chunk's total error may end up from where it started, by rule: the proximal solve
# shrinks it; the delta rule fits the tokens in turn, so with more keys than the memory is wide the
# later ones overwrite part of the earlier ones, by a bounded amount at any θ; the Titans and
# Longhorn steps, all taken at W_a, add up and overshoot
ERROR_RATIO = {"proximal": (0.0, 1.0), "delta": (0.0, 1.5), "longhorn": (2.0, math.inf),
               "titans": (2.0, math.inf)}


@pytest.mark.parametrize("theta", [1.0, 100.0])
@pytest.mark.parametrize("write_rule", list(ERROR_RATIO))
def test_only_the_solved_writes_never_overshoot(write_rule, theta):
    """One chunk of 16 keys that share a direction (as SiLU-then-normalised keys do) in a linear memory
    of width 8, η and α at their floor: the chunk's error after the write, against before, per sample
    and head, lies in the rule's ERROR_RATIO band at θ 1 and 100."""
    gen = torch.Generator().manual_seed(0)
    W, keys, values = linear_memory_chunk(gen, 4, 2, 16, 8, correlation=0.8)
    lr = torch.full((4, 2, 16), theta, dtype=torch.float64)
    floor = torch.full((4, 2, 16), 1e-6, dtype=torch.float64)
    _, (W_n,), _, _ = memory_update((W,), (torch.zeros_like(W),), keys, values, None, lr, floor, floor, 16,
                                    write_rule=write_rule)
    before, after = ((keys @ M - values).norm(dim=(-2, -1)) for M in (W, W_n))     # per sample and head
    low, high = ERROR_RATIO[write_rule]
    ratio = after / before
    assert ((low < ratio) & (ratio < high)).all(), f"{write_rule}: error ratios {ratio.flatten().tolist()}"


@pytest.mark.parametrize("hidden_lr,keeps", [(None, True), (1.0, False)], ids=["default", "share 1"])
def test_large_writes_over_several_chunks_keep_what_earlier_chunks_stored(hidden_lr, keeps, monkeypatch):
    """16 pairs written into a depth-2 memory (width 16, keys SiLU-then-normalised as the layer makes
    them) in two chunks of 8 at θ = 10, then every key read back: with the hidden layers at their share
    of θ (hope.HIDDEN_LR) the reads are nearer their values than W⁰'s reads were (mean relative error
    below 1); with the hidden layers at the full θ, the second chunk's write, solved to first order,
    moves the features the first chunk was stored through, and the reads end up further off than
    before any write."""
    if hidden_lr is not None:
        monkeypatch.setitem(hope.HIDDEN_LR, "proximal", hidden_lr)
    gen = torch.Generator().manual_seed(0)
    B, n, d = 16, 16, 16
    mix = torch.randn(B, 1, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    keys = torch.nn.functional.silu(torch.randn(B, 1, n, d, generator=gen, dtype=torch.float64) @ mix)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    values = torch.randn(B, 1, n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    W0 = tuple(torch.randn(1, d_in, d_out, generator=gen, dtype=torch.float64) / math.sqrt(d_in) * scale
               for (d_in, d_out), scale in zip(memory_shapes(d, 2, 2), (1.0, 0.1)))   # as initialised
    W0 = tuple(W.expand(B, *W.shape) for W in W0)
    lr, floor = torch.full((B, 1, n), 10.0, dtype=torch.float64), torch.full((B, 1, n), 1e-6, dtype=torch.float64)
    _, W, _, _ = memory_update(W0, tuple(map(torch.zeros_like, W0)), keys, values, None, lr, floor, floor, 8,
                               write_rule="proximal")
    def relative_error(weights):
        return ((hope.memory_forward(weights, keys) - values).norm(dim=-1) / values.norm(dim=-1)).mean().item()
    before, after = relative_error(W0), relative_error(W)
    assert (after < 0.9 < 1.1 < before) if keeps else (after > 1.1), f"read-back error {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("write_rule", ["proximal", "delta"])
@settings(max_examples=examples(8))
@given(st.data())
def test_solved_rules_at_chunk_size_one_are_longhorn(write_rule, depth, parallel, data):
    """With one token a chunk, the proximal solve and the delta rule's triangular one are a scalar:
    both give the per-token (Longhorn) rule's numbers, at every depth."""
    problem = replace(data.draw(memory_problems(Cell(depth=depth), max_T=12), label="problem"), chunk_size=1)
    longhorn = replace(problem, write_rule="longhorn").run(parallel)
    assume_tame(result_tensors(longhorn))
    assert_results_close(replace(problem, write_rule=write_rule).run(parallel), longhorn, 1e-12)


def chunk_vs_token_loop(write_rule, seed, n, d, correlation, theta):
    """(One chunk of n tokens written into a linear memory under write_rule, η = α = 0: the final W; the
    plain online implicit step, Longhorn's, written here token after token: the final W.)"""
    gen = torch.Generator().manual_seed(seed)
    W, keys, values = linear_memory_chunk(gen, 1, 2, n, d, correlation)
    lr = theta * torch.rand(1, 2, n, generator=gen, dtype=torch.float64)
    zero = torch.zeros_like(lr)                                   # memory_update floors both at 1e-6
    _, (W_chunk,), _, _ = memory_update((W,), (torch.zeros_like(W),), keys, values, None, lr, zero, zero, n,
                                        write_rule=write_rule)
    W_loop = W
    for t in range(n):
        key, rate = keys[:, :, t:t + 1], 2 * lr[:, :, t, None, None]                   # [1, 2, 1, d]
        error = (key @ W_loop - values[:, :, t:t + 1]) / (1 + rate * key.pow(2).sum(-1, keepdim=True))
        W_loop = W_loop - rate * key.transpose(-1, -2) @ error
    return W_chunk, W_loop


@settings(max_examples=examples(20))
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(1, 6), st.floats(0.0, 0.9, allow_subnormal=False),
       st.floats(0.1, 100.0))
def test_delta_rule_is_the_token_loop_for_a_linear_memory(seed, n, d, correlation, theta):
    """For a linear memory without momentum or forgetting, one chunk under the delta rule ends where
    the online implicit step (Longhorn's), taken token after token at the weights its predecessors
    left, ends: the chunk form is exact, at any θ up to 100 and any key correlation."""
    W_chunk, W_loop = chunk_vs_token_loop("delta", seed, n, d, correlation, theta)
    # the floor's 1e-6 decay per token moves W by ~n·1e-6·|W|
    assert_close(W_chunk, W_loop, 1e-4, "delta chunk vs token loop", atol=1e-4 * W_loop.abs().max().item())


@pytest.mark.parametrize("write_rule", ["proximal", "longhorn"])
def test_other_solved_rules_are_not_the_token_loop(write_rule):
    """The break demonstration for the test above: the proximal solve (every token at once) and the
    Longhorn chunk (every token at W_a) end elsewhere than the token loop once keys correlate."""
    W_chunk, W_loop = chunk_vs_token_loop(write_rule, 0, 8, 4, 0.8, 10.0)
    assert (W_chunk - W_loop).abs().max().item() > 1e-2, f"{write_rule} matches the token loop"


def test_a_blown_up_kernel_gives_nan_not_an_exception():
    """A memory that has already blown up (G ≈ 1e13 · 11ᵀ in float32, as a diverging run reached)
    makes I + G B̃ singular to working precision: the proximal write returns NaN, which training stops
    on with one line (NonFiniteLoss), instead of raising LinAlgError from the solve."""
    kernel = torch.full((2, 4, 4), 1e13)
    error, lr, momentum_decay = torch.ones(2, 4, 3), torch.full((2, 4), 10.0), torch.zeros(2, 4)
    steps = hope.write_steps("proximal", kernel, error, lr, momentum_decay)
    assert steps.shape == error.shape and not torch.isfinite(steps).all()
    tame = hope.write_steps("proximal", kernel / 1e13, error, lr, momentum_decay)
    assert torch.isfinite(tame).all()


def test_write_rule_is_checked():
    """An unknown write rule, and the proximal rule with in-chunk reads (its solve sees the whole
    chunk), are rejected by memory_update and by HOPEConfig."""
    W, rates, x = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 3), 0.5), torch.ones(1, 1, 3, 2)
    problem = MemoryProblem((W,), (W,), x, x, x, rates, rates, rates, chunk_size=2, seed=0)
    with pytest.raises(ValueError, match="unknown write_rule 'dgd'"):
        replace(problem, write_rule="dgd").run(True)
    with pytest.raises(ValueError, match="in_chunk.*proximal"):
        replace(problem, write_rule="proximal", read_mode="in_chunk").run(False)
    with pytest.raises(ValueError, match="in_chunk takes no proximal"):
        hope.HOPEConfig(read_mode="in_chunk", write_rule="proximal").validate()
    hope.HOPEConfig(read_mode="in_chunk", write_rule="longhorn").validate()
    hope.HOPEConfig(read_mode="in_chunk", write_rule="delta").validate()


# --- 1.5 state carry

PATHS = pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])


@PATHS
@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_state_carry_equals_one_call(cell, parallel, data):
    """Two calls split at a chunk boundary, (new_weights, new_momentum) carried from the first to
    the second, equal one call on the whole sequence, in every cell."""
    problem = data.draw(memory_problems(cell, several_chunks=True), label="problem")
    C, T = problem.chunk_size, problem.T
    split = C * data.draw(st.integers(1, (T - 1) // C), label="split after chunks")
    kwargs = gate_kwargs(problem, cell.gate)
    whole = problem.run(parallel, **kwargs)
    assume_tame(result_tensors(whole))
    y1, weights, momentum, s1 = problem.time_slice(0, split, problem.weights, problem.momentum).run(parallel, **kwargs)
    y2, weights, momentum, s2 = problem.time_slice(split, T, weights, momentum).run(parallel, **kwargs)
    pieces = (torch.cat([y1, y2], 2), weights, momentum, torch.cat([s1, s2], 2))
    assert_results_agree(pieces, whole, lambda p: p.run(parallel, **kwargs), problem)


# --- 1.6 causality

@PATHS
@pytest.mark.parametrize("cell", cells(gates=(None,)))
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_memory_causality_future_inputs(cell, parallel, data):
    """Changing keys, values, queries, θ, η, α at every position ≥ s changes no output at a
    position < s."""
    problem = data.draw(memory_problems(cell, min_T=2), label="problem")
    s = data.draw(st.integers(1, problem.T - 1), label="s")
    changed = perturb(problem, torch.Generator().manual_seed(problem.seed), SEQUENCE_FIELDS, s)
    before = problem.run(parallel)[0]
    assume_tame([before])
    assert_close(changed.run(parallel)[0][:, :, :s], before[:, :, :s], SAME_RTOL, "outputs before s")


@PATHS
@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_memory_causality_within_chunk(cell, parallel, data):
    """y_t reads the chunk-start weights (chunk_start) or W_{t−1} (in_chunk): changing keys,
    values, θ, η, α at every position from the start of t's chunk on (chunk_start) or from t on
    (in_chunk), and queries after t, changes no output up to t, in every cell."""
    problem = data.draw(memory_problems(cell), label="problem")
    C = problem.chunk_size
    t = data.draw(st.integers(0, problem.T - 1), label="t")
    first = t - t % C if cell.read_mode == "chunk_start" else t
    gen = torch.Generator().manual_seed(problem.seed)
    changed = perturb(perturb(problem, gen, ("keys", "values", "lr", "momentum_decay", "forget"), first),
                      gen, ("queries",), t + 1)
    kwargs = gate_kwargs(problem, cell.gate)
    before = problem.run(parallel, **kwargs)[0]
    assume_tame([before])
    after = changed.run(parallel, **kwargs)[0]
    assert_close(after[:, :, :t + 1], before[:, :, :t + 1], SAME_RTOL, "outputs up to t")


@PATHS
@pytest.mark.parametrize("write_rule", ["titans", "longhorn", "delta"])
@given(st.data())
def test_in_chunk_reads_see_earlier_tokens_of_the_chunk(write_rule, parallel, data):
    """In the in_chunk mode y_t reads the writes of its chunk's earlier tokens: changing the key
    and value of one token s < t of t's chunk changes y_t. θ = η = 0.5 and α = 0.1 here, so that
    the change stands far above rounding (θ = 1e-6 would hide it)."""
    problem = data.draw(memory_problems(Cell(write_rule, read_mode="in_chunk")), label="problem")
    C = problem.chunk_size
    assume(C >= 2 and problem.T >= 2)
    t = data.draw(st.sampled_from([t for t in range(problem.T) if t % C]), label="t")
    s = data.draw(st.integers(t - t % C, t - 1), label="s")
    half = torch.full_like(problem.lr, 0.5)
    problem = replace(problem, lr=half, momentum_decay=half, forget=torch.full_like(half, 0.1))
    changed = perturb(problem, torch.Generator().manual_seed(problem.seed), ("keys", "values"), s, s + 1)
    before = problem.run(parallel)[0][:, :, t]
    assume_tame([before])
    change = (changed.run(parallel)[0][:, :, t] - before).abs().max().item()
    assert change > 1e-9 * before.abs().max().item(), "y_t unchanged"


def test_read_mode_is_checked():
    """An unknown read mode, and the relative gate with in_chunk reads, are rejected."""
    W, rates, x = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 3), 0.5), torch.ones(1, 1, 3, 2)
    problem = MemoryProblem((W,), (W,), x, x, x, rates, rates, rates, chunk_size=2, seed=0)
    with pytest.raises(ValueError, match="read_mode in"):
        replace(problem, read_mode="latest").run(True)
    with pytest.raises(ValueError, match="relative"):
        replace(problem, read_mode="in_chunk").run(False, threshold=0.1, relative=True)


# --- 1.7 per-sample independence

@PATHS
@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_samples_are_independent(cell, parallel, data):
    """Changing every input of sample b (its weights, momentum, keys, values, queries, rates)
    changes no output, final state or surprise of any other sample, in every cell."""
    problem = data.draw(memory_problems(cell, min_batch=2, max_batch=3), label="problem")
    b = data.draw(st.integers(0, problem.keys.shape[0] - 1), label="b")
    kwargs = gate_kwargs(problem, cell.gate)
    gen = torch.Generator().manual_seed(problem.seed)
    changed = perturb(problem, gen, SEQUENCE_FIELDS, 0, samples=b)

    def change(x):
        x = x.clone()
        x[b] += torch.randn(x[b].shape, generator=gen, dtype=x.dtype)
        return x

    changed = replace(changed, weights=tuple(map(change, problem.weights)),
                      momentum=tuple(map(change, problem.momentum)))
    others = [i for i in range(problem.keys.shape[0]) if i != b]
    before = problem.run(parallel, **kwargs)
    assume_tame(result_tensors(before))
    for (name, x), (_, y) in zip(named(changed.run(parallel, **kwargs)), named(before)):
        assert_close(x[others], y[others], SAME_RTOL, f"{name} of others")


# --- 1.8 the surprise gate

@PATHS
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
@given(st.data())
def test_zero_threshold_is_no_gate(write_rule, relative, parallel, data):
    """γ = 0 lets every token through (s_t ≥ 0): the result equals the ungated one exactly."""
    problem = data.draw(memory_problems(Cell(write_rule, depth=data.draw(st.sampled_from(DEPTHS)))))
    ungated = problem.run(parallel)
    assume_tame(result_tensors(ungated))
    for (name, x), (_, y) in zip(named(problem.run(parallel, threshold=0.0, relative=relative)), named(ungated)):
        assert torch.equal(x, y), name


def gated_by_hand(problem, threshold, relative):
    """The gated run built here without hope's gate, chunk by chunk: the chunk's surprise at its
    start weights (an ungated call over the chunk alone), its scores (gate_scores: s, or s over the
    chunk's mean), then the chunk written ungated with θ set to 0 wherever the score is below γ."""
    C, weights, momentum = problem.chunk_size, problem.weights, problem.momentum
    outputs, surprises = [], []
    for start in range(0, problem.T, C):
        chunk = problem.time_slice(start, min(start + C, problem.T), weights, momentum)
        surprise = chunk.run(False)[3]
        writes = (gate_scores(surprise, C, relative) >= threshold).to(surprise.dtype)
        y, weights, momentum, _ = replace(chunk, lr=chunk.lr * writes).run(False)
        outputs.append(y)
        surprises.append(surprise)
    return torch.cat(outputs, 2), weights, momentum, torch.cat(surprises, 2)


@PATHS
@pytest.mark.parametrize("cell", cells(gates=("absolute", "relative")))
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_gate_equals_zeroing_the_rates_of_tokens_below_threshold(cell, parallel, data):
    """The gate's formula, checked apart from hope's surprise_gate: a gated call equals gated_by_hand
    (a token writes iff s_t ≥ γ, or s_t / mean of its chunk's s ≥ γ), in every gated cell."""
    problem = data.draw(memory_problems(cell, several_chunks=data.draw(st.booleans())), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    expected = gated_by_hand(problem, kwargs["threshold"], kwargs["relative"])
    assume_tame(result_tensors(expected))
    assert_results_agree(problem.run(parallel, **kwargs), expected,
                         lambda p: gated_by_hand(p, kwargs["threshold"], kwargs["relative"]), problem)


@PATHS
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
@given(st.data())
def test_every_token_gated_only_decays(write_rule, relative, parallel, data):
    """With γ above every score and zero initial momentum, momentum stays exactly 0 and the
    weights only decay: W_T = Π_t (1 − α_t)·W⁰; every chunk reads (and scores its surprise at)
    Π_{j < chunk start} (1 − α_j)·W⁰ (products computed here)."""
    problem = data.draw(memory_problems(Cell(write_rule, depth=data.draw(st.sampled_from(DEPTHS)))))
    problem = replace(problem, momentum=tuple(torch.zeros_like(W) for W in problem.weights))
    C, T = problem.chunk_size, problem.T
    keep = 1 - problem.forget                                            # [B, H, T]
    outputs, surprise = [], []
    for t in range(T):
        decay = torch.prod(keep[:, :, :t - t % C], dim=-1)[:, :, None, None]
        anchor = [decay * W0 for W0 in problem.weights]
        outputs.append(plain_memory(anchor, problem.queries[:, :, t:t + 1]))
        error = plain_memory(anchor, problem.keys[:, :, t:t + 1]) - problem.values[:, :, t:t + 1]
        surprise.append(error.pow(2).sum(-1))
    outputs, surprise = torch.cat(outputs, 2), torch.cat(surprise, 2)
    decay = torch.prod(keep, dim=-1)[:, :, None, None]
    # relative scores s_t / mean_chunk(s) are at most C; absolute ones are known from above
    threshold = C + 1.0 if relative else 2 * surprise.max().item() + 1
    y, weights, momentum, s = problem.run(parallel, threshold=threshold, relative=relative)
    for i, S in enumerate(momentum):
        assert torch.count_nonzero(S) == 0, f"momentum[{i}] moved"
    for i, (W, W0) in enumerate(zip(weights, problem.weights)):
        assert_close(W, decay * W0, PATHS_RTOL, f"weights[{i}]")
    assert_close(y, outputs, PATHS_RTOL, "outputs")
    assert_close(s, surprise, PATHS_RTOL, "surprise")


@PATHS
@given(memory_problems(several_chunks=True))
def test_relative_gate_lets_one_token_chunks_write_at_threshold_one(parallel, problem):
    """A one-token chunk's relative score is exactly 1 (the token is its chunk's mean), so γ = 1
    lets it write: at C = 1 the gated result equals the ungated one exactly, and a final one-token
    chunk writes as if ungated (state carried from the gated chunks before it)."""
    C = problem.chunk_size
    stop = C * ((problem.T - 1) // C) + 1                   # full chunks, then one token
    ends_with_one = problem.time_slice(0, stop, problem.weights, problem.momentum)
    online = replace(problem, chunk_size=1)
    ungated = online.run(parallel)
    assume_tame(result_tensors(ungated))
    for (name, x), (_, y) in zip(named(online.run(parallel, threshold=1.0, relative=True)), named(ungated)):
        assert torch.equal(x, y), f"C = 1: {name}"
    whole = ends_with_one.run(parallel, threshold=1.0, relative=True)
    assume_tame(result_tensors(whole))
    y1, weights, momentum, s1 = ends_with_one.time_slice(0, stop - 1, problem.weights, problem.momentum) \
        .run(parallel, threshold=1.0, relative=True)
    y2, weights, momentum, s2 = ends_with_one.time_slice(stop - 1, stop, weights, momentum).run(parallel)
    pieces = (torch.cat([y1, y2], 2), weights, momentum, torch.cat([s1, s2], 2))
    assert_results_close(pieces, whole, PATHS_RTOL, "final one-token chunk: ")


@PATHS
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
def test_relative_gate_with_zero_surprise_opens_and_stays_finite(write_rule, C, parallel):
    """A chunk whose every surprise is 0 scores 1 (not 0/0), so γ = 1 lets its tokens write. Its
    errors are 0, so a write moves no weight, but it still carries the values' gradient: the gated
    gradients equal the ungated ones (finite, and nonzero w.r.t. the values), while γ = 1.5 closes
    the gate and cuts that gradient to 0. The memory maps every key to itself (its residual branch's
    last layer 0, v = k), so every s_t is exactly 0."""
    zeros = torch.zeros(2, 3, 5, dtype=torch.float64)
    assert torch.equal(hope.surprise_gate(zeros, 1.0, relative=True), torch.ones_like(zeros))
    B, H, T, d = 2, 2, 7, 4
    gen = torch.Generator().manual_seed(0)
    (d_in, hidden), (_, d_out) = memory_shapes(d, 2, 2)
    weights = (torch.randn(B, H, d_in, hidden, generator=gen, dtype=torch.float64),
               torch.zeros(B, H, hidden, d_out, dtype=torch.float64))
    keys = unit_vectors(gen, (B, H, T, d))
    rates = [torch.rand(B, H, T, generator=gen, dtype=torch.float64) for _ in range(3)]
    problem = MemoryProblem(weights, tuple(torch.zeros_like(W) for W in weights), keys, keys.clone(),
                            unit_vectors(gen, (B, H, T, d)), *rates, C, 0, write_rule=write_rule)
    assert torch.count_nonzero(problem.run(parallel)[3]) == 0, "the surprise is not 0"
    projections = random_projections(problem, problem.run(parallel))
    ungated = gradients(problem, parallel, projections)
    gated = gradients(problem, parallel, projections, threshold=1.0, relative=True)
    closed = gradients(problem, parallel, projections, threshold=1.5, relative=True)
    values = gradient_names(problem).index("values")
    assert ungated[values].abs().max() > 1e-3, "the values get no gradient through the write"
    for name, g, e in zip(gradient_names(problem), gated, ungated):
        assert_close(g, e, SAME_RTOL, f"d/d {name} with γ = 1")
    assert torch.count_nonzero(closed[values]) == 0, "a closed gate lets the values' gradient through"


# --- 1.9 numerics: float32, extremes, clamps

def float32_problem(seed, T, C, depth, eta, forget, write_rule):
    """A float32 memory_update call with η and α at 1e-6 or 1 − 1e-6 (all "low", all "high", or
    "mixed" per token), or drawn uniformly ("uniform"); θ = θ̃·(1 − η) with θ̃ up to 0.5, as RateHeads
    makes it (the implicit rules solve with θ̃: unbounded, it makes their solve as ill-conditioned as
    1 + θ̃·λ_max(G), past what float32 can resolve). The Titans rule gets θ̃ up to 0.1 (its θ_max is
    0.04 at d 4): its steps overshoot once 2θ̃·λ_max(G) passes 2, and a depth-3 memory at θ̃ 0.5 and
    C 1 turns chaotic enough that float32 and float64 part by 1 % (seed 115, T 12)."""
    B, H, d = 2, 2, 4
    gen = torch.Generator().manual_seed(seed)

    def rates(mode):
        if mode == "uniform":
            return torch.rand(B, H, T, generator=gen)
        if mode == "mixed":
            return torch.where(torch.rand(B, H, T, generator=gen) < 0.5, 1e-6, 1 - 1e-6)
        return torch.full((B, H, T), 1e-6 if mode == "low" else 1 - 1e-6)

    weights = tuple(torch.randn(B, H, i, o, generator=gen) / math.sqrt(i) for i, o in memory_shapes(d, depth, 2))
    momentum = tuple(0.1 * torch.randn(W.shape, generator=gen) for W in weights)
    keys, queries = (unit_vectors(gen, (B, H, T, d), torch.float32) for _ in range(2))
    values = torch.randn(B, H, T, d, generator=gen)
    momentum_decay = rates(eta)
    lr = (0.1 if write_rule == "titans" else 0.5) * torch.rand(B, H, T, generator=gen) * (1 - momentum_decay)
    return MemoryProblem(weights, momentum, keys, values, queries, lr, momentum_decay, rates(forget), C, seed,
                         write_rule=write_rule)


FLOAT32_RTOL = 1e-4    # float32 against float64 on O(1) numbers over up to 48 tokens


@PATHS
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
@settings(max_examples=examples(15))
@given(st.integers(0, 2**32 - 1), st.integers(1, 48), st.integers(1, 52), st.sampled_from(DEPTHS),
       st.sampled_from(["low", "high", "mixed", "uniform"]), st.sampled_from(["low", "high", "mixed", "uniform"]))
def test_float32_agrees_with_float64_and_stays_finite(write_rule, parallel, seed, T, C, depth, eta, forget):
    """float32, η and α at their extremes or anywhere: outputs, state and surprise agree with the same
    call in float64 to 1e-4 per element, and the gradients w.r.t. every input are finite. (Examples
    whose float64 dynamics leave TAME are skipped: that is growth, not a numerical fault.)"""
    problem = float32_problem(seed, T, C, depth, eta, forget, write_rule)
    reference = problem.with_tensors([t.double() for t in problem.tensors()]).run(parallel)
    assume_tame(result_tensors(reference))
    leaves = [t.clone().requires_grad_() for t in problem.tensors()]
    result = problem.with_tensors(leaves).run(parallel)
    for (name, x), (_, y) in zip(named(result), named(reference)):
        assert x.dtype == torch.float32, name
        assert_close(x.double(), y, FLOAT32_RTOL, name)
    outputs, weights, momentum, _ = result
    scalar = sum(x.sum() for x in (outputs, *weights, *momentum))
    for name, g in zip(gradient_names(problem), torch.autograd.grad(scalar, leaves)):
        assert torch.isfinite(g).all(), f"d/d {name} not finite"


@pytest.mark.parametrize("rate,value,clamped", [("momentum_decay", 0.0, hope.GATE_EPS),
                                                ("momentum_decay", -0.5, hope.GATE_EPS),
                                                ("momentum_decay", 1.0, 1 - hope.GATE_EPS),
                                                ("momentum_decay", 1.5, 1 - hope.GATE_EPS),
                                                ("forget", 0.0, hope.GATE_EPS),
                                                ("forget", 1.0, 1 - hope.GATE_EPS),
                                                ("forget", 2.0, 1 - hope.GATE_EPS)])
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
@PATHS
def test_rates_at_or_past_their_ends_are_clamped(parallel, write_rule, rate, value, clamped):
    """η and α are clamped to [GATE_EPS, 1 − GATE_EPS] (their logs stay finite): a rate at 0 or 1 or
    past either gives exactly the numbers of the clamp bound, finite, with finite gradients."""
    problem = float32_problem(0, 11, 4, 2, "uniform", "uniform", write_rule)
    problem = problem.with_tensors([t.double() for t in problem.tensors()])
    at_end, at_bound = (replace(problem, **{rate: torch.full_like(problem.lr, x)}) for x in (value, clamped))
    leaves = leaf_copies(at_end.tensors())
    result = at_end.with_tensors(leaves).run(parallel)
    bound = at_bound.with_tensors(leaf_copies(at_bound.tensors())).run(parallel)
    for (name, x), (_, y) in zip(named(result), named(bound)):
        assert torch.isfinite(x).all() and torch.equal(x, y), name
    for name, g in zip(gradient_names(at_end), torch.autograd.grad(project(random_projections(at_end, result),
                                                                           result), leaves)):
        assert torch.isfinite(g).all(), f"d/d {name} not finite"


@settings(max_examples=2, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # ~2 s a run: no shrinking
@given(st.integers(0, 2**32 - 1))
def test_neural_memory_long_sequence_finite(seed):
    """NeuralMemory(dim=64, heads=2, d_head=32) with default settings stays finite on T = 4096
    random tokens: outputs, final state, and the gradients of every parameter."""
    torch.manual_seed(seed % 2**31)
    memory = titans_memory(dim=64, heads=2, d_head=32)
    y, state = memory(torch.randn(1, 4096, 64), memory.initial_state(1))
    bad = (~torch.isfinite(y)).any(-1).nonzero()[:, 1]
    assert bad.numel() == 0, f"outputs not finite from token {bad.min().item()} of 4096 on"
    for i, W in enumerate((*state.weights, *state.momentum)):
        assert torch.isfinite(W).all(), f"state[{i}] not finite"
    y.pow(2).mean().backward()
    for name, p in memory.named_parameters():
        assert torch.isfinite(p.grad).all(), f"gradient of {name} not finite"


@pytest.mark.parametrize("kind", ["titans", "cms"])
def test_memory_stays_bounded_whatever_the_momentum(kind):
    """The worst case of a chunked write: every key of a long sequence the same, θ at θ_max and
    η near 1 (where training drives it). θ·(1 − η) keeps the state bounded there, for the Titans
    memory (C = 16) and a CMS level (period 32); a raw θ diverges to inf/NaN."""
    torch.manual_seed(0)
    config = hope.HOPEConfig(dim=32, d_head=8, cms_periods=(32,))
    memory = hope.CMS(config).levels[0] if kind == "cms" else titans_memory(dim=32, heads=4, d_head=8)
    with torch.no_grad():
        memory.rates.bias.copy_(torch.tensor([20.0, 4.0, -20.0]))     # θ = θ_max, η = 0.98, α ≈ 0
    x = torch.randn(1, 1, 32).expand(2, 1024, 32)                       # one token, 1024 times
    state = memory(x, memory.initial_state(2))[1]
    assert all(torch.isfinite(W).all() and W.abs().max() < 100 for W in state.weights)




# --- 1.10 the call: side effects, modes, bad input

@PATHS
@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_no_grad_plain_inputs_and_no_side_effects(cell, parallel, data):
    """memory_update runs under torch.no_grad() and on inputs that do not require grad, gives the
    same numbers as with grad, and never modifies an input in place (values and version
    counters unchanged, also after backward), in every cell."""
    problem = data.draw(memory_problems(cell), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    inputs = problem.tensors()
    snapshot = [(x.clone(), x._version) for x in inputs]
    plain = problem.run(parallel, **kwargs)
    assume_tame(result_tensors(plain))
    leaves = [x.clone().requires_grad_() for x in inputs]
    leaf_snapshot = [(x.detach().clone(), x._version) for x in leaves]
    with torch.no_grad():
        no_grad = problem.with_tensors(leaves).run(parallel, **kwargs)
    assert not any(t.requires_grad for t in result_tensors(no_grad))
    with_grad = problem.with_tensors(leaves).run(parallel, **kwargs)
    outputs, weights, momentum, _ = with_grad
    sum(x.sum() for x in (outputs, *weights, *momentum)).backward()
    assert_results_close(no_grad, plain, SAME_RTOL, "no_grad: ")
    assert_results_close(with_grad, plain, SAME_RTOL, "with grad: ")
    for name, x, (copy, version) in zip(2 * gradient_names(problem), inputs + leaves, snapshot + leaf_snapshot):
        assert x._version == version and torch.equal(x.detach(), copy), f"{name} modified in place"


@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_checkpointing_changes_nothing(cell, data):
    """Per-chunk activation checkpointing (checkpoint=True) gives the same outputs, state and
    gradients w.r.t. every input as without it, in every cell."""
    problem = data.draw(memory_problems(cell), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    reference = problem.run(True, **kwargs)
    assume_tame(result_tensors(reference))
    projections = random_projections(problem, reference)
    leaves = leaf_copies(problem.tensors())
    checkpointed = problem.with_tensors(leaves).run(True, checkpoint=True, **kwargs)
    assert_results_close(checkpointed, reference, SAME_RTOL, "checkpointed ")
    actual = torch.autograd.grad(project(projections, checkpointed), leaves)
    expected = gradients(problem, True, projections, **kwargs)
    assume_tame(expected)
    for name, a, e in zip(gradient_names(problem), actual, expected):
        assert_close(a, e, SAME_RTOL, f"d/d {name}")


@PATHS
@pytest.mark.parametrize("cell", cells())
@settings(max_examples=CELL_EXAMPLES)
@given(st.data())
def test_write_only_call_writes_what_a_reading_call_writes(cell, parallel, data):
    """queries=None (how every self-modifying memory writes): no outputs, and the new weights,
    momentum and surprise of the call that also reads, and their gradients w.r.t. every input."""
    problem = data.draw(memory_problems(cell), label="problem")
    kwargs = gate_kwargs(problem, cell.gate)
    reading = problem.run(parallel, **kwargs)
    assume_tame(result_tensors(reading))
    write_only = replace(problem, queries=None)
    outputs, *state = write_only.run(parallel, **kwargs)
    assert outputs is None
    assert_results_close((reading[0], *state), reading, SAME_RTOL, "write only: ")
    projections = random_projections(problem, reading)
    state_only = [torch.zeros_like(projections[0]), *projections[1:]]     # the outputs' share: none
    expected = gradients(problem, parallel, state_only, **kwargs)
    leaves = leaf_copies(problem.tensors())
    _, weights, momentum, _ = replace(problem.with_tensors(leaves), queries=None).run(parallel, **kwargs)
    scalar = sum((P * t).sum() for P, t in zip(state_only[1:], (*weights, *momentum)))
    actual = torch.autograd.grad(scalar, leaves, allow_unused=True)        # queries: unused, None
    for name, a, e in zip(gradient_names(problem), actual, expected):
        assert_close(torch.zeros_like(e) if a is None else a, e, SAME_RTOL, f"write only: d/d {name}")


@PATHS
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
@settings(max_examples=examples(8))
@given(st.data())
def test_writes_off_reads_the_initial_weights_at_every_token(write_rule, depth, parallel, data):
    """writes=False (the frozen control): every output is M_{W⁰}(q_t) and every surprise
    ‖M_{W⁰}(k_t) − v_t‖² (plain_memory, written here), and W and S come back as they went in."""
    problem = data.draw(memory_problems(Cell(write_rule, depth)), label="problem")
    outputs, weights, momentum, surprise = problem.run(parallel, writes=False)
    assert_close(outputs, plain_memory(problem.weights, problem.queries), PATHS_RTOL, "outputs")
    expected = (plain_memory(problem.weights, problem.keys) - problem.values).pow(2).sum(-1)
    assert_close(surprise, expected, PATHS_RTOL, "surprise")
    for W, W0 in zip((*weights, *momentum), (*problem.weights, *problem.momentum)):
        assert torch.equal(W, W0)


def compiled_and_counted(monkeypatch):
    """Make hope compile its chunk steps with Inductor through a backend that records each graph it
    compiled and each compile that failed: chunk_runner lets a failed compile run eagerly, so a test
    of compiled numbers must see that compiling happened."""
    outcomes = []

    def backend(graph, example_inputs):
        try:
            compiled = torch._inductor.compile_fx.compile_fx(graph, example_inputs)
        except Exception as error:
            outcomes.append(f"failed: {type(error).__name__}")
            raise
        outcomes.append("compiled")
        return compiled
    torch._dynamo.reset()
    monkeypatch.setattr(hope, "compiled", functools.cache(lambda step: torch.compile(step, backend=backend)))
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("write_rule", ["titans"])
def test_compiled_memory_update_equals_eager(write_rule, monkeypatch):
    """compile=True at the memory level: each chunk step compiles (no graph falls back to eager) and
    gives the eager outputs, state and gradients (float32, the dtype it compiles in, 1e-5 per element).
    The proximal rule compiles in the model test of §2.4 (Full HOPE's default); Longhorn's step differs
    from it only in write_steps' per-token branch (each cold compile costs CI seconds)."""
    outcomes = compiled_and_counted(monkeypatch)
    problem = float32_problem(0, 12, 4, 2, "uniform", "uniform", write_rule)   # whole chunks: one shape
    eager = problem.run(True)
    projections = random_projections(problem, eager)
    leaves = leaf_copies(problem.tensors())
    compiled = problem.with_tensors(leaves).run(True, compile=True)
    grads = torch.autograd.grad(project(projections, compiled), leaves)
    assert outcomes and all(o == "compiled" for o in outcomes), outcomes
    assert_results_close(compiled, eager, 1e-5, "compiled ")
    for name, g, e in zip(gradient_names(problem), grads, gradients(problem, True, projections)):
        assert_close(g, e, 1e-5, f"compiled d/d {name}")


def bad_calls():
    """(what is wrong, keyword changes to a good call, words the error must contain)."""
    B, H, T, d = 2, 3, 5, 4
    W = torch.zeros(B, H, d, d)
    x, rates = torch.ones(B, H, T, d), torch.full((B, H, T), 0.5)
    good = dict(weights=(W,), momentum=(W,), keys=x, values=x, queries=x, lr=rates, momentum_decay=rates,
                forget=rates, chunk_size=2)
    cases = [("chunk_size 0", dict(chunk_size=0), "chunk_size"),
             ("keys not 4-d", dict(keys=x[0]), "keys"),
             ("values of other tokens", dict(values=x[:, :, :3]), "values"),
             ("queries of another width", dict(queries=torch.ones(B, H, T, d + 1)), "queries"),
             ("rates of another length", dict(lr=rates[..., :3]), "lr"),
             ("rates per head missing", dict(forget=rates[:, 0]), "forget"),
             ("weights of another width", dict(weights=(torch.zeros(B, H, d + 1, d),), momentum=(W,)), "weights"),
             ("momentum unlike weights", dict(momentum=(torch.zeros(B, H, d, d + 1),)), "momentum"),
             ("weights of another batch", dict(weights=(torch.zeros(1, H, d, d),), momentum=(W[:1],)), "weights"),
             ("integer keys", dict(keys=x.long()), "floating"),
             ("integer rates", dict(lr=rates.long()), "floating")]
    return good, cases


@pytest.mark.parametrize("case", range(len(bad_calls()[1])), ids=[c[0] for c in bad_calls()[1]])
def test_bad_input_to_memory_update_is_one_clear_error(case):
    """Wrong shapes, dtypes or chunk size raise ValueError with a message that names the argument."""
    good, cases = bad_calls()
    _, changes, words = cases[case]
    memory_update(**good)
    with pytest.raises(ValueError, match=words):
        memory_update(**{**good, **changes})


# --- 1.11 NeuralMemory in pieces, initial weights

@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(1, 2), st.sampled_from([1, 2, 3]),
       st.integers(1, 6), st.integers(2, 4), st.integers(0, 5), st.data())
def test_neural_memory_split_equals_full(seed, batch, heads, depth, C, chunks, extra, data):
    """NeuralMemory on a whole sequence equals two calls split at a chunk boundary with
    the state (with its conv tail) carried: outputs, final state and conv tail (float64, 1e-9 relative)."""
    T = C * chunks + extra % C
    split = C * data.draw(st.integers(1, chunks - 1), label="split after chunks")
    torch.manual_seed(seed)
    memory = titans_memory(dim=8, heads=heads, d_head=4, depth=depth, chunk_size=C).double()
    x = torch.randn(batch, T, 8, dtype=torch.float64)
    y, state = memory(x, memory.initial_state(batch))
    assume_tame([y, *state.weights, *state.momentum])
    y1, state1 = memory(x[:, :split], memory.initial_state(batch))
    y2, state2 = memory(x[:, split:], state1)
    assert_close(torch.cat([y1, y2], 1), y, PATHS_RTOL, "outputs")
    for i, (a, b) in enumerate(zip((*state2.weights, *state2.momentum),
                                   (*state.weights, *state.momentum))):
        assert_close(a, b, PATHS_RTOL, f"state[{i}]")
    assert_close(state2.conv_tail, state.conv_tail, PATHS_RTOL, "conv tail")


@pytest.mark.parametrize("depth,expansion", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_initial_memory_scales_only_the_last_layer(depth, expansion):
    """init_memory_weights draws every layer with std 1/√d_in and multiplies only the last layer
    of a residual memory (depth ≥ 2) by branch_scale, also when inner layers are d wide too
    (expansion 1), so the branch starts at about branch_scale, not branch_scale^depth."""
    torch.manual_seed(0)
    d, scale = 64, 0.1
    weights = hope.init_memory_weights(8, d, depth, expansion, branch_scale=scale)
    assert [tuple(W.shape[1:]) for W in weights] == memory_shapes(d, depth, expansion)
    for layer, W in enumerate(weights):
        expected = (scale if depth > 1 and layer == depth - 1 else 1) / math.sqrt(W.shape[1])
        ratio = W.std().item() / expected                  # ≥ 32k samples: within ~1 % of 1
        assert abs(ratio - 1) < 0.05, f"layer {layer}: std is {ratio:.3f} × the expected {expected:.4f}"




# ===============================================================================================
# 2. The HOPE model (hope.py §8-11): tiny float64 configs, every ablation row and every mixer
# ===============================================================================================

TINY = dict(vocab_size=37, dim=32, layers=2, d_head=8, chunk_size=4, segment_len=8,
            cms_periods=(2, 4), persistent_tokens=2, seq_len=24)


MEMORY_ROWS = ["Full HOPE", "No CMS", "No Self-Mod", "No Surprise", "Titans", "CMS frozen", "No CMS (matched MLP)"]


CASES = [(row, mixer) for row in MEMORY_ROWS for mixer in hope.MIXERS] + \
        [("NL's HOPE", "lmm"), ("Transformer", "mac"), ("Transformer (matched)", "mac")]   # NL's: lmm alone


def tiny_model(row="Full HOPE", mixer="mac", seed=0, **overrides):
    torch.manual_seed(seed)
    config = ablate.ablation_config(row, hope.HOPEConfig(**{**TINY, "mixer": mixer, **overrides}))
    return hope.LanguageModel(config).double()


def tokens(batch=2, length=22, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# --- 2.1 every row and mixer: gradients, causality, generation, batches, the token loop

@pytest.mark.parametrize("row,mixer", CASES)
def test_every_parameter_gets_a_gradient(row, mixer):
    """Finite loss, and a nonzero gradient for every parameter (none is dead weight), but where a row
    means it: "CMS frozen" never writes its levels, so their value maps (used by writes alone) get none."""
    model = tiny_model(row, mixer)
    idx = tokens()
    _, loss = model(idx, idx.roll(-1, 1))
    assert torch.isfinite(loss)
    loss.backward()
    dead = {name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().max() > 0}
    unwritten = {name for name, _ in model.named_parameters() if ".ffn.levels." in name and ".to_value." in name}
    assert dead == (unwritten if row == "CMS frozen" else set()), f"parameters without gradient: {dead}"


def assert_causal(model):
    """Tokens changed after t (t = 0, 5, 13) change no logit up to t, and some logit after t."""
    idx = tokens()
    for t in (0, 5, 13):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 7) % TINY["vocab_size"]
        a, b = model(idx)[0], model(changed)[0]
        assert torch.equal(a[:, :t + 1], b[:, :t + 1])
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("row,mixer", CASES)
def test_causality(row, mixer):
    """Changing tokens after position t changes no logit at positions <= t."""
    assert_causal(tiny_model(row, mixer))


def assert_generation_matches_forward(model):
    """14 greedy tokens after an 11-token prompt: their logits equal one forward's to 1e-10."""
    model = model.eval()
    prompt = tokens(length=11)
    out, logits = train.generate(model, prompt, 14, temperature=0, return_logits=True)
    full = model(out[:, :-1])[0][:, prompt.shape[1] - 1:]
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("row,mixer", CASES)
def test_generate_with_carried_state_matches_full_forward(row, mixer):
    """Greedy generation, which carries state and recomputes at most one period per token, gives
    the logits of one forward over the whole generated sequence."""
    assert_generation_matches_forward(tiny_model(row, mixer))


@pytest.mark.parametrize("mixer", list(hope.MIXERS))
def test_forward_without_state_gives_the_same_logits(mixer):
    """advance(keep_state=False), which forward() uses in training and which lets MAC skip its last
    segment's write, returns no state and exactly the logits of the full advance()."""
    model = tiny_model("Full HOPE", mixer)
    idx = tokens()
    logits, state = model.advance(idx, model.initial_state(idx.shape[0]))
    same, no_state = model.advance(idx, model.initial_state(idx.shape[0]), keep_state=False)
    assert state is not None and no_state is None
    assert torch.equal(same, logits)


@pytest.mark.parametrize("row,mixer", CASES)
def test_batch_independence(row, mixer):
    """Changing one sample changes no other sample's logits (memory state is per sample)."""
    model = tiny_model(row, mixer)
    idx = tokens(batch=3)
    changed = idx.clone()
    changed[1] = (changed[1] + 5) % TINY["vocab_size"]
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("row,mixer", [("Full HOPE", mixer) for mixer in hope.MIXERS] + [("No Self-Mod", "mac"),
                                                                                     ("NL's HOPE", "lmm")])
def test_token_loop_model_equals_chunk_form(row, mixer):
    """parallel=False (every memory by §4's token loop) gives the logits, loss and parameter gradients
    of the chunk form to 1e-9 per element (float64): Full HOPE (its self-modifying memories and CMS
    levels) under every mixer, and the Titans memory."""
    def loss_and_gradients(parallel):
        model = tiny_model(row, mixer, parallel=parallel)
        logits, loss = model(tokens(), tokens(seed=2))
        loss.backward()
        return logits, {name: p.grad for name, p in model.named_parameters()}
    (chunk_logits, chunk_grads), (loop_logits, loop_grads) = loss_and_gradients(True), loss_and_gradients(False)
    assert_close(loop_logits, chunk_logits, PATHS_RTOL, "logits")
    for name, grad in chunk_grads.items():
        assert_close(loop_grads[name], grad, PATHS_RTOL, f"d/d {name}")


# --- 2.2 the rows: what a flag that is off leaves out, the unconfounded CMS rows

def test_flags_that_are_off_create_no_parameters():
    """cms off leaves no CMS level, self_mod off no self-modifying memory; the gate has no weights."""
    def modules(row):
        return {type(m).__name__ for m in tiny_model(row).modules()}
    assert "CMSLevel" in modules("Full HOPE") and "CMSLevel" not in modules("No CMS")
    assert "SelfModifyingMemory" in modules("Full HOPE")
    assert "SelfModifyingMemory" not in modules("No Self-Mod")
    assert "NeuralMemory" in modules("No Self-Mod")
    assert tiny_model("Full HOPE").num_params() == tiny_model("No Surprise").num_params()
    full = ablate.count_params(ablate.ablation_config("Full HOPE", hope.HOPEConfig(**TINY)))
    matched = ablate.ablation_config("Transformer (matched)", hope.HOPEConfig(**TINY))
    assert matched.dim % 64 == 0 and ablate.count_params(matched) >= full
    if matched.dim > 64:
        assert ablate.count_params(dataclasses.replace(matched, dim=matched.dim - 64)) < full


def test_unconfounded_cms_rows():
    """"CMS frozen" keeps CMS's parameters but never writes it (its fast weights only decay, so they
    stay proportional to W⁰ per sample and head), while the main memory still writes; "No CMS
    (matched MLP)" swaps CMS for an MLP with as many parameters (to within one hidden unit)."""
    def cms_states(row):
        model = tiny_model(row)
        state = model.advance(tokens(), model.initial_state(2))[1]
        meta = [level.initial_weights for level in model.blocks[0].ffn.levels]
        return state.layers[0], meta
    frozen, meta = cms_states("CMS frozen")
    full, _ = cms_states("Full HOPE")
    for level_frozen, level_full, level_meta in zip(frozen.ffn, full.ffn, meta):
        for W_frozen, W_full, W0 in zip(level_frozen.weights, level_full.weights, level_meta):
            cosine = torch.cosine_similarity(W_frozen.flatten(2), W0.detach().expand_as(W_frozen).flatten(2), dim=-1)
            assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-12)     # decayed, not written
            cosine = torch.cosine_similarity(W_full.flatten(2), W0.detach().expand_as(W_full).flatten(2), dim=-1)
            assert cosine.min() < 1 - 1e-6                                       # Full HOPE writes
    assert not torch.equal(frozen.mixer.memory.weights[0], tiny_model("CMS frozen").blocks[0].mixer.memory
                           .initial_state(2).weights[0])                         # the main memory writes
    base = hope.HOPEConfig(**TINY)
    matched = ablate.ablation_config("No CMS (matched MLP)", base)
    full_params = ablate.count_params(ablate.ablation_config("Full HOPE", base))
    assert matched.mlp_hidden != 4 * base.dim
    assert abs(ablate.count_params(matched) - full_params) <= base.layers * (2 * base.dim + 1)
    assert ablate.count_params(ablate.ablation_config("CMS frozen", base)) == full_params


# --- 2.3 the mechanisms: self-modification, CMS periods, the gate, frozen writes, in-chunk reads

def test_self_mod_fast_state_leaves_meta_state():
    """After one chunk, every self-modifying memory's fast weights differ from its meta weights."""
    model = tiny_model("Full HOPE", "lmm")
    idx = tokens(length=TINY["chunk_size"])
    _, state = model.advance(idx, model.initial_state(idx.shape[0]))
    for block, layer in zip(model.blocks, state.layers):
        fast = block.mixer.memory.by_component(layer.mixer.memory.weights)
        meta = block.mixer.memory.by_component(block.mixer.memory.initial_state(2).weights)
        for f, m in zip(fast, meta):
            change = (f - m).flatten(3).norm(dim=-1)                          # [B, 6, H]
            assert (change > 0).all()


def test_self_mod_chunk_one_changes_keys_generated_in_chunk_two(monkeypatch):
    """The keys written in chunk 2 are generated by the memories *after* chunk 1's write: changing
    chunk 1's tokens changes them (a version that generates from the meta state would not)."""
    calls = []
    real_update = hope.memory_update

    def spy(weights, momentum, keys, *args, **kwargs):
        calls.append(keys.detach().clone())
        return real_update(weights, momentum, keys, *args, **kwargs)

    monkeypatch.setattr(hope, "memory_update", spy)
    C = TINY["chunk_size"]
    model = tiny_model("No CMS", "lmm", layers=1)
    idx = tokens(length=2 * C)
    changed = idx.clone()
    changed[:, :C] = (changed[:, :C] + 3) % TINY["vocab_size"]
    model(idx)
    keys_a = calls[1]
    calls.clear()
    model(changed)
    keys_b = calls[1]
    assert keys_a.shape[2] == C
    assert not torch.allclose(keys_a, keys_b)


@pytest.mark.parametrize("write_rule", ["proximal", "delta", "titans"])
def test_self_generated_targets_keep_the_memory_bounded(write_rule):
    """M_mem writes M_mem(k) toward its own M_mem(v): with that target unbounded, a solved write
    multiplies the memory by I + (v − k)(…)kᵀ, whose norm can pass 1, chunk after chunk. Unit-norm
    targets make every write a contraction toward a bounded target. Over 1,024 tokens of features
    drawn from 4 recurring vectors (text repeats itself), M_mem's fast weights stay below their meta
    norm in every sequence (with raw targets: up to 10x under proximal, 25x under delta)."""
    torch.manual_seed(0)
    config = hope.HOPEConfig(vocab_size=37, dim=16, layers=1, heads=1, d_head=16, chunk_size=16,
                             mixer="lmm", cms=False, self_mod=True, surprise=False, write_rule=write_rule)
    memory = hope.SelfModifyingMemory(config).double()
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(8, 4, 16, generator=g, dtype=torch.double)               # 4 vectors a sequence
    picks = torch.randint(0, 4, (8, 1024), generator=g)
    feats = torch.nn.functional.normalize(pool[torch.arange(8)[:, None], picks], dim=-1)[:, None]
    with torch.no_grad():
        _, state = memory.read_write(feats, memory.initial_state(8), read=False)
    def m_mem_norm(weights):                                                   # [B, H]
        return torch.cat([W.flatten(2) for W in hope.component(memory.by_component(weights), "mem")], -1).norm(dim=-1)
    ratio = m_mem_norm(state.weights) / m_mem_norm(memory.initial_state(8).weights)
    assert ratio.max() < 1, ratio


@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
def test_self_mod_generators_write_at_their_share_of_the_memory_lr(write_rule, monkeypatch):
    """Step 3's rates: the five generators take GENERATOR_LR·θ (a tenth under the solved rules), M_mem
    θ itself, and all six share η and α; the rate read-outs see unit-norm features, whatever the scale
    of M_lr(x) and M_forget(x)."""
    calls, rate_inputs = [], []
    real_update = hope.memory_update

    def spy(weights, momentum, keys, values, queries, lr, momentum_decay, forget, *args, **kwargs):
        calls.append((lr.detach(), momentum_decay.detach(), forget.detach()))
        return real_update(weights, momentum, keys, values, queries, lr, momentum_decay, forget, *args, **kwargs)

    monkeypatch.setattr(hope, "memory_update", spy)
    model = tiny_model("No CMS", "lmm", layers=1, write_rule=write_rule)
    memory = model.blocks[0].mixer.memory
    memory.rates.register_forward_pre_hook(lambda module, feats: rate_inputs.append(feats))
    model(tokens(length=TINY["chunk_size"]))
    (lr, momentum_decay, forget), = calls
    lr, momentum_decay, forget = memory.by_component((lr, momentum_decay, forget))  # each [B, 6, H, n]
    share = hope.GENERATOR_LR[write_rule]
    assert share == (0.1 if write_rule in ("proximal", "delta") else 1.0)
    for c in range(5):
        torch.testing.assert_close(lr[:, c], share * lr[:, 5], rtol=1e-12, atol=0)
        assert torch.equal(momentum_decay[:, c], momentum_decay[:, 5]) and torch.equal(forget[:, c], forget[:, 5])
    lr_feats, _, forget_feats = rate_inputs[0]
    for feats in (lr_feats, forget_feats):
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones_like(feats[..., 0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arrangement", hope.CMS_ARRANGEMENTS)
def test_cms_levels_are_gated_side_by_side_or_chained(arrangement):
    """Parallel: every level reads the block's input, a softmax gate mixes their outputs. Chained (NL's
    HOPE): the slow level reads the fast level's output, and the block returns the slow level's; no gate.
    Both computed here level by level, by hand, and compared with CMS.forward (states too)."""
    torch.manual_seed(0)
    cms = hope.CMS(hope.HOPEConfig(**TINY, cms_arrangement=arrangement)).double()
    x = torch.randn(2, 12, TINY["dim"], dtype=torch.float64)
    out, states = cms(x, cms.initial_state(2))
    fast, slow = cms.levels
    fast_out, fast_state = fast(x, fast.initial_state(2))
    if arrangement == "chained":
        assert cms.gate is None
        expected, slow_state = slow(fast_out, slow.initial_state(2))
    else:
        slow_out, slow_state = slow(x, slow.initial_state(2))
        mix = torch.softmax(cms.gate(x), dim=-1)
        expected = mix[..., :1] * fast_out + mix[..., 1:] * slow_out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for state, by_hand in zip(states, (fast_state, slow_state)):
        for W, W_by_hand in zip(state.weights, by_hand.weights):
            torch.testing.assert_close(W, W_by_hand, rtol=0, atol=0)


@pytest.mark.parametrize("period", [2, 4])
def test_cms_level_weights_change_only_at_period_multiples(period):
    """A CMS level reads its memory at the state of the last multiple of its period: with the same
    input at every position, its output is constant within each period and changes across them."""
    torch.manual_seed(0)
    config = hope.HOPEConfig(**TINY)
    level = hope.CMSLevel(config, period).double()
    x = torch.randn(2, 1, config.dim, dtype=torch.float64).expand(2, 4 * period + 1, config.dim)
    y, _ = level(x, level.initial_state(2))
    scale = y.abs().max()
    for t in range(1, y.shape[1]):
        change = (y[:, t] - y[:, t - 1]).abs().max() / scale     # rows of one matmul may differ by an ulp
        if t % period:
            assert change < 1e-12, f"t={t}: weights changed inside a period"
        else:
            assert change > 1e-6, f"t={t}: weights did not change at a period boundary"


@pytest.mark.parametrize("row,mixer", [("Full HOPE", "mac"), ("No Self-Mod", "mag"), ("Full HOPE", "lmm")])
def test_gate_closed_means_no_memory_is_written(row, mixer):
    """With a threshold above every surprise, no memory (main, self-modifying, CMS) receives a
    gradient contribution: momentum stays exactly 0, and only forgetting moves the weights."""
    model = tiny_model(row, mixer, surprise_threshold=1e9)
    idx = tokens()
    _, state = model.advance(idx, model.initial_state(idx.shape[0]))
    states = [s for layer in state.layers for s in [layer.mixer.memory, *layer.ffn]]
    assert len(states) == TINY["layers"] * 3
    for s in states:
        for S in s.momentum:
            assert torch.equal(S, torch.zeros_like(S))
    open_gate = tiny_model(row, mixer, surprise_threshold=0.0)
    _, state = open_gate.advance(idx, open_gate.initial_state(idx.shape[0]))
    assert any(S.abs().max() > 0 for S in state.layers[0].mixer.memory.momentum)


def test_states_carry_the_surprise_for_analysis():
    """Every MemoryState a write returns holds the per-token surprise of that write: the mixer
    memory's (all six self-modifying ones, over the whole input) and each CMS level's."""
    model = tiny_model("Full HOPE", "mac")
    idx = tokens()
    _, state = model.advance(idx, model.initial_state(idx.shape[0]))
    H = model.config.heads
    assert state.layers[0].mixer.memory.surprise.shape == (2, 6 * H, idx.shape[1])
    assert [s.surprise.shape for s in state.layers[0].ffn] == [(2, H, idx.shape[1])] * 2


@pytest.mark.parametrize("mixer", list(hope.MIXERS))
def test_writes_off_keeps_every_memory_at_its_initial_weights(mixer):
    """writes=False (analyze.py's frozen control): after a sequence every memory still holds W⁰ and
    S = 0, while the same model with writes on has moved its memories and gives other logits."""
    frozen, live = tiny_model(mixer=mixer, writes=False), tiny_model(mixer=mixer)
    idx = tokens()
    memories = lambda state: [m for layer in state.layers for m in (layer.mixer.memory, *layer.ffn)]
    start = frozen.initial_state(idx.shape[0])
    logits, state = frozen.advance(idx, start)
    for after, before in zip(memories(state), memories(start)):
        assert all(torch.equal(W, W0) for W, W0 in zip(after.weights, before.weights))
        assert not any(S.any() for S in after.momentum)
    live_logits, live_state = live.advance(idx, live.initial_state(idx.shape[0]))
    assert not torch.allclose(logits, live_logits)
    assert not torch.equal(memories(live_state)[0].weights[0], memories(start)[0].weights[0])


@pytest.mark.parametrize("write_rule", ["titans", "longhorn", "delta"])
def test_in_chunk_read_mode_model(write_rule):
    """read_mode="in_chunk" (with a rule that writes token by token) reaches the Titans memory and
    the CMS levels (the logits change), keeps the model causal and generation with carried state
    equal to one forward (lmm mixer: memories only, so every read is in-chunk)."""
    model = tiny_model("No Self-Mod", "lmm", read_mode="in_chunk", write_rule=write_rule)
    assert_causal(model)
    assert_generation_matches_forward(model)
    idx = tokens()
    assert not torch.allclose(model(idx)[0], tiny_model("No Self-Mod", "lmm", write_rule=write_rule)(idx)[0])


# --- 2.4 chunk steps under torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: Triton's code is checked where one is"))])
def test_compiled_chunk_steps_equal_eager(device, monkeypatch):
    """compile_chunks (train.py's default on CUDA for long runs): every chunk step compiles (none falls
    back to eager: compiled_and_counted sees each graph) and gives the eager loss and gradients to
    1e-5 per element (float32, the dtype they compile in). It caught an Inductor bug: keys repeated
    for the six memories by torch.cat([k] * 6) got wrong gradients (errors of 100 %), so hope.py
    repeats them with expand."""
    def loss_and_gradients(compile_chunks):    # one layer and one CMS level: fewer graphs to compile
        model = tiny_model(compile_chunks=compile_chunks, layers=1, cms_periods=(4,)).float().to(device)
        loss = model(tokens(length=32).to(device), tokens(length=32, seed=2).to(device))[1]
        loss.backward()
        return loss.item(), {name: p.grad.cpu() for name, p in model.named_parameters()}
    eager_loss, eager = loss_and_gradients(False)
    outcomes = compiled_and_counted(monkeypatch)
    compiled_loss, compiled = loss_and_gradients(True)
    assert outcomes and all(o == "compiled" for o in outcomes), outcomes
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    for name, grad in eager.items():
        assert_close(compiled[name].double(), grad.double(), 1e-5, f"compiled d/d {name}")


@pytest.mark.slow
def test_a_failed_compile_runs_the_chunk_step_eagerly(tmp_path):
    """Where torch.compile cannot work (here: no C++ compiler), chunk_runner's step warns and runs eagerly."""
    script = """
import torch, torch._inductor.config, hope
torch._inductor.config.cpp.cxx = ("/nonexistent/g++",)
step = hope.chunk_runner(lambda x: torch.sin(x) * 2, False, True, torch.device("cpu"))
x = torch.randn(5)
assert torch.equal(step(x), torch.sin(x) * 2)
print("ran eagerly")
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}    # no cached kernel to fall back on
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ran eagerly" in done.stdout, done.stderr[-2000:]
    assert "InvalidCxxCompiler" in done.stderr


# --- 2.5 the configuration

@pytest.mark.parametrize("bad,words", [
    (dict(dim=30, heads=4), "dim 30 is not divisible by heads 4"),
    (dict(d_head=7, heads=None, dim=28), "head width 7 must be even"),
    (dict(chunk_size=0), "chunk_size must be positive, got 0"),
    (dict(lr_max=-1.0), "lr_max must be >= 0, got -1.0"),
    (dict(mixer="xyz"), "unknown mixer 'xyz'"),
    (dict(segment_len=6), "segment_len 6 must be a multiple of chunk size 4"),
    (dict(surprise_mode="nope"), "unknown surprise_mode 'nope'"),
    (dict(model="rnn"), "unknown model 'rnn'"),
    (dict(read_mode="latest"), "unknown read_mode 'latest'"),
    (dict(write_rule="dgd"), "unknown write_rule 'dgd'"),
    (dict(read_mode="in_chunk", surprise_mode="relative"), "in_chunk takes no relative surprise gate"),
    (dict(read_mode="in_chunk", write_rule="proximal"), "in_chunk takes no proximal write rule")])
def test_config_rejects_bad_values(bad, words):
    """Each bad configuration is rejected with its own message (one line, naming the value)."""
    with pytest.raises(ValueError, match=words) as error:
        hope.HOPEConfig(**{**TINY, **bad}).validate()
    assert "\n" not in str(error.value)


# ===============================================================================================
# 3. Training (train.py)
# ===============================================================================================

ROOT = os.path.dirname(os.path.abspath(__file__))


GPT = ["--model", "transformer", "--dim", "32", "--layers", "1", "--d-head", "16", "--seq-len", "32",
       "--batch-size", "4", "--lr", "3e-3"]


HOPE = ["--model", "hope", "--dim", "32", "--layers", "1", "--d-head", "16", "--seq-len", "16",
        "--chunk-size", "4", "--segment-len", "8", "--batch-size", "2", "--lr", "3e-3"]


def write_corpus(directory):
    """A small English-like text file in `directory`; returns its path."""
    rng = np.random.default_rng(0)
    words = "the king and queen of a summer night dream sweet love is not what it seems".split()
    path = directory / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(500)))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def flags(corpus, tmp_path, out="out", *extra):
    return ["--data", corpus, "--data-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / out), *extra]


def run(argv):
    return train.run(train.build_arg_parser().parse_args(argv))


# --- 3.1 end to end, and the data: corpora, baselines, the recall tasks

def test_end_to_end_transformer_log_checkpoint_and_sample(corpus, tmp_path, capsys):
    result = run(flags(corpus, tmp_path, "out", *GPT, "--steps", "6", "--eval-every", "3"))
    curve = result["curve"]
    assert [r["step"] for r in curve] == [0, 3, 6]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 0.5           # it learns
    assert result["val_loss"] == curve[-1]["val_loss"] and result["tokens_per_s"] > 0
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log == curve and set(log[-1]) == {"step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed"}
    ckpt = train.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["dim"] == 32 and ckpt["config"]["train"]["lr"] == 3e-3
    out = capsys.readouterr().out
    assert "val loss" in out and "nats/byte" in out and "bigram" in out
    train.main(["--sample", "--out-dir", str(tmp_path / "out"), "--prompt", "the king", "--num-tokens", "20"])
    assert capsys.readouterr().out.startswith("the king")


def test_end_to_end_hope_with_snapshots(corpus, tmp_path):
    result = run(flags(corpus, tmp_path, "out", *HOPE, "--steps", "4", "--eval-every", "2", "--save-every", "2"))
    assert result["step"] == 4 and result["curve"][-1]["val_loss"] < result["curve"][0]["val_loss"]
    for step in (2, 4):
        snapshot = train.load_checkpoint(tmp_path / "out" / f"ckpt_{step:06d}.pt")
        assert snapshot["step"] == step and snapshot["config"]["model"]["model"] == "hope"


def test_shakespeare_baselines_are_computed_once_on_train(tmp_path):
    train_data, val_data, meta = train.get_data("shakespeare", "byte", data_dir=str(tmp_path))
    assert train_data.dtype == np.uint16 and meta["vocab_size"] == 256
    assert abs(len(val_data) / (len(train_data) + len(val_data)) - 0.1) < 1e-3
    assert round(meta["unigram"], 2) == 3.30 and round(meta["bigram"], 2) == 2.47     # README: corpus baselines


def test_baselines_of_known_sources():
    iid = np.random.default_rng(0).integers(0, 4, 200_000)
    assert np.allclose(list(train.baselines(iid).values()), np.log(4), atol=1e-3)
    cycle = train.baselines(np.arange(200_000) % 4)                      # the next token is certain
    assert abs(cycle["unigram"] - np.log(4)) < 1e-9 and abs(cycle["bigram"]) < 1e-9


def test_mqar_batches_ask_for_the_stored_values():
    task = train.MQAR(pairs=5, keys=12, values=7)
    x, y = task.batch(np.random.default_rng(3), 16, 24)                  # 5 blanks between pairs and queries
    again = task.batch(np.random.default_rng(3), 16, 24)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])          # a pure function of the RNG
    assert x.shape == y.shape == (16, 24) and task.vocab_size == 20 and task.chance == 1 / 7
    for seq, target in zip(x.tolist(), y.tolist()):
        keys, values = seq[0:10:2], seq[1:10:2]
        assert len(set(keys)) == 5 and all(k < 12 for k in keys) and all(12 <= v < 19 for v in values)
        assert seq[10:15] == [19] * 5                                   # blanks
        stored = dict(zip(keys, values))
        answers = {t: target[t] for t in range(24) if target[t] != train.IGNORE}
        assert sorted(answers) == [15, 17, 19, 21, 23]                    # after each query key
        assert sorted(seq[t] for t in answers) == sorted(keys)           # every key asked once
        assert all(target[t] == stored[seq[t]] for t in answers)


def test_mqar_context_guess_is_what_no_recall_scores():
    """Two pairs over two values, worked by hand: both values equal (probability 1/2) is answered
    right every time; two different values make the bag guess a coin flip (3/4 in all), and ruling
    out the first answered leaves the second certain (7/8). One value only: always right."""
    bag, eliminating = train.MQAR(2, 2, 2).context_guess()
    assert abs(bag - 0.75) < 0.03 and abs(eliminating - 0.875) < 0.03, (bag, eliminating)
    assert train.MQAR(4, 8, 1).context_guess() == (1.0, 1.0)
    bag, eliminating = train.MQAR(32, 32, 32).context_guess()
    assert 1 / 32 < bag < eliminating < 0.3


def test_passkey_batches_ask_for_the_code_at_the_given_distance():
    task = train.Passkey(digits=3, distance=20)
    x, y = task.batch(np.random.default_rng(0), 32, task.default_seq_len)
    depths = set()
    for seq, target in zip(x.tolist(), y.tolist()):
        key, question = seq.index(task.KEY), seq.index(task.QUERY)
        assert seq.count(task.KEY) == seq.count(task.QUERY) == 1
        assert question - (key + 4) == 20                                 # 20 filler tokens between
        answers = [t for t in range(len(seq)) if target[t] != train.IGNORE]
        assert answers == [question, question + 1, question + 2]
        assert [target[t] for t in answers] == seq[key + 1:key + 4]     # the code, digit by digit
        depths.add(key)
    assert len(depths) > 10                                               # hidden at random depths


@pytest.mark.parametrize("data,chance", [("mqar", 1 / 32), ("passkey", 0.1)])
def test_recall_training_prints_accuracy_and_chance(tmp_path, capsys, data, chance):
    tiny = ["--dim", "32", "--layers", "1", "--d-head", "16", "--batch-size", "4", "--steps", "2",
            "--eval-every", "2", "--eval-batches", "1", "--mixer", "lmm", "--no-cms", "--no-self-mod", "--no-surprise"]
    result = run(["--data", data, "--out-dir", str(tmp_path / data), *tiny, "--passkey-distance", "8"])
    out = capsys.readouterr().out
    assert "recall accuracy" in out and f"chance {chance:.3f}" in out and "nats/answer" in out
    assert 0 <= result["accuracy"] <= 1 and result["baselines"] == {"chance": chance}


def test_recall_tasks_set_their_own_context_and_vocabulary():
    model_cfg, _ = train.resolve_config(train.build_arg_parser().parse_args(["--data", "mqar", "--mqar-pairs", "16"]))
    assert model_cfg.seq_len == 64 and model_cfg.vocab_size == 32 + 32 + 1


# --- 3.2 the command line: presets, flags, the lr rule, the inner step bound

def test_flags_override_the_preset():
    parse = train.build_arg_parser().parse_args
    model_cfg, cfg = train.resolve_config(parse([]))
    tiny = train.PRESETS["tiny"]
    assert (model_cfg.model, model_cfg.cms, model_cfg.self_mod, model_cfg.surprise) == ("hope", True, True, True)
    assert (model_cfg.dim, cfg.steps, cfg.lr, cfg.preset) == (tiny["dim"], tiny["steps"], tiny["lr"], "tiny")
    model_cfg, cfg = train.resolve_config(parse(["--preset", "small", "--no-cms", "--dim", "128", "--lr", "1e-3"]))
    assert (model_cfg.dim, model_cfg.layers, model_cfg.cms, model_cfg.seq_len) == (128, 6, False, 512)
    assert (cfg.lr, cfg.batch_size, cfg.steps) == (1e-3, 8, 2000)
    # compiling: the whole model only when asked (--compile); chunk steps, left out (None), on CUDA
    # for runs long enough to repay the compile (a device object needs no GPU)
    assert (model_cfg.compile_chunks, cfg.compile) == (None, False)
    cpu, cuda, enough = torch.device("cpu"), torch.device("cuda"), train.COMPILE_CHUNKS_AFTER
    assert [train.compile_chunks(model_cfg, device, steps) for device, steps in
            [(cpu, 10 * enough), (cuda, enough - 1), (cuda, enough)]] == [False, False, True]
    model_cfg, cfg = train.resolve_config(parse(["--compile-chunks", "--compile"]))
    assert (model_cfg.compile_chunks, cfg.compile) == (True, True)
    assert train.compile_chunks(model_cfg, cpu, 1) is True


def test_every_config_field_has_a_flag():
    """build_arg_parser makes a flag per field of hope.HOPEConfig and TrainConfig, its help from the
    field; not given, a flag is None (the preset or the checkpoint decides)."""
    parser = train.build_arg_parser()
    actions = {flag: action for action in parser._actions for flag in action.option_strings}
    for f in dataclasses.fields(hope.HOPEConfig) + dataclasses.fields(train.TrainConfig):
        action = actions["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.default is None
        assert action.help.startswith(f.metadata["help"].replace("%", "%%")), f.name
    titles = {group.title for group in parser._action_groups}
    assert {"model (hope.HOPEConfig)", "training (TrainConfig)", "sampling"} <= titles
    args = parser.parse_args(["--no-cms", "--self-mod", "--cms-periods", "4,16", "--compile", "--vocab-size", "300"])
    assert (args.cms, args.self_mod, args.cms_periods, args.compile) == (False, True, (4, 16), True)
    assert (parser.parse_args([]).cms, parser.parse_args([]).compile) == (None, None)
    model_cfg, cfg = train.resolve_config(args)
    assert (model_cfg.cms, model_cfg.cms_periods, model_cfg.vocab_size, cfg.compile) == (False, (4, 16), 300, True)
    assert train.Tokenizer("byte").decode([104, 105, 300]) == "hi"      # padded ids decode to nothing


def test_width_scales_the_lr():
    parse = train.build_arg_parser().parse_args
    model_cfg, cfg = train.resolve_config(parse(["--dim", "512"]))
    assert cfg.lr == pytest.approx(5e-4)                                 # 4e-3 × 64 / 512
    assert train.lr_summary(model_cfg, cfg).startswith("lr 5.0e-04 (scaled from 4.0e-03 at dim 64)")
    assert train.resolve_config(parse(["--dim", "512", "--lr", "1e-3"]))[1].lr == 1e-3
    assert train.resolve_config(parse(["--preset", "small", "--dim", "512"]))[1].lr == pytest.approx(1.5e-4)
    assert train.resolve_config(parse(["--heads", "2"]))[1].lr == 4e-3  # heads split dim, the width stays
    checkpoint = {"config": {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}}
    assert train.resolve_config(parse(["--resume"]), checkpoint)[1].lr == cfg.lr


@pytest.mark.parametrize("steps,warmup", [(1, 1), (2, 1), (10, 5), (100, 10), (250, 12), (2000, 100)])
def test_warmup_never_rounds_to_zero_and_peaks_at_lr(steps, warmup):
    assert train.warmup_steps(steps) == warmup
    lrs = [train.learning_rate(step, train.TrainConfig(steps=steps, lr=1.0)) for step in range(steps)]
    assert lrs[0] > 0 and lrs[warmup - 1] == max(lrs) == 1.0


def test_inner_step_bound_follows_the_write_rule_and_head_width():
    """θ_max by write rule: the implicit rules take hope.LR_MAX at any head width; the Titans rule 0.02 at
    heads of 16, falling as 1/√d_head; a given --lr-max is kept."""
    parse = train.build_arg_parser().parse_args
    config = lambda *flags: train.resolve_config(parse(list(flags)))[0]
    assert config().write_rule == "proximal" and config().lr_max == hope.LR_MAX["proximal"]
    assert config("--d-head", "64").lr_max == hope.LR_MAX["proximal"]
    assert config("--write-rule", "longhorn").lr_max == hope.LR_MAX["longhorn"]
    assert config("--write-rule", "titans").lr_max == 0.02
    assert config("--write-rule", "titans", "--d-head", "64").lr_max == pytest.approx(0.01)
    assert config("--write-rule", "titans", "--preset", "small").lr_max == pytest.approx(0.01)
    assert config("--d-head", "64", "--lr-max", "0.05").lr_max == 0.05


@pytest.mark.parametrize("write_rule", hope.WRITE_RULES)
def test_rates_start_where_the_write_rule_says(write_rule):
    """RateHeads at init (input term 0): η = RATE_START's η, θ = θ_max × RATE_START's fraction × (1 − η),
    α = 0.0025, for every head and token."""
    lr, momentum_decay, forget = hope.RateHeads(3, 4, 10.0, write_rule)(torch.zeros(2, 3, 5, 4))
    fraction, eta = hope.RATE_START[write_rule]
    for name, rate, expected in [("θ", lr, 10.0 * fraction * (1 - eta)), ("η", momentum_decay, eta),
                                 ("α", forget, 0.0025)]:
        assert_close(rate.double(), torch.full(rate.shape, expected, dtype=torch.float64), 1e-6, name)


# --- 3.3 checkpoints: atomic writes, bit-exact resume after Ctrl-C

def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model_cfg = hope.HOPEConfig(model="transformer", dim=32, layers=1, d_head=16)
    model = hope.LanguageModel(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt.pt"
    save = lambda step: train.save_checkpoint(path, model, optimizer, model_cfg, train.TrainConfig(), step, 0.0, [])
    save(1)
    before = path.read_bytes()

    def crash_halfway(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError):
        save(2)
    assert path.read_bytes() == before and train.load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]                   # the half-written temp file is gone


@pytest.mark.parametrize("arch", [GPT, HOPE], ids=["transformer", "hope"])
def test_ctrl_c_then_resume_equals_uninterrupted_run(corpus, tmp_path, monkeypatch, arch):
    common = [*arch, "--steps", "6", "--eval-every", "3", "--grad-accum", "2"]
    straight = run(flags(corpus, tmp_path, "straight", *common))
    get_batch = train.get_batch

    def ctrl_c_during_step_2(tokens, batch_size, seq_len, seed, step, micro=0):
        if step == 1 and micro == 1:                    # a real SIGINT in the middle of a step
            os.kill(os.getpid(), signal.SIGINT)
        return get_batch(tokens, batch_size, seq_len, seed, step, micro)
    monkeypatch.setattr(train, "get_batch", ctrl_c_during_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(flags(corpus, tmp_path, "resumed", *common))
    monkeypatch.undo()
    assert train.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["step"] == 2   # finished step 2
    # how the model runs may change on resume (recompute in backward: the same numbers)
    runtime = ["--checkpoint", "--no-compile-chunks"] if arch is HOPE else []
    resumed = run(["--resume", "--out-dir", str(tmp_path / "resumed"), *runtime])
    assert resumed["step"] == 6
    for key in ("val_loss", "train_loss"):
        assert [r[key] for r in resumed["curve"]] == [r[key] for r in straight["curve"]]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:                                   # AdamW's step count and both moments
        assert state_a[i].keys() == state_b[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state_a[i][k], state_b[i][k]) for k in state_a[i]), i


# --- 3.4 what stops a run: non-finite loss, divergence, bad input (exit code 2, one line)

def stop_a_resumed_run(corpus, tmp_path, capsys, *argv):
    """Train 2 steps, resume with argv until the run stops itself (exit code 1). Returns the one
    error line, and whether ckpt.pt is still the one written before the resume."""
    run(flags(corpus, tmp_path, "out", *GPT, "--steps", "2", "--eval-every", "2"))
    path = tmp_path / "out" / "ckpt.pt"
    before = path.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train.main(["--resume", "--out-dir", str(tmp_path / "out"), *argv])
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    return errors[0], path.read_bytes() == before and train.load_checkpoint(path)["step"] == 2


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(corpus, tmp_path, capsys):
    # AdamW moves every weight by ~lr: after step 3 the weights are ~1e30, and step 4's logits overflow
    error, kept = stop_a_resumed_run(corpus, tmp_path, capsys, "--steps", "8", "--lr", "1e30")
    assert error.startswith("error: non-finite") and "at step 4;" in error and kept


def test_divergence_stops_with_one_line_and_keeps_the_checkpoint(corpus, tmp_path, capsys):
    # lr 50 keeps the loss finite (about 1e5 at step 4), far above step 0's ~5.5, read from the checkpoint
    error, kept = stop_a_resumed_run(corpus, tmp_path, capsys, "--steps", "6", "--eval-every", "2", "--lr", "50")
    assert error.startswith("error: val loss ") and error.endswith("(now 50)")
    assert "at step 4 rose above its step-0 value" in error and "training diverged" in error and kept


@pytest.fixture(scope="module")
def bad_train_files(tmp_path_factory):
    """(corpus, directory) with a good run's checkpoint and the bad files bad_train_cases names."""
    tmp_path = tmp_path_factory.mktemp("bad_input")
    corpus = write_corpus(tmp_path)
    run(flags(corpus, tmp_path, "good", *GPT, "--steps", "1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "notes.csv").write_text("a,b\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "foreign").mkdir()                         # weights of another version of hope.py
    checkpoint = train.load_checkpoint(tmp_path / "good" / "ckpt.pt")
    checkpoint["model"] = {"renamed." + k: v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "foreign" / "ckpt.pt")
    return corpus, tmp_path


def bad_train_cases(corpus, tmp_path):
    """{name: (argv, words the one error line must hold)}: bad flags, data and checkpoints (files that
    bad_train_files makes), and the network asked for offline."""
    common = flags(corpus, tmp_path, "bad", *GPT, "--steps", "1")
    return {
        "heads": (common + ["--dim", "100", "--heads", "3"], "not divisible"),
        "chunk": (common + ["--chunk-size", "0"], "chunk"),
        "steps": (common + ["--steps", "-1"], "steps"),
        "mixer": (common + ["--mixer", "nope"], "mixer"),
        "preset": (common + ["--preset", "huge"], "preset"),
        "missing": (common + ["--data", str(tmp_path / "missing.txt")], "does not exist"),
        "empty file": (common + ["--data", str(tmp_path / "empty.txt")], "empty"),
        "no text files": (common + ["--data", str(tmp_path / "no_text")], "no .txt"),
        "corrupt": (["--resume", "--out-dir", str(tmp_path / "corrupt")], "cannot read checkpoint"),
        "corrupt sample": (["--sample", "--out-dir", str(tmp_path / "corrupt")], "cannot read checkpoint"),
        "no checkpoint": (["--resume", "--out-dir", str(tmp_path / "nothing")], "no checkpoint"),
        "foreign weights": (["--resume", "--out-dir", str(tmp_path / "foreign")], "does not fit"),
        "foreign sample": (["--sample", "--out-dir", str(tmp_path / "foreign")], "does not fit"),
        "conflict": (["--resume", "--out-dir", str(tmp_path / "good"), "--dim", "64"], "conflict"),
        "offline openwebtext": (common + ["--data", "openwebtext"], "--data shakespeare"),
        "offline hub": (common + ["--data", "openwebtext", "--tokenizer", "byte"], "--data shakespeare"),
        "offline gpt2": (common + ["--tokenizer", "gpt2"], "--data PATH"),
        "mqar pairs": (common + ["--data", "mqar", "--mqar-pairs", "40"], "--mqar-pairs"),
        "mqar context": (common + ["--data", "mqar", "--seq-len", "20"], "too short"),
        "passkey digits": (common + ["--data", "passkey", "--passkey-digits", "0"], "--passkey-digits"),
        "vocab": (common + ["--vocab-size", "100"], "--vocab-size"),
        "periods": (common + ["--cms-periods", "8,x"], "--cms-periods"),
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Never the network: offline mode for the hub, a dead proxy and an empty cache for tiktoken."""
    for key, value in dict(HF_HUB_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                           TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken")).items():
        monkeypatch.setenv(key, value)


BAD_TRAIN_CASES = list(bad_train_cases("corpus.txt", Path("out")))


@pytest.mark.parametrize("name", BAD_TRAIN_CASES)
def test_bad_input_exits_2_with_one_line(name, bad_train_files, capsys, offline):
    """Each bad case of bad_train_cases ends with exit code 2 and one line naming what is wrong."""
    argv, words = bad_train_cases(*bad_train_files)[name]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


@pytest.mark.slow
def test_bad_input_in_a_real_process_prints_no_traceback(bad_train_files, offline):
    """The same as processes of their own (nothing else on stderr, no traceback), two at once."""
    cases = bad_train_cases(*bad_train_files)
    processes = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *cases[name][0]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("mixer", "offline openwebtext")]
    for process in processes:
        err = process.communicate(timeout=60)[1].strip().splitlines()
        assert process.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), err


# --- 3.5 several processes: torchrun

def assert_two_ranks_equal_one(tmp_path, one_argv, two_argv):
    """Train with one_argv in this process and two_argv under torchrun with 2 ranks, into out dirs
    one/ and two/, and compare what they wrote."""
    one = run(one_argv)                                     # first, so that the data is prepared
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "train.py")]
    two = subprocess.run(torchrun + two_argv, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model:") == 1                                 # rank 0 alone prints
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert b["step"] == one["step"] and a["model"].keys() == b["model"].keys()
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-5) for k in a["model"])
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    log = log[-len(one["curve"]):]                          # a resumed run's log holds the first run's too
    assert [r["step"] for r in log] == [r["step"] for r in one["curve"]]
    for mine, theirs in zip(log[1:], one["curve"][1:]):     # step 0 trains nothing
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5), mine["step"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [HOPE], ids=["hope"])    # train.py's DDP path is the same for GPT
def test_ddp_torchrun_two_ranks_equal_one_rank_with_grad_accum_2(corpus, tmp_path, arch):
    """Rank r draws the batches of micro-steps r × grad_accum + micro: the same batches, the same
    averaged gradients (their logged norm before clipping, which AdamW and clipping hide from the
    weights: a gradient summed over ranks or micro-batches doubles it), the same weights, also
    after --resume (HOPE); rank 0 alone prints and saves."""
    common = [*arch, "--batch-size", "2", "--steps", "3", "--eval-every", "1", "--device", "cpu"]
    assert_two_ranks_equal_one(tmp_path, flags(corpus, tmp_path, "one", *common, "--grad-accum", "2"),
                               flags(corpus, tmp_path, "two", *common))
    if arch is HOPE:                                        # the resume path is the same for both models
        resume = lambda out: ["--resume", "--out-dir", str(tmp_path / out), "--steps", "5"]
        assert_two_ranks_equal_one(tmp_path, resume("one"), resume("two"))


# --- 3.6 sampling

def first_token_frequencies(model, prompt, temperature, top_k, samples=4000):
    """(sampled frequencies, expected probabilities) of the first generated token after `prompt`."""
    torch.manual_seed(0)
    drawn = train.generate(model, prompt.expand(samples, -1), 1, temperature=temperature, top_k=top_k)[:, -1]
    logits = model(prompt)[0][0, -1] / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -math.inf)
    return torch.bincount(drawn, minlength=logits.numel()).double() / samples, torch.softmax(logits, -1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 5), (1.0, 1)])
def test_sampling_follows_temperature_and_top_k(temperature, top_k):
    """generate() draws from softmax(logits / temperature) over the top_k tokens: 4,000 draws of the
    first token match those probabilities to 0.03 (about 4 standard errors at p = 0.5), no token
    outside the top k is ever drawn, and a seed fixes the draws."""
    model = tiny_model("Transformer").eval()              # the model's part is tested with greedy decoding
    prompt = tokens(batch=1, length=11)
    with torch.no_grad():
        frequencies, expected = first_token_frequencies(model, prompt, temperature, top_k)
        assert (frequencies - expected).abs().max() < 0.03, (frequencies, expected)
        assert frequencies[expected == 0].sum() == 0, "a token outside the top k was drawn"
        torch.manual_seed(3)
        a = train.generate(model, prompt, 12, temperature=temperature, top_k=top_k)
        torch.manual_seed(3)
        assert torch.equal(a, train.generate(model, prompt, 12, temperature=temperature, top_k=top_k))


# ===============================================================================================
# 4. The scripts: ablate.py, analyze.py, bench.py
# ===============================================================================================

# --- 4.1 ablate.py and analyze.py: every row, column and figure exists, every number is finite


def finite_numbers(obj):
    """Every int/float inside a JSON-like object (bools and None skipped)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in finite_numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.slow
def test_ablate_smoke_then_analyze(tmp_path, monkeypatch):
    """ablate.py --preset smoke trains every row and writes the table, CSV, JSON and Figure 5 with
    finite numbers; a rerun trains nothing (cached); analyze.py reads a run's snapshots and writes
    Figures 1-4, the JSON and the summary, all finite."""
    md, out = ablate.ablate("smoke", out_dir=tmp_path / "abl")
    for row in ablate.ABLATION_ROWS:
        assert f"| {row} |" in md
    assert "**" in md                                               # best loss in bold
    table = json.loads((out / "results.json").read_text())["table"]
    assert [c["row"] for c in table] == list(ablate.ABLATION_ROWS)
    for cell in table:
        for key in ("loss", "val_loss", "params", "tokens_per_s"):
            assert math.isfinite(cell[key]) and cell[key] > 0, (cell["row"], key)
        assert cell["row"] == "Full HOPE" or math.isfinite(cell["delta"])
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + len(ablate.ABLATION_ROWS)
    assert (out / "fig5_curves.png").read_bytes()[:4] == b"\x89PNG"

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")
    monkeypatch.setattr(train, "train_model", no_training)
    assert ablate.ablate("smoke", out_dir=tmp_path / "abl")[0] == md
    monkeypatch.undo()

    run_dir = next((out / "runs").glob("full-hope-*"))
    results, analysis_dir = analyze.analyze(run_dir, sequences=2)
    assert results["steps"] == [0, 2, 4]
    assert results["cms"] and results["fast_vs_meta"] and results["surprise"] and results["online"]
    assert {f"L0.{c}" for c in hope.SELF_MOD_COMPONENTS} <= set(results["fast_vs_meta"])
    assert {f"L0.{c}" for c in hope.SELF_MOD_COMPONENTS} <= set(results["surprise"]["by_memory"])
    for name in ("fig1_cms.png", "fig2_self_mod.png", "fig3_surprise.png", "fig4_online_adaptation.png"):
        assert (analysis_dir / name).read_bytes()[:4] == b"\x89PNG"
    numbers = finite_numbers(json.loads((analysis_dir / "analysis.json").read_text()))
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert "## Surprise" in (analysis_dir / "analysis.md").read_text()


@pytest.mark.parametrize("row,names", [("Full HOPE", hope.SELF_MOD_COMPONENTS), ("No Self-Mod", ("mem",))])
def test_analyze_measures_the_gate_of_every_memory(row, names):
    """analyze.surprise_and_loss reports surprise and pass rates for every gated memory (the Titans
    memory or each self-modifying component, and each CMS level, in every layer) beside the main
    memory's, each scored with its own chunk size: at C = 1 every main-memory token passes the
    relative γ = 1, while a CMS level of period 2 scores only its chunk's larger surprise ≥ 1."""
    model = tiny_model(row, "mac", chunk_size=1, surprise_mode="relative", surprise_threshold=0.3)
    idx = tokens(length=TINY["seq_len"] + 1)
    stats = analyze.surprise_and_loss(model, idx[:, :-1], idx[:, 1:])[0]
    by_memory = stats["by_memory"]
    assert set(by_memory) == {f"L{i}.{c}" for i in range(TINY["layers"]) for c in [*names, "p2", "p4"]}
    assert stats["gate"] == {"mode": "relative", "threshold": 0.3}
    for name, v in by_memory.items():
        assert "0.3" in v["pass_rate_relative"], f"{name}: the run's own γ is not measured"
        assert all(0 <= r <= 1 for mode in ("absolute", "relative") for r in v[f"pass_rate_{mode}"].values())
    assert stats["pass_rate_relative"]["1.0"] == 1.0
    for i in range(TINY["layers"]):
        assert by_memory[f"L{i}.mem"]["pass_rate_relative"]["1.0"] == 1.0
        assert by_memory[f"L{i}.p2"]["pass_rate_relative"]["1.0"] < 1.0
    for g, rate in stats["pass_rate_absolute"].items():                 # layers hold equal counts
        per_layer = [by_memory[f"L{i}.mem"]["pass_rate_absolute"][g] for i in range(TINY["layers"])]
        assert abs(rate - sum(per_layer) / len(per_layer)) < 1e-12


def test_analyze_counts_the_sequences_whose_fast_state_blew_up(monkeypatch):
    """fast_vs_meta's mean ‖fast‖/‖meta‖ can be one sequence's blow-up: it also reports the median and
    how many sequences grew past 10x the meta norm. With one sequence's fast state in layer 0 scaled
    1000x after reading, that count is 1 for every layer-0 component, and the median stays below 10."""
    model = tiny_model("Full HOPE", "mac")
    x = tokens(batch=3, length=TINY["seq_len"])
    honest = analyze.fast_vs_meta(model, x)
    real_advance = model.advance

    def one_blown_up(x, state):
        logits, state = real_advance(x, state)
        memory = state.layers[0].mixer.memory
        scale = torch.ones(x.shape[0], dtype=torch.float64).index_fill(0, torch.tensor([1]), 1000.0)
        blown = tuple(W * scale.view(-1, *[1] * (W.dim() - 1)) for W in memory.weights)
        state.layers[0] = state.layers[0]._replace(mixer=state.layers[0].mixer._replace(
            memory=dataclasses.replace(memory, weights=blown)))
        return logits, state

    monkeypatch.setattr(model, "advance", one_blown_up)
    blown = analyze.fast_vs_meta(model, x)
    for name, v in honest.items():
        assert v["sequences_past_10x"] == 0 and v["sequences"] == 3, name
        layer0 = name.startswith("L0.")
        assert blown[name]["sequences_past_10x"] == (1 if layer0 else 0), name
        # the median is one of the two untouched sequences' ratios; the mean is the blown one's third
        assert blown[name]["fast_over_meta_norm_median"] < 10, name
        assert (blown[name]["fast_over_meta_norm"] > 100) == layer0, name


@pytest.mark.slow
def test_ablate_a_crashing_row_loses_no_other_row(tmp_path, monkeypatch):
    """One row's failure is recorded in the table; the other rows still train and report."""
    real = train.train_model

    def crash_transformer(model_cfg, cfg, checkpoint=None):
        if model_cfg.model == "transformer":
            raise RuntimeError("simulated crash")
        return real(model_cfg, cfg, checkpoint)
    monkeypatch.setattr(train, "train_model", crash_transformer)
    md, out = ablate.ablate("smoke", rows=["Full HOPE", "Transformer"], out_dir=tmp_path / "abl")
    table = {c["row"]: c for c in json.loads((out / "results.json").read_text())["table"]}
    assert math.isfinite(table["Full HOPE"]["loss"])
    assert table["Transformer"]["loss"] is None and "simulated crash" in table["Transformer"]["errors"][0]
    assert "| Transformer | failed |" in md


def test_an_interrupted_ablation_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint is not trained from the start by the next ablate.py:
    it continues from that checkpoint and ends with the uninterrupted run's losses, bit for bit."""
    settings = ablate.PRESETS["smoke"]["scales"]["smoke"]
    whole = ablate.run_once(*ablate.configs(settings, "shakespeare", "byte", "Titans", 1337, tmp_path / "a", "cpu"))
    model_cfg, cfg = ablate.configs(settings, "shakespeare", "byte", "Titans", 1337, tmp_path / "b", "cpu")

    class Killed(BaseException):
        pass
    real_step, real_train = train.train_step, train.train_model

    def killed_at_step_3(t, forward, data, step):
        if step == 2:
            raise Killed
        return real_step(t, forward, data, step)
    monkeypatch.setattr(train, "train_step", killed_at_step_3)
    with pytest.raises(Killed):
        ablate.run_once(model_cfg, cfg)
    monkeypatch.undo()
    started_from = []

    def spy(model_cfg, cfg, checkpoint=None):
        started_from.append(checkpoint and checkpoint["step"])
        return real_train(model_cfg, cfg, checkpoint)
    monkeypatch.setattr(train, "train_model", spy)
    resumed = ablate.run_once(model_cfg, cfg)
    assert started_from == [2]
    assert resumed["step"] == whole["step"] == 4
    assert (resumed["train_loss"], resumed["val_loss"]) == (whole["train_loss"], whole["val_loss"])
    assert [r["val_loss"] for r in resumed["curve"]] == [r["val_loss"] for r in whole["curve"]]


def test_recall_table_from_the_runs_finished_so_far(tmp_path, monkeypatch):
    """ablate.py --recall --cached trains nothing and writes the table of the finished runs: a cell
    with one of two seeds says so, a cell with none reads 'not run', a diverged run says where."""
    def no_training(*args, **kwargs):
        raise AssertionError("--cached trained a run")
    monkeypatch.setattr(train, "train_model", no_training)

    def finish(label, seed, result, **extra):
        overrides = dict(dict(ablate.RECALL_VARIANTS + ablate.PASSKEY_VARIANTS)[label], **extra)
        settings = {**ablate.RECALL_BASE, **overrides}
        _, cfg = ablate.configs(settings, settings["data"], "byte", None, seed, tmp_path, "cpu", label=label)
        (Path(cfg.out_dir)).mkdir(parents=True)
        (Path(cfg.out_dir) / "result.json").write_text(json.dumps(result))
    finish("Titans", 1337, dict(accuracy=0.998, val_loss=0.01, params=40000))
    finish("Titans, frozen", 1337, dict(accuracy=0.05, val_loss=3.3, params=40000))
    finish("Titans, frozen", 1338, dict(accuracy=0.07, val_loss=3.3, params=40000))
    finish("Self-Mod", 1338, {"error": "NonFiniteLoss: non-finite loss at step 12"})
    finish("passkey: Titans", 1337, dict(accuracy=0.996, val_loss=0.02, params=40000), passkey_distance=256)
    md, _ = ablate.recall(seeds=2, out_dir=tmp_path, device="cpu", cached=True)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| 0.998 (1 of 2 seeds) |" in rows["Titans"]
    assert "| 0.060 ± 0.014 |" in rows["Titans, frozen"]
    assert "| diverged at step 12 |" in rows["Self-Mod"]
    assert "| not run |" in rows["Full HOPE"] and "| not run |" in rows["Transformer (calibration)"]
    assert rows["passkey: Titans"].endswith("| 0.996 (1 of 2 seeds) | not run |")
    assert json.loads((tmp_path / "recall.json").read_text())["mqar"]["Full HOPE"]["runs"] == [{"error": "not run"}] * 2


@pytest.mark.parametrize("script,argv", [("ablate", ["--preset", "nope"]), ("ablate", ["--rows", "Full HOPE,Nope"]),
                                         ("ablate", ["--seeds", "0"]), ("ablate", ["--cached"]),
                                         ("ablate", ["--recall", "--cached", "--rows", "Titans"]),
                                         ("analyze", ["missing"]), ("analyze", ["."])])
def test_ablate_and_analyze_bad_input_exit_2(tmp_path, capsys, script, argv):
    main = {"ablate": ablate.main, "analyze": analyze.main}[script]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / a) if script == "analyze" else a for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err


# --- 4.2 bench.py: what its numbers are made of (the timings come from running bench.py)


def test_bench_least_squares_recovers_a_power_law():
    logs = [math.log(T) for T in (1024, 2048, 4096, 8192)]
    slope, intercept, r2 = bench.least_squares(logs, [1.5 * x - 2 for x in logs])
    assert abs(slope - 1.5) < 1e-12 and abs(intercept + 2) < 1e-9 and abs(r2 - 1) < 1e-12


def test_bench_header_prints_and_returns_the_matmul_peak(capsys):
    """Every subcommand's ratios come with the machine's fp32 matmul peak: printed and returned."""
    args = argparse.Namespace(matmul_size=64, device="cpu", quick=True)
    peak = bench.print_header("title", args)
    assert peak > 0 and f"fp32 matmul peak {peak:.0f} GFLOP/s" in capsys.readouterr().out


def test_bench_cpu_peak_memory_is_the_most_live_at_once():
    """Two 4 MiB tensors alive together, then a third after both are freed: the peak is 8 MiB
    (neither the 4 MiB of one tensor nor the 12 MiB allocated in all)."""
    def two_at_once():
        a, b = torch.ones(1 << 20), torch.ones(1 << 20)
        del a, b
        return torch.ones(1 << 20)
    peak = bench.peak_memory(two_at_once, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20, peak


@pytest.mark.slow
def test_bench_model_row_breaks_full_hope_down_by_component():
    """Every mechanism of Full HOPE gets its own share of the profiled step, the shares never add
    up to more than the step's wall time, and every backward op is traced to a forward component."""
    base = hope.HOPEConfig(dim=32, layers=1, d_head=16, seq_len=32, chunk_size=8, segment_len=16,
                           cms_periods=(8, 16))
    config = ablate.ablation_config("Full HOPE", base)
    result = bench.bench_model_row(config, batch=2, steps=1, warmup=2, device=torch.device("cpu"),
                                   seed=0, breakdown=True)
    table = result["breakdown_ms"]
    for component in ("self-mod: write all 6 memories (memory_update)", "CMS level p=8",
                      "CMS level p=16", "attention (qkv, RoPE, SDPA, out)", "optimizer step (AdamW)"):
        assert table[component]["forward"] + table[component]["backward"] + table[component]["optimizer"] > 0, component
    assert "backward: unmatched nodes" not in table
    tracked = sum(sum(parts.values()) for name, parts in table.items() if not name.startswith("untracked"))
    assert 0 < tracked <= result["profiled_step_s"] * 1e3
    assert result["peak_bytes"] > 3 * 4 * result["params"]           # weights + AdamW's two moments
    assert result["step_s"] > 0 and result["tokens_per_s"] > 0
    assert result["forward_ops"] > 100 and result["backward_nodes"] > 100


@pytest.mark.slow
def test_bench_scaling_fits_slopes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "scaling.json"
    bench.main(["scaling", "--quick", "--threads", "1", "--dim", "64", "--max-len", "1024",
                "--mixers", "lmm", "--json", str(path)])
    blocks = json.loads(path.read_text())["results"]["scaling"]["blocks"]
    assert set(blocks) == {"attention (GPT block)", "lmm"}
    for block in blocks.values():
        assert set(block["per_T"]) == {"512", "1024"}
        assert math.isfinite(block["time_slope"]) and block["memory_bytes_per_token"] > 0
    assert "lmm slope" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["nope"], ["models", "--rows", "Full HOPE,Nope"], ["models", "--scales", "huge"],
                                  ["scaling", "--mixers", "xyz"], ["roofline", "--threads", "0"],
                                  pytest.param(["memory", "--device", "cuda"], marks=pytest.mark.skipif(
                                      torch.cuda.is_available(), reason="CUDA is here"))])
def test_bench_bad_input_exits_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err


def test_bench_peers_without_titans_pytorch_says_how_to_install_it(capsys, monkeypatch):
    """`bench.py peers` where titans-pytorch does not import: one line naming the pip install, exit 2."""
    monkeypatch.setattr(bench, "import_peer", lambda: "ModuleNotFoundError: No module named 'titans_pytorch'")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["peers"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "pip install titans-pytorch" in err


def test_ablation_delta_is_paired_by_seed():
    """Seed s of every row trains on the same batches, so a row that is worse by the same margin
    on every seed beats the noise even when the seeds themselves spread far more than the margin;
    a margin that flips sign across seeds does not; a failed run drops its pair."""
    reference = [dict(train_loss=x) for x in (2.10, 2.00, 2.20)]
    shifted = [dict(train_loss=x + d) for x, d in zip((2.10, 2.00, 2.20), (0.021, 0.019, 0.020))]
    delta, stderr, beats = ablate.paired_delta(shifted, reference)
    assert delta == pytest.approx(0.020) and stderr == pytest.approx(0.001 / 3 ** 0.5) and beats
    flipping = [dict(train_loss=x + d) for x, d in zip((2.10, 2.00, 2.20), (0.03, -0.02, 0.02))]
    assert not ablate.paired_delta(flipping, reference)[2]
    assert ablate.paired_delta([shifted[0], dict(error="x"), shifted[2]], reference)[2]
    assert ablate.paired_delta([shifted[0], dict(error="x")], reference[:2]) is None


def test_ablation_run_directory_is_claimed_by_one_live_process(tmp_path):
    """Two ablate processes with overlapping --rows must not train one run at once: the second
    waits while the first (a live pid in the lock) trains; a dead process's lock is taken over."""
    run_dir = tmp_path / "run"
    assert ablate.claim(run_dir) and (run_dir / "training.lock").read_text() == str(os.getpid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run_dir / "training.lock").write_text(str(sleeper.pid))
        assert not ablate.claim(run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ablate.claim(run_dir)                          # the sleeper is gone: its lock is stale
    assert (run_dir / "training.lock").read_text() == str(os.getpid())


# --- 4. the documentation: every relative link and its anchor resolve, every documented command parses

DOCS = [Path(__file__).parent / "README.md", *sorted((Path(__file__).parent / "docs").glob("*.md"))]
# what parses each script's command line, without running it
PARSERS = {"train.py": lambda argv: train.build_arg_parser().parse_args(argv),
           "ablate.py": lambda argv: ablate.build_arg_parser().parse_args(argv),
           "analyze.py": lambda argv: analyze.build_arg_parser().parse_args(argv),
           "bench.py": bench.parse_args}


def documented_commands(text):
    """(script, argv) for every command in the text's ```bash blocks that runs one of the scripts
    (`python X.py …`, `torchrun … X.py …`; commands joined by && apart, comments dropped)."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for joint, command in itertools.groupby(shlex.split(line, comments=True), lambda w: w == "&&"):
                command = list(command)
                script = next((w for w in command if w.endswith(".py")), None)
                if not joint and script is not None and command[0] in ("python", "torchrun"):
                    yield script, command[command.index(script) + 1:]


def test_documented_commands_parse():
    """Every README (and docs/) command that runs a script is accepted by that script's parser: a
    renamed or removed flag fails here, not in a newcomer's terminal. The extractor itself is held to
    a hand-written block (comments, &&, torchrun)."""
    block = "```bash\npython a.py --x 1   # note\ntorchrun --n=2 b.py --y && python c.py z\n```"
    assert list(documented_commands(block)) == [("a.py", ["--x", "1"]), ("b.py", ["--y"]), ("c.py", ["z"])]
    found = 0
    for doc in DOCS:
        for script, argv in documented_commands(doc.read_text()):
            assert script in PARSERS, f"{doc.name}: a command runs {script}, which this test does not know"
            try:
                PARSERS[script](argv)
            except SystemExit as e:
                raise AssertionError(f"{doc.name}: `{script} {' '.join(argv)}` does not parse") from e
            found += 1
    assert found >= 10, f"only {found} documented commands found: is the extractor still reading the README?"


def heading_anchor(heading):
    """The anchor GitHub gives a heading, by its rule kept simple: a link's text stands for the link,
    the text is lowercased, every character but a letter, digit, underscore, hyphen or space is
    dropped (backticks, *, punctuation, —), and each space becomes a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def heading_anchors(text):
    """Every anchor a markdown text's headings give (outside ``` blocks); a repeated heading's second
    anchor ends in -1, its third in -2, as on GitHub."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        anchor = heading_anchor(heading)
        anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def broken_links(doc, text):
    """What is wrong with the relative links and images of `text`, a markdown file at `doc`: a target
    file that does not exist, or an anchor (`file.md#heading`, `#heading`) that no heading of the
    target markdown file gives."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        if name and not path.exists():
            problems.append(f"{doc.name}: link to {target}, which does not exist")
        elif anchor and path.suffix == ".md":
            if anchor not in heading_anchors(path.read_text() if name else text):
                problems.append(f"{doc.name}: link to {target}, whose anchor no heading of {path.name} gives")
    return problems


def test_documented_anchors_follow_githubs_rule():
    """The slug rule on headings like the docs' own (code, apostrophes, commas, Greek, dashes, links),
    repeats numbered, headings inside ``` blocks ignored."""
    assert heading_anchor("The headline command at dim 512") == "the-headline-command-at-dim-512"
    assert heading_anchor("NL's HOPE on language") == "nls-hope-on-language"
    assert heading_anchor("2,000 steps, two seeds (Titans-rule era)") == "2000-steps-two-seeds-titans-rule-era"
    assert heading_anchor("Language: `python train.py`") == "language-python-trainpy"
    assert heading_anchor("θ_max — the [cap](docs/x.md)") == "θ_max--the-cap"
    text = "# A\n## B b\n```bash\n# not a heading\n```\n### B b\n### B b\n"
    assert heading_anchors(text) == {"a", "b-b", "b-b-1", "b-b-2"}


def test_documented_links_resolve():
    """Every relative link and image in the README and docs/ names a file of the repository, and every
    anchor in them names a heading of its file. The checker itself is held to a hand-written page with
    one good and two broken anchors and one missing file."""
    page = Path(__file__).parent / "docs" / "page.md"
    text = ("# Top\n## Good part\n[a](#good-part) [b](#bad-part) [c](../README.md#tests) "
            "[d](../README.md#no-such-heading) [e](missing.md)\n")
    assert broken_links(page, text) == [
        "page.md: link to #bad-part, whose anchor no heading of page.md gives",
        "page.md: link to ../README.md#no-such-heading, whose anchor no heading of README.md gives",
        "page.md: link to missing.md, which does not exist"]
    for doc in DOCS:
        problems = broken_links(doc, doc.read_text())
        assert not problems, "\n".join(problems)
