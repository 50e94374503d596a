"""
bench.py — how fast is hope.py, and how does its cost grow with the sequence?

    python bench.py memory   [--quick]   one Titans memory layer vs one Transformer layer, and the
                                         chunk-parallel update vs the token-by-token loop
    python bench.py models   [--quick]   a training step of every ablation row vs the Transformer,
                                         and where Full HOPE's step spends its time
    python bench.py scaling  [--quick]   one block of each mixer and of attention, T = 512 .. 8192
    python bench.py roofline [--quick]   achieved fp32 GFLOP/s of the memory update vs the machine's
                                         measured matmul peak
    python bench.py stability            every ablation row and every mixer trains 30 steps at three
                                         sizes, and at the `tiny` preset with one head of 64 and with
                                         12 layers, with the default lr rule (not part of `all`)
    python bench.py peers    [--quick]   one hope.NeuralMemory layer vs lucidrains' titans-pytorch
                                         NeuralMemory and a Transformer layer, at C 16 and 64 (needs
                                         `pip install titans-pytorch`; not part of `all`)
    python bench.py probe                write 8, 32, 64 key-value pairs into the memory as initialised (no
                                         training) with each write rule, read them back: recall, error and
                                         whether further writes stay stable (--lr-max sweeps θ_max; not part
                                         of `all`)
    python bench.py all      [--quick]   memory, models, scaling and roofline

Global flags: --device cpu|cuda, --threads N (default 2), --quick, --json PATH, --seed N; `models`
also takes --scales, --rows, --compile and --checkpoint (python bench.py --help lists them all).

How it measures (the same for every subcommand):
- Time: the median of `repeats` runs after `warmup` runs (timeit below); on CUDA every run ends
  with torch.cuda.synchronize(). Every ratio compares numbers taken in the same process, one after
  the other, so a slower machine moves both sides. Timings are only as quiet as the machine: the
  header prints the load average, and a load above the thread count makes every number noisy.
- Peak memory: on CUDA, torch.cuda.max_memory_allocated(). On CPU, torch has no allocator
  statistics, so we run the measured function once under torch.profiler(profile_memory=True),
  which records every allocation and free of torch's CPU allocator; the running sum of those
  events in time order is the live tensor memory, and its maximum is the peak above what was live
  before the call. This counts tensors only (what activations and gradients cost), not the Python
  heap or allocator caching, which an RSS measurement would mix in.
- Everything is imported from hope.py; nothing of the model is re-implemented here.
"""
import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

import ablate
import hope
import train

try:
    import resource                # POSIX only; used by memory_guard
except ImportError:
    resource = None

# -------------------------------------------------------------------------------------------------
# Shared helpers: timing, FLOPs, peak memory, fresh processes, output, and one layer
# -------------------------------------------------------------------------------------------------

# Time and FLOPs

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, repeats, warmup, device=torch.device("cpu")):
    """Median wall-clock seconds of fn() over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    return timed_in_turn([fn], repeats, device)[0]


def timed_in_turn(fns, repeats, device):
    """Median wall-clock seconds of each fn over `repeats` rounds that call every fn once, in turn:
    a shared host's drift then slows all of them alike, and their ratio keeps."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(fn_times) for fn_times in times]


def count_flops(fn):
    """FLOPs of fn() as FlopCounterMode counts them: matmul-like ops only (mm, bmm, conv, SDPA)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(shape_a, shape_b, repeats, device):
    a, b = torch.randn(*shape_a, device=device), torch.randn(*shape_b, device=device)
    op = torch.mm if a.dim() == 2 else torch.bmm
    flops = count_flops(lambda: op(a, b))
    return flops / timeit(lambda: op(a, b), repeats, 2, device) / 1e9


# Peak memory, running out of it, and a fresh process per measurement

def cpu_peak_from_profile(prof):
    """Peak CPU tensor bytes allocated during a profile(profile_memory=True) run and still alive.

    Allocator events come as +bytes (allocation) and -bytes (free); their running sum in time
    order is the tensor memory allocated during the run that is still live. (Frees of tensors that
    existed before the run are not recorded, so they do not lower the sum.) None if this torch's
    profiler does not expose the events.
    """
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in raw
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:          # allocations are positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(fn, device):
    """Peak bytes of tensor memory that fn() allocates above what is live when it starts."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return cpu_peak_from_profile(prof)


def meminfo_bytes(field, path="/proc/meminfo"):
    """A '<field>: <n> kB' line of /proc/meminfo or /proc/self/status, in bytes (None elsewhere)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open(path) as f:
            return int(next(l for l in f if l.startswith(field + ":")).split()[1]) * 1024
    return None


@contextlib.contextmanager
def memory_guard(device):
    """On Linux CPU runs, cap this process's address space at what it uses now plus 90 % of the
    machine's available memory, so that a configuration too big for the machine raises
    "can't allocate memory" (caught and reported as OOM) instead of waking the kernel's OOM killer
    on a shared machine. The previous limit is restored afterwards."""
    available, used = meminfo_bytes("MemAvailable"), meminfo_bytes("VmSize", "/proc/self/status")
    if device.type != "cpu" or resource is None or available is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + int(0.9 * available)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(error):
    text = str(error).lower()
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def run_isolated(device, fn, *args):
    """fn(*args) in a fresh Python process on the CPU. The allocator keeps what a big row frees
    (after Full HOPE at Small the process held many GB it no longer used), which slows the next
    rows and made them run out of memory; a fresh process per row also makes each peak its own."""
    if device.type != "cpu":
        return fn(*args)
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=train.fast_cpu_math)
    try:
        return pool.apply(fn, args)
    finally:
        pool.close()
        pool.join()          # wait until the child has exited and given its memory back


# Output: tables, JSON, the machine, every subcommand's header

def print_table(headers, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def write_json(path, data):
    """Write JSON atomically (train.atomic_write), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    train.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def fmt_ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_mb(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}x"


def verdict(value, target):
    return "PASS" if value <= target else "FAIL"


def load_average():
    """The load averages over 1, 5 and 15 minutes, or None where os has none (Windows)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(args):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    info = dict(torch=torch.__version__, python=platform.python_version(), cpu=cpu,
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=args.device,
                load_average=load_average())
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_header(title, args):
    """The subcommand's title line, with the machine's measured fp32 matmul peak (GFLOP/s), which
    every ratio against the Transformer depends on; returns the peak."""
    load = (load_average() or [0.0])[0]
    peak = matmul_gflops((args.matmul_size,) * 2, (args.matmul_size,) * 2, 3, torch.device(args.device))
    print(f"\n=== {title} ===  device {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {load:.2f}, fp32 matmul peak {peak:.0f} GFLOP/s "
          f"(torch.mm {args.matmul_size}²)" + ("  [quick]" if args.quick else ""))
    if args.device == "cpu" and load > torch.get_num_threads():
        print(f"WARNING: load average {load:.1f} exceeds the {torch.get_num_threads()} threads in "
              "use: other processes compete for the cores, so timings are noisy, and with more than "
              "one thread\nOpenMP threads wait for each other at every op (we saw 5-40x slowdowns); "
              "for a sanity pass on a busy machine use --threads 1.")
    return peak


# One layer, forward and backward: what memory, roofline and peers time
LAYER_SHAPE = (4, 512, 256, 4, 64)    # batch, T, dim, heads, d_head of memory, roofline and peers


def layer_inputs(shape, seed, device):
    """x [B, T, dim] (requires grad) and the fixed random gradient of a one-layer fwd+bwd."""
    B, T, dim = shape[:3]
    torch.manual_seed(seed)
    return (torch.randn(B, T, dim, device=device, requires_grad=True),
            torch.randn(B, T, dim, device=device))


def fwd_bwd(forward, grad):
    """A closure that runs forward() and backpropagates `grad` from its output (one fwd+bwd)."""
    def run():
        forward().backward(grad)
    return run


def memory_layer(dim, heads, d_head, chunk_size, parallel=True):
    """hope.NeuralMemory of depth 2, expansion 4, no gate; parallel=False runs memory_update's
    token loop (hope.py §4) instead of the chunk form (§5)."""
    return hope.NeuralMemory(hope.HOPEConfig(dim=dim, heads=heads, d_head=d_head, memory_depth=2, expansion=4,
                                             chunk_size=chunk_size, surprise=False, parallel=parallel,
                                             compile_chunks=False))


def memory_fwd_bwd(layer, x, grad):
    return fwd_bwd(lambda: layer(x, layer.initial_state(x.shape[0]))[0], grad)


def transformer_layer(dim, heads, device):
    return nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, norm_first=True,
                                      batch_first=True).to(device)


def transformer_fwd_bwd(layer, x, grad):
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
    return fwd_bwd(lambda: layer(x, src_mask=mask, is_causal=True), grad)


# -------------------------------------------------------------------------------------------------
# memory: one NeuralMemory layer vs one Transformer layer (issue 2, deliverable 3)
# -------------------------------------------------------------------------------------------------
MEMORY_TARGETS = {16: 2.0, 64: 2.5}   # memory fwd+bwd / Transformer fwd+bwd at chunk 16 and 64


def bench_memory(args, device):
    B, T, dim, heads, d_head = LAYER_SHAPE
    chunks = (16, 64)
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    # The token loop costs the same per token at any C; it is slow, so it runs once, at a shorter
    # T, and its time is scaled by 512 / T_seq (it is linear in T: one autograd.grad per token).
    T_seq = args.seq_len_sequential or (32 if args.quick else 128)
    seq_repeats = 1 if args.quick else 3
    seq_chunks = chunks[:1] if args.quick else chunks
    peak = print_header("memory: one layer, fwd+bwd, float32", args)
    print(f"shape: batch {B}, T {T}, dim {dim}, {heads} heads of {d_head}; NeuralMemory depth 2, "
          f"expansion 4; Transformer = nn.TransformerEncoderLayer({dim}, {heads}, {4 * dim}, "
          "dropout=0, norm_first=True, batch_first=True) with a causal mask (is_causal=True)")
    print(f"timing: median of {repeats} runs after {warmup} warmup (sequential: {seq_repeats} after 1, "
          f"at T {T_seq}); loss = <output, fixed random grad>; input requires grad")

    x, grad = layer_inputs(LAYER_SHAPE, args.seed, device)
    results = dict(matmul_peak_gflops=peak, batch=B, seq_len=T, dim=dim, heads=heads, d_head=d_head, repeats=repeats,
                   warmup=warmup, seq_len_sequential=T_seq, chunks={})

    tf = transformer_layer(dim, heads, device)
    t_tf = timeit(transformer_fwd_bwd(tf, x, grad), repeats, warmup, device)
    results["transformer_s"] = t_tf
    rows = [["Transformer layer", "-", T, fmt_ms(t_tf), fmt_ms(t_tf), "1.00x", "", ""]]

    t_seq = {}
    for C in chunks:
        torch.manual_seed(args.seed)
        layer = memory_layer(dim, heads, d_head, C).to(device)
        t_par = timeit(memory_fwd_bwd(layer, x, grad), repeats, warmup, device)
        if C in seq_chunks:                      # the same layer through the token loop of §4
            sequential = memory_layer(dim, heads, d_head, C, parallel=False).to(device)
            sequential.load_state_dict(layer.state_dict())
            t = timeit(memory_fwd_bwd(sequential, x[:, :T_seq], grad[:, :T_seq]), seq_repeats, 1, device)
            t_seq[C] = t * T / T_seq
            seq_note = f"timed at T {T_seq}, x{T / T_seq:g}"
        else:
            t_seq[C] = t_seq[seq_chunks[0]]
            seq_note = f"reuses C {seq_chunks[0]} (cost is per token)"
        ratio, speedup = t_par / t_tf, t_seq[C] / t_par
        target = MEMORY_TARGETS[C]
        results["chunks"][C] = dict(parallel_s=t_par, sequential_s_at_512=t_seq[C],
                                    memory_over_transformer=ratio, parallel_speedup=speedup,
                                    target=target, passed=ratio <= target)
        rows.append(["NeuralMemory parallel", C, T, fmt_ms(t_par), fmt_ms(t_par), fmt_ratio(ratio),
                     f"{speedup:.0f}x", f"target <= {target:g}x: {verdict(ratio, target)}"])
        rows.append(["NeuralMemory sequential", C, T_seq, fmt_ms(t_seq[C] * T_seq / T),
                     fmt_ms(t_seq[C]), fmt_ratio(t_seq[C] / t_tf), "1x", seq_note])
    print()
    print_table(["layer", "C", "T timed", "ms", "ms @ T 512", "vs Transformer",
                 "sequential / parallel", "note"], rows)
    print("\nsequential = the same NeuralMemory layer (same projections, same outputs) with "
          "HOPEConfig(parallel=False)\n(memory_update's token-by-token loop, hope.py §4), "
          "one torch.autograd.grad per token (create_graph for the backward).")
    return results


# -------------------------------------------------------------------------------------------------
# models: a training step of every ablation row, and Full HOPE's step broken down by component
# -------------------------------------------------------------------------------------------------
CONFIG_FIELDS = {f.name for f in dataclasses.fields(hope.HOPEConfig)}
SCALE_VOCAB = {"tiny": 256, "small": 50257}    # tiny: byte-level Shakespeare; small: GPT-2 BPE
PURE_MAC = "Titans MAC (pure)"   # mac mixer; cms, self_mod, surprise off: memory + attention only
PURE_MAC_FLAGS = dict(model="hope", mixer="mac", cms=False, self_mod=False, surprise=False)
PURE_MAC_TARGET = 2.5        # eager, at tiny
FULL_HOPE_TARGETS = {("tiny", False): 6.0, ("tiny", True): 3.0, ("small", False): 5.0}   # (scale, compiled)
MODEL_ROWS = [*ablate.ABLATION_ROWS, PURE_MAC]


def load_preset(name):
    """(config kwargs, batch, note) of a scale: train.PRESETS[name], the presets train.py uses."""
    preset = train.PRESETS[name]
    config = {k: v for k, v in preset.items() if k in CONFIG_FIELDS}
    config["vocab_size"] = SCALE_VOCAB[name]
    batch = preset["batch_size"]
    shape = ", ".join(f"{k} {config[k]}" for k in ("dim", "layers", "d_head", "seq_len", "vocab_size"))
    return config, batch, f"train.PRESETS['{name}']: {shape}, batch {batch}"


def row_config(row, base):
    if row == PURE_MAC:
        return hope.HOPEConfig(**{**base, **PURE_MAC_FLAGS})
    return ablate.ablation_config(row, hope.HOPEConfig(**base))


# Component labels of the breakdown. An op belongs to the component of the torch.profiler
# record_function regions around it, and a backward op to the component of the forward op that
# created its autograd node (matched by the profiler's sequence number). The regions are opened by
# two public hooks, and nothing of hope is replaced or wrapped:
# - around a module's forward (a CMS level, CMS, the MLP; the memory and the attention where their
#   forward is called, as in MAG, MAL and LMM): a forward pre-hook opens the region, a forward hook
#   closes it;
# - around the methods and functions that the model calls directly rather than through a module
#   (MAC calls its memory's features/read/read_write and its attention's project/attend; memory_update
#   is a function): a sys.setprofile function opens the region when their code starts and closes
#   it when it returns. A method's region is that of the module it is called on.
REGION = "bench/"


def module_region(module):
    """The region of a module whose forward is (part of) one component, or None."""
    if isinstance(module, hope.CMSLevel):
        return f"cms.p{module.period}"
    kinds = ((hope.CMS, "cms"), (hope.MLP, "mlp"), (hope.SelfModifyingMemory, "selfmod"),
             (hope.NeuralMemory, "memory"), (hope.Attention, "attention"))
    return next((region for kind, region in kinds if isinstance(module, kind)), None)


def function_regions():
    """{code object: region} of the methods and functions that the model calls outside a module's
    forward. A method's region None stands for the region of the module it is called on
    (module_region(self)): MemoryLayer's methods serve both kinds of memory."""
    A = hope.Attention
    methods = [getattr(kind, name) for kind in (hope.NeuralMemory, hope.SelfModifyingMemory)
               for name in ("features", "read", "read_write")]     # inherited ones repeat
    methods += [A.project, A.keys_values, A.attend, A.persistent_keys_values]
    regions = {**dict.fromkeys(methods), hope.memory_update: "memory_update",
               hope.SelfModifyingMemory.generate: "selfmod.generate"}
    return {function.__code__: region for function, region in regions.items()}


def component_of(regions):
    """Component label for the stack of bench regions (outermost first) around a forward op."""
    names = [r[len(REGION):] for r in regions]
    inside = set(names)
    if "optimizer" in inside:
        return "optimizer step (AdamW)"
    level = next((n for n in names if n.startswith("cms.p")), None)
    if level:
        return f"CMS level p={level[5:]}"
    if "cms" in inside:
        return "CMS level gate and mix"
    if "selfmod.generate" in inside:
        return "self-mod: generate k,v,q,lr,forget (M_k..M_forget reads)"
    if "selfmod" in inside:
        if "memory_update" in inside:
            return "self-mod: write all 6 memories (memory_update)"
        return "self-mod: M_mem/M_q reads, self-targets, projections, conv"
    if "memory" in inside:
        if "memory_update" in inside:
            return "main memory: memory_update (read + write)"
        return "main memory: reads, projections, conv, q/k/v, rates"
    if "attention" in inside:
        return "attention (qkv, RoPE, SDPA, out)"
    if "mlp" in inside:
        return "MLP feed-forward"
    return "rest (embedding, norms, head, loss, residuals, gating)"


@contextlib.contextmanager
def component_regions(model):
    """Open a profiler region around each component of `model` for the duration of the block:
    forward hooks on its modules, a profile function for hope's functions (see above)."""
    opened = []                                    # the open regions, innermost last

    def enter(region):
        opened.append(record_function(REGION + region))
        opened[-1].__enter__()

    def leave():
        opened.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        region = module_region(module)
        if region is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, region=region: enter(region)))
            handles.append(module.register_forward_hook(lambda m, a, out: leave(), always_call=True))
    codes = function_regions()

    def profiler(frame, event, arg):               # 'return' comes on an exception too
        if event == "call" and frame.f_code in codes:
            enter(codes[frame.f_code] or module_region(frame.f_locals["self"]))
        elif event == "return" and frame.f_code in codes:
            leave()

    previous = sys.getprofile()
    sys.setprofile(profiler)                       # this thread only: the one that runs the step
    try:
        yield
    finally:
        sys.setprofile(previous)
        for handle in handles:
            handle.remove()
        while opened:                              # left open only if the block raised
            leave()


def breakdown_from_profile(prof, wall_s):
    """Per-component forward / backward / optimizer CPU time (ms) of one profiled training step."""
    events = prof.events()
    backward_ops = []                          # (op, the autograd node evaluation it runs under)

    def ancestors(e):
        chain = []
        p = e.cpu_parent
        while p is not None:
            chain.append(p)
            p = p.cpu_parent
        return chain[::-1]                     # outermost first

    # forward: every op with a sequence number outside the autograd engine -> its component
    backward_prefix = "autograd::engine::evaluate_function:"
    forward_component = {}
    table = {}
    for e in events:
        if e.name.startswith(REGION):
            continue
        chain = ancestors(e)
        engine = next((p for p in chain if p.name.startswith(backward_prefix)), None)
        if e.name.startswith(backward_prefix):
            engine = e
        if engine is None:
            regions = [p.name for p in chain if p.name.startswith(REGION)]
            component = component_of(regions)
            if e.sequence_nr >= 0:
                forward_component.setdefault(e.sequence_nr, component)
            phase = "optimizer" if component.startswith("optimizer") else "forward"
        else:
            backward_ops.append((e, engine))
            continue                           # resolved below, once every forward op is known
        table.setdefault(component, {"forward": 0.0, "backward": 0.0, "optimizer": 0.0})
        table[component][phase] += e.self_cpu_time_total / 1e3
    for e, engine in backward_ops:
        if "AccumulateGrad" in engine.name:
            component = "backward: gradient accumulation"
        else:
            component = forward_component.get(engine.sequence_nr, "backward: unmatched nodes")
        table.setdefault(component, {"forward": 0.0, "backward": 0.0, "optimizer": 0.0})
        table[component]["backward"] += e.self_cpu_time_total / 1e3
    tracked = sum(sum(v.values()) for v in table.values())
    table["untracked (Python between ops, profiler)"] = {
        "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": max(0.0, wall_s * 1e3 - tracked)}
    return table


def op_counts(prof):
    """(forward ops, backward nodes) of one profiled training step: aten ops called by the model
    itself (not from inside another op, the backward or the optimizer), and autograd nodes run by
    the backward (not counting gradient accumulation). On tiny tensors each costs about the same
    fixed overhead, so these counts, not FLOPs, predict the step time."""
    forward = backward = 0
    for e in prof.events():
        if e.name.startswith("autograd::engine::evaluate_function:"):
            backward += "AccumulateGrad" not in e.name
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name.startswith(REGION) and parent.name != REGION + "optimizer":
            parent = parent.cpu_parent
        forward += parent is None
    return forward, backward


def top_ops(prof, limit):
    ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    ops = [a for a in ops if not a.key.startswith(REGION)]
    total = sum(a.self_cpu_time_total for a in ops)
    return [dict(op=a.key, calls=a.count, self_ms=a.self_cpu_time_total / 1e3,
                 share=a.self_cpu_time_total / total) for a in ops[:limit]]


def compiled_share(step):
    """Where one profiled step of a compiled model spends its time: inside the compiled graphs (forward,
    and their backward), or in the eager ops around them and the Python between them."""
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    step_ms = (time.perf_counter() - start) * 1e3
    total = {a.key: a.cpu_time_total / 1e3 for a in prof.key_averages()}
    forward = total.get("CompiledFunction", 0.0)
    backward = total.get("autograd::engine::evaluate_function: CompiledFunctionBackward", 0.0)
    return dict(profiled_step_ms=step_ms, compiled_forward_ms=forward, compiled_backward_ms=backward,
                share=(forward + backward) / step_ms)


def training_step(config, batch, device, seed, compiled=None):
    """(model, optimizer, step): step() runs one training step (fwd, bwd, AdamW) on a fixed batch."""
    torch.manual_seed(seed)
    model = hope.LanguageModel(dataclasses.replace(config, compile_chunks=compiled == "chunks")).to(device).train()
    forward = torch.compile(model) if compiled == "whole" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)   # as train.py
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step():
        optimizer.zero_grad(set_to_none=True)
        _, loss = forward(inputs, targets)
        loss.backward()
        with record_function(REGION + "optimizer"):
            optimizer.step()
    return model, optimizer, step


def bench_model_row(config, batch, steps, warmup, device, seed, breakdown, compiled=None):
    """Train-step time, peak memory and (optionally) the component breakdown of one config.
    compiled: None (eager), "chunks" (config.compile_chunks: each memory chunk's step under torch.compile)
    or "whole" (the whole model through torch.compile); the first warmup step compiles."""
    model, optimizer, step = training_step(config, batch, device, seed, compiled)
    start = time.perf_counter()
    step()                                             # first step allocates AdamW's state (and compiles)
    synchronize(device)
    first_step_s = time.perf_counter() - start
    # second warmup step: peak memory (and, under the profiler, the component breakdown)
    static = sum(p.numel() * p.element_size() for p in model.parameters())
    static += sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t))
    result = dict(params=model.num_params(), compiled=compiled)
    if device.type == "cuda":
        result["peak_bytes"] = peak_memory(step, device) + torch.cuda.memory_allocated(device)
    elif compiled:                                     # compiled code has no module regions to profile
        transient = peak_memory(step, device)
        result["peak_bytes"] = static + transient if transient is not None else None
        if breakdown:
            result["compiled_share"] = compiled_share(step)
    else:
        with component_regions(model):
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            profiled_s = time.perf_counter() - start
        transient = cpu_peak_from_profile(prof)
        result["peak_bytes"] = static + transient if transient is not None else None
        result["forward_ops"], result["backward_nodes"] = op_counts(prof)
        if breakdown:
            result["profiled_step_s"] = profiled_s
            result["breakdown_ms"] = breakdown_from_profile(prof, profiled_s)
            result["top_ops"] = top_ops(prof, 15)
    if compiled:               # the same model eager, its steps in turn with the compiled ones
        eager_step = training_step(config, batch, device, seed)[2]
        for _ in range(max(2, warmup - 2)):
            eager_step()
        result["step_s"], result["eager_step_s"] = timed_in_turn([step, eager_step], steps, device)
        result["compile_s"] = first_step_s - result["step_s"]      # what the first step spent beyond a step
    else:
        result["step_s"] = timeit(step, steps, max(0, warmup - 2), device)
    result["tokens_per_s"] = batch * config.seq_len / result["step_s"]
    return result


def bench_guarded_row(threads, config, batch, steps, warmup, device, seed, breakdown, compiled):
    """bench_model_row, with running out of memory reported as {"error": ...} instead of raised."""
    torch.set_num_threads(threads)
    try:
        with memory_guard(device):
            return bench_model_row(config, batch, steps, warmup, device, seed, breakdown, compiled)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        return dict(error=f"out of memory: {str(error).splitlines()[0][:120]}")


def print_breakdown(name, result):
    table = result["breakdown_ms"]
    total = sum(sum(v.values()) for v in table.values())
    in_ops = sum(sum(v.values()) for k, v in table.items() if not k.startswith("untracked"))
    rows = []
    for component, parts in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        t = sum(parts.values())
        rows.append([component, f"{parts['forward']:.1f}", f"{parts['backward']:.1f}",
                     f"{parts['optimizer'] + parts.get('other', 0.0):.1f}", f"{t:.1f}",
                     f"{100 * t / total:.1f}%",
                     "" if component.startswith("untracked") else f"{100 * t / in_ops:.1f}%"])
    print(f"\n{name}: one training step under torch.profiler ({result['profiled_step_s'] * 1e3:.0f} ms "
          f"profiled vs {result['step_s'] * 1e3:.0f} ms unprofiled), CPU self time per component:")
    print_table(["component", "fwd ms", "bwd ms", "other ms", "total ms", "share", "share of op time"], rows)
    largest = next(r[0] for r in rows if not r[0].startswith("untracked"))
    print(f"largest component: {largest}")
    print(f"\n{name}: top ops by self CPU time (same profiled step)")
    print_table(["op", "calls", "self ms", "share"],
                [[o["op"], o["calls"], f"{o['self_ms']:.1f}", f"{100 * o['share']:.1f}%"]
                 for o in result["top_ops"]])


def bench_models(args, device):
    scales = [(name, *load_preset(name)) for name in args.scales]
    peak = print_header("models: one training step (fwd + bwd + AdamW), random tokens", args)
    if args.checkpoint:
        print("memory checkpointing on (config.checkpoint=True: each chunk recomputed in backward)")
    if args.compile:
        what = ("each memory chunk's step in the HOPE rows (compile_chunks, as train.py on CUDA for long runs), "
                "the whole model in the Transformer rows" if args.compile == "chunks" else "the whole model in every row")
        print(f"torch.compile: {what} (the first warmup step compiles: its time beyond a step is the "
              "'compile s' column, not in step ms;\n'eager step ms': the same model eager, its steps timed "
              "in turn with the compiled ones)")
    results = {}
    for scale, base, batch, note in scales:
        base = {**base, "checkpoint": args.checkpoint}
        steps, warmup = (1, 2) if args.quick or scale == "small" else (20, 3)
        print(f"\n[{scale}] {note}\nmedian of {steps} steps after {warmup} warmup "
              "(the second one measures peak memory under the profiler)")
        per_row = {}
        for row in args.rows:
            config = row_config(row, base)
            compiled = args.compile and ("whole" if config.model == "transformer" else args.compile)
            result = run_isolated(device, bench_guarded_row, args.threads, config, batch, steps, warmup,
                                  device, args.seed, row == "Full HOPE" or args.breakdown_all, compiled or None)
            if "error" in result:
                print(f"  {row}: out of memory (try --checkpoint)", flush=True)
            else:
                note = f" (compiled in {result['compile_s']:.0f} s)" if "compile_s" in result else ""
                if "eager_step_s" in result:
                    saved = result["eager_step_s"] - result["step_s"]
                    pays = f"pays after {result['compile_s'] / saved:,.0f} steps" if saved > 0 else "never pays"
                    note += (f"; eager {result['eager_step_s'] * 1e3:.0f} ms/step, the two timed in turn: "
                             f"compiling saves {saved / result['eager_step_s']:.0%} a step and {pays}")
                print(f"  {row}: {result['step_s'] * 1e3:.0f} ms/step{note}", flush=True)
            result["config"] = dict(vars(config))
            per_row[row] = result
        ref = per_row.get("Transformer", {}).get("step_s")
        table = []
        for row, r in per_row.items():
            if "error" in r:
                table.append([row, "", "OOM"] + [""] * (5 + 2 * bool(args.compile)))
                continue
            r["vs_transformer"] = r["step_s"] / ref if ref else None
            table.append([row, f"{r['params'] / 1e6:.2f}", fmt_ms(r["step_s"]),
                          f"{r['tokens_per_s']:.0f}", fmt_mb(r["peak_bytes"]),
                          fmt_ratio(r["vs_transformer"]), r.get("forward_ops", "n/a"),
                          r.get("backward_nodes", "n/a")] +
                         ([f"{r['compile_s']:.1f}", fmt_ms(r["eager_step_s"])] if args.compile else []))
        print()
        print_table(["row", "params (M)", "step ms", "tokens/s", "peak MB", "vs Transformer", "fwd ops",
                     "bwd nodes"] + (["compile s", "eager step ms"] if args.compile else []), table)
        mac, full = (per_row.get(r, {}).get("vs_transformer") for r in (PURE_MAC, "Full HOPE"))
        if mac is not None:
            target = f" (target <= {PURE_MAC_TARGET:g}x: {verdict(mac, PURE_MAC_TARGET)})" \
                if scale == "tiny" and not args.compile else ""
            print(f"{PURE_MAC} / Transformer: {mac:.2f}x{target}")
        if full is not None:
            bound = FULL_HOPE_TARGETS.get((scale, bool(args.compile)))
            target = f" (target <= {bound:g}x: {verdict(full, bound)})" if bound else ""
            print(f"Full HOPE / Transformer: {full:.2f}x{target} at a matmul peak of {peak:.0f} GFLOP/s")
        print("peak MB = parameters + AdamW moments + the step's peak of activations and gradients "
              "(CPU: profiler allocator events; CUDA: max_memory_allocated)\nfwd ops = aten ops the "
              "model calls in one step, bwd nodes = autograd nodes its backward runs (CPU eager only)")
        for row, r in per_row.items():
            if "breakdown_ms" in r:
                print_breakdown(f"[{scale}] {row}", r)
            if "compiled_share" in r:
                c = r["compiled_share"]
                print(f"[{scale}] {row}, one step under the profiler: {c['profiled_step_ms']:.1f} ms, of which "
                      f"{c['share']:.0%} inside compiled graphs ({c['compiled_forward_ms']:.1f} ms forward, "
                      f"{c['compiled_backward_ms']:.1f} ms their backward); the rest: eager ops around them")
        results[scale] = dict(note=note, batch=batch, steps=steps, warmup=warmup, rows=per_row,
                              matmul_peak_gflops=peak)
    if any("breakdown_ms" in r for scale in results.values() for r in scale["rows"].values()):
        print("\nbreakdown: every op's self CPU time goes to the component whose modules or methods were "
              "on the stack when it ran (record_function\nregions opened by forward hooks on hope's "
              "modules and by a sys.setprofile function around its methods and memory_update;\nnothing "
              "in hope is replaced); a backward op goes to the component of the forward op that created "
              "its autograd node\n(profiler sequence numbers). In Full HOPE the main memory M_mem is "
              "stacked with the five generator memories in one\nmemory_update call (hope.py §8), so its "
              "write is inside 'write all 6 memories' (1/6 of its heads).")
    return results


# -------------------------------------------------------------------------------------------------
# scaling: one block of each mixer and of attention, T = 512 .. 8192
# -------------------------------------------------------------------------------------------------
SCALING_SLOPE_TARGET = 1.15   # lmm: log time / log T from 1024 to 8192


def least_squares(xs, ys):
    """Slope, intercept and R² of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1 - ss_res / ss_tot if ss_tot > 0 else 1.0


def scaling_blocks(args):
    """(name, config) of the blocks to measure; every block has the MLP feed-forward."""
    flags = (dict(cms=False, self_mod=False, surprise=False) if args.flags == "titans"
             else dict(cms=True, self_mod=True, surprise=True))
    common = dict(dim=args.dim, layers=1, checkpoint=args.checkpoint, compile_chunks=False)
    blocks = [("attention (GPT block)", hope.HOPEConfig(model="transformer", **common))]
    for mixer in args.mixers:
        blocks.append((mixer, hope.HOPEConfig(model="hope", mixer=mixer, **flags, **common)))
    return blocks


def bench_scaling(args, device):
    lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    lengths = [T for T in lengths if T <= args.max_len]
    repeats, warmup = (2, 1) if args.quick else (5, 1)
    B = args.batch
    print_header(f"scaling: one block, fwd+bwd, batch {B}, dim {args.dim}", args)
    print(f"memory flags: {args.flags} (titans: cms, self_mod, surprise off; hope: all on); "
          f"every block = pre-norm mixer + MLP; median of {repeats} runs after a peak-memory run "
          f"and {warmup} warmup")
    results = {}
    for name, config in scaling_blocks(args):
        torch.manual_seed(args.seed)
        block = hope.Block(config.validate()).to(device)
        per_T = {}
        for T in lengths:
            x = torch.randn(B, T, config.dim, device=device, requires_grad=True)
            grad = torch.randn(B, T, config.dim, device=device)
            run = fwd_bwd(lambda: block(x, block.initial_state(B), 0)[0], grad)
            try:
                with memory_guard(device):
                    peak = peak_memory(run, device)
                    t = timeit(run, repeats, warmup, device)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                print(f"  {name:22s} T {T:5d}: out of memory; longer T skipped", flush=True)
                break
            per_T[T] = dict(time_s=t, peak_bytes=peak)
            print(f"  {name:22s} T {T:5d}: {t * 1e3:9.1f} ms  {fmt_mb(peak):>8s} MB", flush=True)
        measured = sorted(per_T)
        fit = [T for T in measured if T >= 1024] if len(measured) > 2 else measured
        slope = r2 = per_token = None
        if len(fit) >= 2:
            slope = least_squares([math.log(T) for T in fit], [math.log(per_T[T]["time_s"]) for T in fit])[0]
        if len(measured) >= 2 and all(per_T[T]["peak_bytes"] is not None for T in measured):
            per_token, _, r2 = least_squares(measured, [per_T[T]["peak_bytes"] for T in measured])
        results[name] = dict(per_T=per_T, time_slope=slope, slope_range=[fit[0], fit[-1]] if fit else None,
                             memory_bytes_per_token=per_token, memory_linear_r2=r2)
    fit = [T for T in lengths if T >= 1024] if len(lengths) > 2 else lengths

    def cell(r, T, key, fmt):
        return fmt(r["per_T"][T][key]) if T in r["per_T"] else "OOM"

    def num(x, fmt):
        return "n/a" if x is None else fmt.format(x)

    print()
    print_table(["block"] + [f"T {T} ms" for T in lengths] + [f"slope {fit[0]}-{fit[-1]}"],
                [[n] + [cell(r, T, "time_s", fmt_ms) for T in lengths] + [num(r["time_slope"], "{:.2f}")]
                 for n, r in results.items()])
    print()
    print_table(["block"] + [f"T {T} MB" for T in lengths] + ["KB/token (fit)", "R² linear"],
                [[n] + [cell(r, T, "peak_bytes", fmt_mb) for T in lengths]
                 + [num(r["memory_bytes_per_token"] and r["memory_bytes_per_token"] / 1024, "{:.1f}"),
                    num(r["memory_linear_r2"], "{:.4f}")]
                 for n, r in results.items()])
    print("\nslope = least-squares slope of log time vs log T over the lengths in its header (1 = linear, "
          "2 = quadratic); peak MB = tensor memory\nabove inputs and parameters during fwd+bwd; "
          "KB/token = slope of the linear fit of peak vs T, R² its goodness of fit.")
    if args.quick:
        print("quick: the slope comes from two lengths and two runs each; it is indicative only.")
    if "lmm" in results and results["lmm"]["time_slope"] is not None:
        lmm = results["lmm"]
        print(f"lmm slope {lmm['time_slope']:.2f} (target <= {SCALING_SLOPE_TARGET}: "
              f"{verdict(lmm['time_slope'], SCALING_SLOPE_TARGET)}); "
              f"peak memory R² {num(lmm['memory_linear_r2'], '{:.4f}')}")
    return dict(batch=B, dim=args.dim, lengths=lengths, flags=args.flags, blocks=results)


# -------------------------------------------------------------------------------------------------
# roofline: achieved GFLOP/s of the memory update vs the machine's fp32 matmul peak
# -------------------------------------------------------------------------------------------------
ROOFLINE_TARGET = 0.15


def memory_update_fwd_bwd(layer, x):
    """fwd+bwd of hope.memory_update alone, on the q, k, v and rates the layer computes for x."""
    with torch.no_grad():
        feats, _ = layer.features(x, None)
        q, (k, v) = layer.queries(feats), layer.keys_values(feats)
        rates = layer.rates(feats)
    q, k, v, *rates = (t.detach().clone().requires_grad_() for t in (q, k, v, *rates))
    grad = torch.randn_like(q)

    def run():
        state = layer.initial_state(x.shape[0])          # learned W⁰, requires grad
        out = hope.memory_update(state.weights, state.momentum, k, v, q, *rates, layer.chunk_size)[0]
        out.backward(grad)
    return run


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def matmul_share(fn):
    """Share of fn()'s op time (CPU self time, one profiled run) spent inside matmul kernels."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [a for a in prof.key_averages() if a.key.startswith("aten::")]
    total = sum(a.self_cpu_time_total for a in ops)
    return sum(a.self_cpu_time_total for a in ops if a.key in MATMUL_OPS) / total if total else None


def bench_roofline(args, device):
    B, T, dim, heads, d_head = LAYER_SHAPE
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    n = args.matmul_size
    peak = print_header("roofline: fp32 GFLOP/s", args)
    # what a matmul of the memory's own shapes reaches: per chunk, keys [B·H, C, d] @ W1 [B·H, d, h]
    small = matmul_gflops((B * heads, 16, d_head), (B * heads, d_head, 4 * d_head), repeats * 20, device)
    print(f"for scale: the peak above is torch.mm {n}x{n} @ {n}x{n}, and a bmm of the "
          f"memory's chunk shape [{B * heads},16,{d_head}] @ [{B * heads},{d_head},{4 * d_head}] "
          f"reaches {small:.1f} GFLOP/s")
    print(f"work: batch {B}, T {T}, {heads} heads of {d_head}, depth 2, expansion 4; FLOPs of fwd+bwd "
          "counted by FlopCounterMode (matmuls only; elementwise work is not counted)")
    x, grad = layer_inputs(LAYER_SHAPE, args.seed, device)
    cases = []
    for C in (16, 64):
        layer = memory_layer(dim, heads, d_head, C).to(device)
        cases.append((f"memory_update C={C}", memory_update_fwd_bwd(layer, x)))
        cases.append((f"NeuralMemory layer C={C}", memory_fwd_bwd(layer, x, grad)))
    cases.append(("Transformer layer", transformer_fwd_bwd(transformer_layer(dim, heads, device), x, grad)))
    rows, results = [], dict(matmul_peak_gflops=peak, chunk_bmm_gflops=small, cases={})
    for name, run in cases:
        flops = count_flops(run)
        t = timeit(run, repeats, warmup, device)
        rate = flops / t / 1e9
        in_matmuls = matmul_share(run) if device.type == "cpu" else None
        results["cases"][name] = dict(gflop=flops / 1e9, time_s=t, gflops=rate, fraction_of_peak=rate / peak,
                                      matmul_share=in_matmuls)
        target = ""
        if name.startswith("memory_update"):
            passed = "PASS" if rate / peak >= ROOFLINE_TARGET else "FAIL"
            target = f"target >= {ROOFLINE_TARGET:.0%}: {passed}"
        rows.append([name, f"{flops / 1e9:.2f}", fmt_ms(t), f"{rate:.1f}", f"{100 * rate / peak:.1f}%",
                     "n/a" if in_matmuls is None else f"{100 * in_matmuls:.0f}%",
                     "n/a" if not in_matmuls else f"{rate / in_matmuls:.1f}", target])
    print()
    print_table(["fwd+bwd", "GFLOP", "ms", "GFLOP/s", "of mm peak", "time in matmuls",
                 "GFLOP/s inside matmuls", ""], rows)
    print("time in matmuls = share of the op time (one profiled run) inside mm/bmm kernels; the rest is "
          "elementwise work,\ncopies and reductions, which FlopCounterMode does not count (CPU only)")
    return results


# -------------------------------------------------------------------------------------------------
# stability: does every row train at every size with the default learning-rate rule?
# -------------------------------------------------------------------------------------------------

STABILITY_SIZES = {"tiny": [], "dim 256, 6 layers": ["--dim", "256", "--layers", "6"],
                   "dim 512, 8 layers": ["--dim", "512", "--layers", "8"],
                   # the inner memory's settings at the edges of the head shapes users pick
                   "tiny, 1 head of 64": ["--d-head", "64"], "tiny, 12 layers": ["--layers", "12"]}
# A run whose gradient norm (before clipping) passes this has diverged, whatever its loss: clipping
# only hides it (the rows that pass stay orders of magnitude below it: docs/benchmarks.md,
# Stability).
STABILITY_GRAD_LIMIT = 1e4
STABILITY_ROWS = {"Full HOPE": [], "No CMS": ["--no-cms"], "No Self-Mod": ["--no-self-mod"],
                  "No Surprise": ["--no-surprise"], "Titans": ["--no-self-mod", "--no-surprise"],
                  "Transformer": ["--model", "transformer"], "Transformer (matched)": ["--model", "transformer"],
                  "Full HOPE, mag": ["--mixer", "mag"], "Full HOPE, mal": ["--mixer", "mal"],
                  "Full HOPE, lmm": ["--mixer", "lmm"],
                  "NL's HOPE": ["--mixer", "lmm", "--cms-arrangement", "chained", "--no-surprise"]}


def memory_states(state):
    """Every hope.MemoryState inside a (nested) state: the mixers' memories and the CMS levels'.
    Block, mixer and CMS states are tuples and lists; attention caches hold tensors only."""
    if isinstance(state, hope.MemoryState):
        yield state
    elif isinstance(state, (tuple, list)):
        for part in state:
            yield from memory_states(part)


def memory_state_norm(state):
    """The largest Frobenius norm of any memory weight tensor (per sample and head) in a ModelState."""
    return max([0.0] + [W.detach().flatten(2).norm(dim=-1).max().item()
                        for memory in memory_states(state.layers) for W in memory.weights])


def stability_row(row, size_flags, steps, seed):
    """Train one row for `steps` steps as train.py would (the `tiny` preset, the size's flags, the
    default lr rule) and report val loss before and after, the largest gradient norm (before
    clipping), the largest memory-state norm after reading a validation batch, non-finite values."""
    torch.set_num_threads(1)
    args = train.build_arg_parser().parse_args(
        [*STABILITY_ROWS[row], *size_flags, "--steps", str(steps), "--eval-batches", "4", "--seed", str(seed)])
    model_cfg, cfg = train.resolve_config(args)
    if row == "Transformer (matched)":
        model_cfg = ablate.ablation_config(row, model_cfg)
    train_data, val_data, _ = train.get_data(cfg.data, cfg.tokenizer, cfg.max_tokens, cfg.data_dir)
    val_batches = train.eval_batches(val_data, cfg.batch_size, model_cfg.seq_len, cfg.eval_batches)
    torch.manual_seed(cfg.seed)
    model = hope.LanguageModel(model_cfg)
    optimizer = train.make_optimizer(model, cfg, torch.device("cpu"))
    evaluate = lambda: train.evaluate(model, val_batches, torch.device("cpu"), contextlib.nullcontext())[0]
    val_start, max_grad, non_finite, start = evaluate(), 0.0, None, time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(step, cfg)
        x, y = train.get_batch(train_data, cfg.batch_size, model_cfg.seq_len, cfg.seed, step)
        loss = model(x, y)[1]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            non_finite = f"step {step + 1}"
            break
        max_grad = max(max_grad, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    val_end = evaluate() if non_finite is None else float("nan")
    state_norm = 0.0
    if model_cfg.model == "hope" and non_finite is None:
        with torch.no_grad():
            x = val_batches[0][0]
            state_norm = memory_state_norm(model.advance(x, model.initial_state(x.shape[0]))[1])
    passed = non_finite is None and val_end <= val_start - 0.5 and max_grad < STABILITY_GRAD_LIMIT
    return dict(row=row, params=model.num_params(), lr=cfg.lr, val_start=val_start, val_end=val_end,
                max_grad_norm=max_grad, max_state_norm=state_norm, non_finite=non_finite, passed=passed,
                seconds=time.perf_counter() - start)


def bench_stability(args, device):
    sizes = list(STABILITY_SIZES) if args.sizes is None else args.sizes
    results = {}
    for size in sizes:
        print_header(f"stability: {size}, {args.stability_steps} steps of every row, default lr rule", args)
        rows = []
        for row in args.stability_rows or STABILITY_ROWS:
            r = run_isolated(device, stability_row, row, STABILITY_SIZES[size], args.stability_steps, args.seed)
            rows.append(r)
            print(f"  {row}: val {r['val_start']:.3f} -> {r['val_end']:.3f}, {r['seconds']:.0f} s", flush=True)
        results[size] = rows
        print_table(["row", "params", "lr", "val step 0", f"val step {args.stability_steps}", "max grad norm",
                     "max memory-state norm", "non-finite", "pass"],
                    [[r["row"], f"{r['params'] / 1e6:.2f}M", f"{r['lr']:.1e}", f"{r['val_start']:.3f}",
                      f"{r['val_end']:.3f}", f"{r['max_grad_norm']:.2f}",
                      f"{r['max_state_norm']:.2f}" if r["max_state_norm"] else "–", r["non_finite"] or "none",
                      "yes" if r["passed"] else "NO"] for r in rows])
    failed = [(size, r["row"]) for size, rows in results.items() for r in rows if not r["passed"]]
    print(f"pass (every run ends >= 0.5 below its step-0 val loss, none diverges, every gradient norm "
          f"before clipping below {STABILITY_GRAD_LIMIT:.0e}): "
          f"{'yes' if not failed else 'NO: ' + ', '.join(f'{r} at {s}' for s, r in failed)}")
    return results


# -------------------------------------------------------------------------------------------------
# peers: hope's memory layer vs lucidrains' titans-pytorch NeuralMemory (issue 14, item 4)
# -------------------------------------------------------------------------------------------------
PEER = "titans-pytorch"
PEER_DIFFERENCES = f"""matched: dim, heads, head width, memory MLP depth 2 and expansion 4, chunk size C, batch, T, float32;
both learn per-head initial memory weights, write with momentum and forgetting, and have no surprise gate.
{PEER} differs (its defaults, except what bench.peer_layer sets):
- rates: its lr is per token, but momentum and forgetting change once per chunk, from the chunk's mean input
  (hope: θ, η, α per token); lr = sigmoid, at most 1 (hope: θ <= lr_max·(1 - η))
- batch_size C (--peer-batch chunk): each chunk takes its gradient at the chunk-start weights, as in hope; its
  default, None (--peer-batch none), takes every chunk's gradient at the sequence-start weights
- around the memory: RMSNorm, then linear q, k, v maps with SiLU, q and k RMS-normalized with a learned gain, and
  the read gated per head by a sigmoid (hope: a causal conv, per-head maps, SiLU, q and k L2-normalized, no gate)
- memory MLP: x + LayerNorm(MLP(x)) with GELU (hope: x + MLP(x) with SiLU); inner loss: mean of squares over d
  (hope: sum); gradients by torch.func vmap(grad) (hope: written out, hope.py §3)
- reads: a token reads the weights after every chunk that ends at or before it, so a chunk's last token sees
  its own chunk's write (hope: every token of a chunk reads the chunk-start weights)"""


def import_peer():
    """None if titans-pytorch imports, else why not (one line)."""
    try:
        import titans_pytorch  # noqa: F401   optional: only `peers` needs it
    except Exception as error:  # a broken install fails with more than ImportError
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def peer_layer(dim, heads, d_head, chunk_size, batch_size):
    """lucidrains' titans_pytorch.NeuralMemory, as close to memory_layer() as its constructor allows:
    the same shapes, SiLU on q, k, v and normalized q, k as in hope, and batch_size (its TTT
    mini-batch) C by default, so that each chunk takes its gradient at the chunk-start weights."""
    import titans_pytorch
    return titans_pytorch.NeuralMemory(dim, chunk_size=chunk_size, batch_size=batch_size, heads=heads,
                                       dim_head=d_head, activation=nn.SiLU(), qk_rmsnorm=True,
                                       default_model_kwargs=dict(depth=2, expansion_factor=4.0))


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def bench_peers(args, device):
    B, T, dim, heads, d_head = LAYER_SHAPE
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    peak = print_header(f"peers: hope.NeuralMemory vs {PEER} NeuralMemory, one layer, fwd+bwd, float32", args)
    version = importlib.metadata.version(PEER)
    print(f"{PEER} {version}")
    print(f"shape: batch {B}, T {T}, dim {dim}, {heads} heads of {d_head}; memory MLP depth 2, expansion 4; "
          f"{PEER} batch_size {'C' if args.peer_batch == 'chunk' else 'None'}; Transformer layer as in "
          f"`bench.py memory`\ntiming: median of {repeats} runs after {warmup} warmup, in the order of the "
          "table; loss = <output, fixed random grad>; input requires grad")
    x, grad = layer_inputs(LAYER_SHAPE, args.seed, device)
    tf = transformer_layer(dim, heads, device)
    t_tf = timeit(transformer_fwd_bwd(tf, x, grad), repeats, warmup, device)
    results = dict(batch=B, seq_len=T, dim=dim, heads=heads, d_head=d_head, repeats=repeats, warmup=warmup,
                   peer=PEER, peer_version=version, peer_batch=args.peer_batch, matmul_peak_gflops=peak,
                   transformer_s=t_tf, transformer_params=num_params(tf), chunks={})
    rows = [["Transformer layer", "-", f"{num_params(tf) / 1e3:.0f}", fmt_ms(t_tf), "1.00x", ""]]
    for C in (16, 64):
        torch.manual_seed(args.seed)
        peer = peer_layer(dim, heads, d_head, C, C if args.peer_batch == "chunk" else None).to(device)
        t_peer = timeit(fwd_bwd(lambda: peer(x)[0], grad), repeats, warmup, device)
        torch.manual_seed(args.seed)
        ours = memory_layer(dim, heads, d_head, C).to(device)
        t_hope = timeit(memory_fwd_bwd(ours, x, grad), repeats, warmup, device)
        results["chunks"][C] = dict(peer_s=t_peer, hope_s=t_hope, hope_speedup=t_peer / t_hope,
                                    peer_params=num_params(peer), hope_params=num_params(ours))
        rows.append([PEER, C, f"{num_params(peer) / 1e3:.0f}", fmt_ms(t_peer), fmt_ratio(t_peer / t_tf), ""])
        rows.append(["hope", C, f"{num_params(ours) / 1e3:.0f}", fmt_ms(t_hope), fmt_ratio(t_hope / t_tf),
                     fmt_ratio(t_peer / t_hope)])
    print()
    print_table(["layer", "C", "params (K)", "ms/step", "vs Transformer", f"hope speedup vs {PEER}"], rows)
    print(f"\nhope speedup = {PEER} ms / hope ms at the same C (above 1: hope is faster)\n{PEER_DIFFERENCES}")
    return results


# -------------------------------------------------------------------------------------------------
# probe: write N key-value pairs into the memory as initialised, read them back (no training)
# -------------------------------------------------------------------------------------------------
PROBE_GEOMETRIES = ("model", "decorrelated")
PROBE_PAIRS, PROBE_HEAD_WIDTHS = (8, 32, 64), (16, 64)
PROBE_TRIALS, PROBE_CHUNK, PROBE_NEXT_CHUNKS = 32, 16, 8     # batch of independent trials, C, stability chunks


def probe_pairs(geometry, mix, n):
    """n unit keys and values [B, 1, n, d] per trial. Keys "model": normalize(SiLU(x A)) with x ~ N(0, 1)
    and the trial's map A (mix [B, 1, d, d]), as NeuralMemory makes them (SiLU gives them a shared positive
    direction: correlated); "decorrelated": normalize(randn). Values v ~ N(0, 1/d), independent of the keys."""
    B, d = mix.shape[0], mix.shape[-1]
    x = torch.randn(B, 1, n, d)
    keys = F.normalize(F.silu(x @ mix) if geometry == "model" else x, dim=-1)
    return keys, torch.randn(B, 1, n, d) / math.sqrt(d)


def probe_write(state, keys, values, lr_max, rule):
    """One memory_update over the pairs (C = PROBE_CHUNK, no reads) at the rates RateHeads gives at its
    init bias (input term 0; hope.RATE_START by rule). (W, S, surprise, θ at init)."""
    B, _, T, _ = keys.shape
    with torch.random.fork_rng(devices=[]):        # its weight's draw leaves the next pairs as they are
        rates = hope.RateHeads(1, 1, lr_max, rule).to(keys)(keys.new_zeros(B, 1, T, 1))  # θ, η, α [B, 1, T]
    return (*hope.memory_update(*state, keys, values, None, *rates, PROBE_CHUNK, write_rule=rule)[1:],
            rates[0].mean().item())


def probe_recall(weights, keys, values):
    """(nearest-value accuracy, mean ‖M_W(k_i) − v_i‖ / ‖v_i‖) of the reads of every stored key."""
    reads, values = hope.memory_forward(weights, keys)[:, 0], values[:, 0]          # [B, N, d]
    if not reads.isfinite().all():
        return math.nan, math.nan
    nearest = torch.cdist(reads, values).argmin(-1)                                  # [B, N]
    accuracy = (nearest == torch.arange(keys.shape[2], device=keys.device)).float().mean()
    return accuracy.item(), ((reads - values).norm(dim=-1) / values.norm(dim=-1)).mean().item()


@contextlib.contextmanager
def hidden_layer_lr(rule, share):
    """hope.HIDDEN_LR[rule] = share for the block (the probe's comparison row: the hidden layer at
    the full θ, as before the share), restored after."""
    kept = hope.HIDDEN_LR[rule]
    hope.HIDDEN_LR[rule] = share
    try:
        yield
    finally:
        hope.HIDDEN_LR[rule] = kept


def probe_group(geometry, d, n, lr_maxes, dtype, device):
    """The rows of one (geometry, d, N): no write, then each rule (and θ_max) on the same pairs, and
    the proximal rule once more with its hidden layer written at the full θ."""
    mix = torch.randn(PROBE_TRIALS, 1, d, d) / math.sqrt(d)           # a Linear-scale map per trial
    to = lambda ts: tuple(t.to(device, dtype) for t in ts)
    keys, values = to(probe_pairs(geometry, mix, n))
    next_keys, next_values = to(probe_pairs(geometry, mix, PROBE_NEXT_CHUNKS * PROBE_CHUNK))
    start = hope.MemoryState.start(to(W.detach() for W in hope.init_memory_weights(1, d, 2, 2)), PROBE_TRIALS)
    start = (start.weights, start.momentum)
    common = dict(geometry=geometry, d_head=d, pairs=n)
    accuracy, rel_error = probe_recall(start[0], keys, values)
    rows = [dict(common, rule="no write", accuracy=accuracy, rel_error=rel_error)]
    for rule, hidden_lr in [(rule, hope.HIDDEN_LR[rule]) for rule in hope.WRITE_RULES] + [("proximal", 1.0)]:
        for lr_max in lr_maxes or [hope.default_lr_max(rule, d)]:
            with hidden_layer_lr(rule, hidden_lr):
                weights, momentum, _, lr = probe_write(start, keys, values, lr_max, rule)
                next_weights, next_momentum, surprise, _ = probe_write((weights, momentum), next_keys,
                                                                       next_values, lr_max, rule)  # [B, 1, 8·C]
            accuracy, rel_error = probe_recall(weights, keys, values)
            states = (*weights, *momentum, *next_weights, *next_momentum, surprise)
            label = rule if hidden_lr == hope.HIDDEN_LR[rule] else f"{rule}, hidden ×{hidden_lr:g}"
            rows.append(dict(common, rule=label, hidden_lr=hidden_lr, lr_max=lr_max, lr=lr, accuracy=accuracy,
                             rel_error=rel_error, max_next_loss_per_d=surprise.max().item() / d,
                             finite=all(t.isfinite().all().item() for t in states)))
    return rows


def probe_cell(row, key, fmt):
    value = row.get(key)
    return "–" if value is None else "nan" if math.isnan(value) else fmt.format(value)


def bench_probe(args, device):
    dtype = getattr(torch, args.probe_dtype)
    print_header(f"probe: write N key-value pairs into the memory at init, read them back, {args.probe_dtype}",
                 args)
    print(f"memory: init_memory_weights(1 head, d, depth 2, expansion 2, branch_scale 0.1), momentum 0; "
          f"{PROBE_TRIALS} trials (batch), C {PROBE_CHUNK}; one memory_update over the N pairs, then M_W(k_i) "
          f"for each\nθ, η, α as RateHeads starts them (hope.RATE_START: θ_max/4 and η 0.5 for titans "
          f"and longhorn, θ ≈ θ_max/10 and η ≈ 0 for proximal and delta), α = σ(−6); the hidden layer at θ times "
          + ", ".join(f"{share:g} ({rule})" for rule, share in hope.HIDDEN_LR.items())
          + " (hope.HIDDEN_LR; the row 'proximal, hidden ×1' writes it at the full θ); θ_max "
          + (f"{args.lr_max} (--lr-max)" if args.lr_max else "hope.default_lr_max(rule, d)"))
    torch.manual_seed(args.seed)
    with torch.no_grad():
        rows = [row for geometry in PROBE_GEOMETRIES for d in PROBE_HEAD_WIDTHS for n in PROBE_PAIRS
                for row in probe_group(geometry, d, n, args.lr_max, dtype, device)]
    print()
    print_table(["geometry", "d_head", "pairs", "rule", "θ", "accuracy", "rel. error",
                 f"max inner loss/d, next {PROBE_NEXT_CHUNKS} chunks", "finite"],
                [[r["geometry"], r["d_head"], r["pairs"], r["rule"], probe_cell(r, "lr", "{:.3g}"),
                  probe_cell(r, "accuracy", "{:.0%}"), probe_cell(r, "rel_error", "{:.3f}"),
                  probe_cell(r, "max_next_loss_per_d", "{:.3g}"),
                  {True: "yes", False: "NO"}.get(r.get("finite"), "–")] for r in rows])
    print(f"\nchance accuracy = 1/N: {', '.join(f'{1 / n:.1%} at {n}' for n in PROBE_PAIRS)} pairs. accuracy: "
          "M(k_i) is nearest to its own v_i among the N values; rel. error: mean ‖M(k_i) − v_i‖ / ‖v_i‖ "
          f"(no write: W⁰);\nmax inner loss/d: the largest surprise ‖M(k) − v‖² / d over {PROBE_NEXT_CHUNKS} "
          "more chunks of fresh pairs written after; finite: every weight, momentum and loss stayed finite")
    return dict(trials=PROBE_TRIALS, chunk_size=PROBE_CHUNK, next_chunks=PROBE_NEXT_CHUNKS, dtype=args.probe_dtype,
                momentum_decay=0.5, forget=1 / (1 + math.exp(6)), rows=rows)


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------

COMMANDS = {"memory": bench_memory, "models": bench_models, "scaling": bench_scaling,
            "roofline": bench_roofline, "stability": bench_stability, "peers": bench_peers,
            "probe": bench_probe}
NOT_IN_ALL = ("stability", "peers", "probe")


def choices(parser, flag, value, known, sep=";"):
    """A flag's sep-separated value as a list of known names (';' where the names hold commas);
    None stays None."""
    if value is None:
        return None
    chosen = [name.strip() for name in value.split(sep) if name.strip()]
    if not chosen or not set(chosen) <= set(known):
        parser.error(f"{flag}: choose from {(sep + ' ').join(known)} (got {sep.join(chosen)})")
    return chosen


def parse_args(argv=None):
    parser = train.OneLineParser(description=__doc__.split("\nHow it measures")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a fast pass: fewer repeats and sizes")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", action="store_true",
                        help="models/scaling: recompute each memory chunk in backward")
    group = parser.add_argument_group("memory")
    group.add_argument("--seq-len-sequential", type=int, default=None,
                       help="T at which the sequential path is timed (default 128, quick 32)")
    group = parser.add_argument_group("models")
    group.add_argument("--scales", default=None,
                       help="comma list of tiny, small (default both; --quick runs tiny only). "
                       "Small on CPU takes minutes per row and several GB")
    group.add_argument("--rows", default=None,
                       help=f"comma list of rows (default all: {', '.join(MODEL_ROWS)})")
    group.add_argument("--compile", nargs="?", const="chunks", choices=("chunks", "whole"),
                       help="torch.compile: chunks (the flag alone) compiles each memory chunk's step of the HOPE "
                       "rows and the whole Transformer, whole compiles every whole model (CPU: needs a C++ "
                       "compiler; minutes)")
    group.add_argument("--breakdown-all", action="store_true",
                       help="component breakdown for every row, not only Full HOPE")
    group = parser.add_argument_group("scaling")
    group.add_argument("--batch", type=int, default=1)
    group.add_argument("--dim", type=int, default=256)
    group.add_argument("--max-len", type=int, default=8192)
    group.add_argument("--mixers", default="mac,mag,mal,lmm")
    group.add_argument("--flags", choices=["titans", "hope"], default="titans",
                       help="memory flags of the mixer blocks (default titans: cms/self_mod/surprise off)")
    group = parser.add_argument_group("stability")
    group.add_argument("--sizes", default=None, help=f"';' list of: {'; '.join(STABILITY_SIZES)} "
                       "(default all)")
    group.add_argument("--stability-steps", type=int, default=30)
    group.add_argument("--stability-rows", default=None, help=f"';' list of: {'; '.join(STABILITY_ROWS)} "
                       "(default all; e.g. half the rows per process)")
    group = parser.add_argument_group("probe")
    group.add_argument("--lr-max", default=None, help="comma list of θ_max values, each for every write rule "
                       "(default: hope.default_lr_max of the rule and head width)")
    group.add_argument("--probe-dtype", choices=["float32", "float64"], default="float32",
                       help="dtype of the memory and the pairs (default float32, the model's)")
    group = parser.add_argument_group("matmul peak (every subcommand's header)")
    group.add_argument("--matmul-size", type=int, default=2048,
                       help="n of the n x n matmul that measures the machine's peak (default 2048)")
    group = parser.add_argument_group("peers")
    group.add_argument("--peer-batch", choices=["chunk", "none"], default="chunk",
                       help=f"{PEER}'s batch_size: chunk (default) = C, each chunk's gradient at the "
                       "chunk-start weights as in hope; none = its default, all at the sequence start")
    args = parser.parse_args(argv)
    args.scales = (["tiny"] if args.quick else ["tiny", "small"]) if args.scales is None \
        else [s.strip() for s in args.scales.split(",") if s.strip()]
    if not set(args.scales) <= set(SCALE_VOCAB):
        parser.error(f"--scales: choose from tiny, small (got {','.join(args.scales)})")
    args.rows = choices(parser, "--rows", args.rows, MODEL_ROWS, ",") or MODEL_ROWS
    args.sizes = choices(parser, "--sizes", args.sizes, STABILITY_SIZES)
    args.stability_rows = choices(parser, "--stability-rows", args.stability_rows, STABILITY_ROWS)
    if args.stability_steps < 1:
        parser.error("--stability-steps must be >= 1")
    if args.command == "stability" and args.device != "cpu":
        parser.error("stability trains on the CPU only, as `python train.py` does there")
    if args.lr_max is not None:
        try:
            args.lr_max = [float(x) for x in args.lr_max.split(",") if x.strip()]
        except ValueError:
            args.lr_max = []
        if not args.lr_max or not all(0 <= x < math.inf for x in args.lr_max):
            parser.error("--lr-max: a comma list of finite numbers >= 0, e.g. 0.02,0.1,1")
    args.mixers = choices(parser, "--mixers", args.mixers, hope.MIXERS, ",")
    if args.threads < 1 or args.batch < 1 or args.dim < 1 or args.max_len < 1 or args.matmul_size < 1:
        parser.error("--threads, --batch, --dim, --max-len and --matmul-size must be >= 1")
    if args.command == "peers" and (why := import_peer()):
        parser.error(f"peers times lucidrains' {PEER}, which does not import here ({why}): "
                     f"pip install {PEER}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu)")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train.fast_cpu_math()
    device = torch.device(args.device)
    commands = [c for c in COMMANDS if c not in NOT_IN_ALL] if args.command == "all" else [args.command]
    report = dict(command=args.command, argv=sys.argv[1:] if argv is None else list(argv),
                  machine=machine_info(args), results={})
    for name in commands:
        start = time.perf_counter()
        report["results"][name] = COMMANDS[name](args, device)
        print(f"({name} took {time.perf_counter() - start:.0f} s)")
    report["machine"]["load_average_end"] = load_average()
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
