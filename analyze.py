"""
analyze.py — the internal dynamics of a trained HOPE run (seed paper §4.2-4.4, Figures 1-3).

    python train.py --save-every 50 --out-dir out/hope     # snapshots out/hope/ckpt_000050.pt, ...
    python analyze.py out/hope --seq-len 512                # figures, analysis.json, analysis.md

From the run's snapshot checkpoints, on held-out (validation) sequences:
  1. CMS (Figure 1): parameter norms of each level over training, drift between snapshots, cosine
     similarity of the levels' outputs, per-layer norms.
  2. Self-modification (Figure 2): L2 drift of every memory's meta (initial) weights from
     initialization over training; after reading held-out text, ‖W_fast − W_meta‖ / ‖W_meta‖ per
     component and layer, with ‖W_fast‖ / ‖W_meta‖ and cos(W_fast, W_meta) beside it (forgetting
     alone drives W_fast → 0, which also gives a relative divergence of 1).
  3. Surprise (Figure 3, Table 2): the per-token surprise s_t = ‖M(k_t) − v_t‖² (and s_t / d_head),
     the per-token cross-entropy, and the gate pass rate against absolute and relative thresholds:
     for the main memory M_mem, and per gated memory (Titans memory, each self-modifying
     component, each CMS level).
  4. Beyond the paper (Figure 4): loss by token position with memory writes on, and frozen (no
     memory_update; every read uses the meta weights W⁰), and their difference with a 95% band
     over sequences, per position and per MAC segment: does the memory adapt online? Read it at
     a context several segments long (--seq-len), past the training context too.
Sections that do not apply to the run's model (e.g. CMS for a No CMS run) are skipped and said so.
"""
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hope
import train

ABSOLUTE_THRESHOLDS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]
RELATIVE_THRESHOLDS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]


# -------------------------------------------------------------------------------------------------
# Loading a run
# -------------------------------------------------------------------------------------------------

def load_snapshots(run_dir):
    """[(step, checkpoint)] from ckpt_NNNNNN.pt snapshots (and ckpt.pt if newer), sorted by step."""
    paths = {int(m.group(1)): p for p in Path(run_dir).glob("ckpt_*.pt")
             if (m := re.fullmatch(r"ckpt_(\d+)\.pt", p.name))}
    if (Path(run_dir) / "ckpt.pt").exists():
        final = train.load_checkpoint(Path(run_dir) / "ckpt.pt")
        paths.setdefault(final["step"], Path(run_dir) / "ckpt.pt")
    if not paths:
        raise train.UserError(f"no checkpoints in {run_dir} (train with --save-every N --out-dir {run_dir})")
    return [(step, train.load_checkpoint(paths[step])) for step in sorted(paths)]


def build(checkpoint):
    config = hope.HOPEConfig(**{**checkpoint["config"]["model"], "compile_chunks": False})   # few calls: eager
    model = hope.LanguageModel(config)
    train.load_model_state(model, checkpoint)
    return model.eval()


def heldout(checkpoint, sequences, seq_len):
    cfg = checkpoint["config"]["train"]
    _, val, _ = train.get_data(cfg["data"], cfg["tokenizer"], cfg["max_tokens"], cfg["data_dir"])
    return train.eval_batches(val, sequences, seq_len, 1)[0]                # (x, y) [N, T]


def frozen_twin(model):
    """The same weights with writes off (HOPEConfig.writes): every memory reads its W⁰ and never writes."""
    twin = hope.LanguageModel(dataclasses.replace(model.config, writes=False))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def layer_memories(model):
    """(layer, module) of every mixer memory (Titans or self-modifying)."""
    return [(i, b.mixer.memory) for i, b in enumerate(model.blocks) if not isinstance(b.mixer, hope.Attention)]


def components(memory):
    return hope.SELF_MOD_COMPONENTS if isinstance(memory, hope.SelfModifyingMemory) else ("mem",)


def meta_by_component(memory):
    """{component: flat meta weights} of one memory layer."""
    weights = [W.detach().unflatten(0, (len(components(memory)), memory.heads)) for W in memory.initial_weights]
    return {c: torch.cat([W[i].flatten() for W in weights]) for i, c in enumerate(components(memory))}


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# -------------------------------------------------------------------------------------------------
# 1. CMS (Figure 1) and 2a. meta-weight drift (Figure 2a), over the snapshots
# -------------------------------------------------------------------------------------------------

def over_training(snapshots, x):
    steps, cms, drift = [], [], []
    first = build(snapshots[0][1])
    initial = {(i, c): w for i, m in layer_memories(first) for c, w in meta_by_component(m).items()}
    previous = None
    for step, checkpoint in snapshots:
        model = build(checkpoint)
        steps.append(step)
        drift.append({f"L{i}.{c}": (w - initial[(i, c)]).norm().item()
                      for i, m in layer_memories(model) for c, w in meta_by_component(m).items()})
        if not model.config.cms:
            continue
        levels = {f"L{i}.p{lvl.period}": flat(lvl) for i, b in enumerate(model.blocks)
                  for lvl in b.ffn.levels}
        row = {"norm": {k: v.norm().item() for k, v in levels.items()},
               "drift": {k: (v - previous[k]).norm().item() for k, v in levels.items()} if previous else {},
               "cosine": level_output_cosine(model, x)}
        previous = levels
        cms.append(row)
    return steps, cms, drift


@torch.no_grad()
def level_output_cosine(model, x):
    """Mean over tokens of cos(fast level output, slow level output), per layer."""
    outputs = {}
    hooks = [level.register_forward_hook(lambda level, args, result: outputs.__setitem__(level, result[0]))
             for block in model.blocks for level in block.ffn.levels]
    model(x)
    for hook in hooks:
        hook.remove()
    return {f"L{i}": F.cosine_similarity(outputs[b.ffn.levels[0]], outputs[b.ffn.levels[-1]], dim=-1).mean().item()
            for i, b in enumerate(model.blocks)}


# -------------------------------------------------------------------------------------------------
# 2b. Fast vs meta state, 3. surprise, 4. writes on vs frozen — on the final checkpoint
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def fast_vs_meta(model, x):
    _, state = model.advance(x, model.initial_state(x.shape[0]))
    result = {}
    for i, memory in layer_memories(model):
        n = len(components(memory))
        fast = [W.unflatten(1, (n, memory.heads)) for W in state.layers[i].mixer.memory.weights]  # [B, n, H, ...]
        meta = meta_by_component(memory)
        for c_index, c in enumerate(components(memory)):
            f = torch.cat([W[:, c_index].flatten(1) for W in fast], 1)                   # [B, P]
            m = meta[c][None]                                                            # [1, P]
            ratio = f.norm(dim=1) / m.norm(dim=1)                                     # [B]
            result[f"L{i}.{c}"] = {
                "relative_divergence": ((f - m).norm(dim=1) / m.norm(dim=1)).mean().item(),
                "fast_over_meta_norm": ratio.mean().item(),
                "cosine_fast_meta": F.cosine_similarity(f, m.expand_as(f), dim=1).mean().item(),
                # a mean can be one sequence's blow-up: how many sequences grew past 10x, and the median
                "fast_over_meta_norm_median": ratio.median().item(),
                "sequences_past_10x": int((ratio > 10).sum().item()), "sequences": ratio.numel()}
    return result


def gated_writes(model, x):
    """The logits of x, and {name: (surprise [B, H, T], chunk size)} of every memory the surprise
    gate covers: each layer's mixer memory (L0.mem; every self-modifying component: L0.k, L0.v,
    L0.q, L0.lr, L0.forget, L0.mem) and each CMS level (L0.p8, ...). x is read one period at a time:
    each state it leaves holds the surprise of the period's writes (hope.MemoryState.surprise)."""
    state, logits, writes = model.initial_state(x.shape[0]), [], {}
    for piece in x.split(model.config.period, dim=1):
        piece_logits, state = model.advance(piece, state)
        logits.append(piece_logits)
        for i, (block, layer) in enumerate(zip(model.blocks, state.layers)):
            found = []
            if not isinstance(block.mixer, hope.Attention):          # GPT: no memory
                memory = block.mixer.memory
                s = layer.mixer.memory.surprise.unflatten(1, (-1, memory.heads))    # [B, 1 or 6, H, P]
                found += [(f"L{i}.{c}", s[:, n], memory.chunk_size) for n, c in enumerate(components(memory))]
            if isinstance(block.ffn, hope.CMS):
                found += [(f"L{i}.p{level.period}", level_state.surprise, level.period)
                          for level, level_state in zip(block.ffn.levels, layer.ffn)]
            for name, s, chunk_size in found:
                writes.setdefault(name, ([], chunk_size))[0].append(s)
    return torch.cat(logits, 1), {name: (torch.cat(s, -1), c) for name, (s, c) in writes.items()}


def pass_rates(s, chunk_size, own=None):
    """Share of writes whose gate score reaches each threshold: s_t itself (absolute) and, chunk
    by chunk as the gate computes it, hope.relative_surprise (relative). own: (mode, γ) of the
    run's gate, measured too if it is not in the lists."""
    relative = torch.cat([hope.relative_surprise(c) for c in s.split(chunk_size, -1)], -1)
    rates = {}
    for mode, score, thresholds in [("absolute", s, ABSOLUTE_THRESHOLDS), ("relative", relative, RELATIVE_THRESHOLDS)]:
        named = {str(g): g for g in thresholds}
        if own and own[0] == mode:
            named.setdefault(str(own[1]), own[1])
        rates[f"pass_rate_{mode}"] = {key: (score >= g).double().mean().item()
                                      for key, g in sorted(named.items(), key=lambda item: item[1])}
    return rates


@torch.no_grad()
def surprise_and_loss(model, x, y):
    """Surprise, cross-entropy and gate pass rates on (x, y). The top-level statistics are the main
    memory's (the Titans memory, or M_mem, of every layer); `by_memory` has them per gated memory."""
    logits, writes = gated_writes(model, x)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
    config = model.config
    own = (config.surprise_mode, config.surprise_threshold) if config.surprise else None
    by_memory = {name: {"surprise": describe(s), **pass_rates(s, chunk_size, own)}
                 for name, (s, chunk_size) in writes.items()}
    main = [writes[f"L{i}.mem"][0] for i, _ in layer_memories(model)]
    s = torch.stack(main)                                                   # [layers, B, H, T]
    return {
        "surprise": describe(s), "surprise_per_feature": describe(s / config.d_head), "cross_entropy": describe(ce),
        **pass_rates(s, config.chunk_size, own),
        "gate": {"mode": own[0], "threshold": own[1]} if own else None,
        "by_memory": by_memory,
    }, s.flatten().numpy(), ce.flatten().numpy()


def describe(t):
    t = t.double().flatten()
    sample = torch.randperm(len(t), generator=torch.Generator().manual_seed(0))[:100_000]   # same every run
    q = torch.quantile(t[sample], torch.tensor([0.1, 0.5, 0.9], dtype=t.dtype))
    return {"mean": t.mean().item(), "std": t.std().item(), "min": t.min().item(), "max": t.max().item(),
            "p10": q[0].item(), "median": q[1].item(), "p90": q[2].item()}


@torch.no_grad()
def loss_by_position(model, x, y):
    """Per-sequence, per-position cross-entropy [N, T] with memory writes on, and frozen."""
    def per_position(model):
        logits, _ = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
    on = per_position(model)
    return on, per_position(frozen_twin(model))


def online_adaptation(on, frozen, segment_len):
    """What the writes buy, frozen − on (positive: writing helps), by position: the mean over
    sequences of each sequence's gain averaged over windows of `window` positions, with a 95%
    confidence band (1.96 standard errors over sequences), and the same per MAC segment."""
    gain = (frozen - on).double()                                             # [N, T]
    N, T = gain.shape
    window = max(1, T // 32)

    def mean_ci(per_sequence):                                                # [N, k] -> mean, half-width
        half = 1.96 * per_sequence.std(0) / N ** 0.5 if N > 1 else torch.zeros(per_sequence.shape[1])
        return per_sequence.mean(0).tolist(), half.tolist()
    windows = gain[:, :T // window * window].unflatten(1, (-1, window)).mean(-1)
    segments = gain[:, :T // segment_len * segment_len].unflatten(1, (-1, segment_len)).mean(-1) \
        if T >= segment_len else gain.mean(1, keepdim=True)
    q = T * 3 // 4
    (total,), (total_ci,) = mean_ci(gain.mean(1, keepdim=True))
    (last,), (last_ci,) = mean_ci(gain[:, q:].mean(1, keepdim=True))
    return {"mean_on": on.mean().item(), "mean_frozen": frozen.mean().item(),
            "last_quarter_on": on[:, q:].mean().item(), "last_quarter_frozen": frozen[:, q:].mean().item(),
            "gain": total, "gain_ci95": total_ci, "last_quarter_gain": last, "last_quarter_gain_ci95": last_ci,
            "window": window, "gain_by_window": mean_ci(windows)[0], "gain_by_window_ci95": mean_ci(windows)[1],
            "segment_len": segment_len, "gain_by_segment": mean_ci(segments)[0],
            "gain_by_segment_ci95": mean_ci(segments)[1],
            "by_position_on": on.mean(0).tolist(), "by_position_frozen": frozen.mean(0).tolist()}


# -------------------------------------------------------------------------------------------------
# Figures, JSON, Markdown
# -------------------------------------------------------------------------------------------------

def plot_all(out, steps, cms, drift, divergence, s_values, ce_values, surprise, online):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if cms:
        fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
        keys = list(cms[0]["norm"])
        for k in keys:
            ax[0].plot(steps, [r["norm"][k] for r in cms], label=k)
            ax[1].plot(steps[1:], [r["drift"][k] for r in cms[1:]], label=k)
        for layer in cms[0]["cosine"]:
            ax[2].plot(steps, [r["cosine"][layer] for r in cms], marker="o", label=layer)
        final = cms[-1]["norm"]
        ax[3].bar(range(len(final)), list(final.values()))
        ax[3].set_xticks(range(len(final)), list(final), rotation=60, fontsize=7)
        for a, title in zip(ax, ["(a) level parameter norm", "(b) drift between snapshots",
                                 "(c) cos(fast, slow) of level outputs", "(d) per-layer norms, final"]):
            a.set_title(title, fontsize=9)
        for a in ax[:3]:
            a.set_xlabel("step")
            a.legend(fontsize=6)
        save(fig, "fig1_cms.png")
    if drift and drift[0]:
        fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
        for k in drift[0]:
            ax[0].plot(steps, [d[k] for d in drift], label=k)
        ax[0].set(title="(a) L2 drift of meta weights from initialization", xlabel="step")
        ax[0].legend(fontsize=6, ncol=2)
        names = list(divergence)
        xs = np.arange(len(names))
        for offset, key in [(-0.25, "relative_divergence"), (0, "fast_over_meta_norm"), (0.25, "cosine_fast_meta")]:
            ax[1].bar(xs + offset, [divergence[n][key] for n in names], width=0.25, label=key)
        ax[1].set_xticks(xs, names, rotation=60, fontsize=7)
        ax[1].set_yscale("symlog", linthresh=1)      # linear below 1; a blown-up memory stays on the axis
        ax[1].set_title("(b) fast vs meta state after reading held-out text (mean over sequences)", fontsize=9)
        ax[1].legend(fontsize=7)
        save(fig, "fig2_self_mod.png")
    if surprise is not None:
        fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
        ax[0].hist(s_values, bins=80)
        ax[0].set(title="(a) per-token surprise s_t (memory inner loss)", xlabel="s_t")
        ax[1].hist(ce_values, bins=80, color="tab:orange")
        ax[1].set(title="per-token cross-entropy (nats)", xlabel="CE")
        ax[2].semilogx([float(g) for g in surprise["pass_rate_absolute"]],
                       [100 * v for v in surprise["pass_rate_absolute"].values()], marker="o", label="absolute γ")
        ax[2].semilogx([float(g) for g in surprise["pass_rate_relative"]],
                       [100 * v for v in surprise["pass_rate_relative"].values()], marker="s", label="relative γ")
        ax[2].set(title="(b) gate pass rate vs threshold", xlabel="threshold", ylabel="% tokens passing")
        ax[2].legend()
        save(fig, "fig3_surprise.png")
    if online is not None:
        fig, ax = plt.subplots(1, 2, figsize=(13, 3.8))
        ax[0].plot(online["by_position_on"], label="memory writes on", lw=1)
        ax[0].plot(online["by_position_frozen"], label="frozen (reads W⁰, no writes)", lw=1)
        ax[0].set(title="(a) loss by token position", xlabel="position", ylabel="cross-entropy (nats)")
        ax[0].legend()
        w = online["window"]
        centers = np.arange(len(online["gain_by_window"])) * w + (w - 1) / 2
        mean, half = np.array(online["gain_by_window"]), np.array(online["gain_by_window_ci95"])
        ax[1].plot(centers, mean, marker=".", label=f"frozen − on, mean over sequences ({w}-token windows)")
        ax[1].fill_between(centers, mean - half, mean + half, alpha=0.3, label="95% confidence band")
        ax[1].axhline(0, color="k", lw=0.8)
        for boundary in range(online["segment_len"], len(online["by_position_on"]), online["segment_len"]):
            ax[1].axvline(boundary, color="grey", lw=0.5, ls=":")
        if online["training_context"] < len(online["by_position_on"]):
            ax[1].axvline(online["training_context"], color="tab:red", lw=1, ls="--",
                          label=f"training context ({online['training_context']} tokens)")
        ax[1].set(title="(b) what the writes buy, by position (dotted: MAC segments)", xlabel="position",
                  ylabel="Δ loss (nats)")
        ax[1].legend(fontsize=7)
        save(fig, "fig4_online_adaptation.png")
    return written


def summary(results):
    lines = [f"# Analysis of {results['run_dir']}", "",
             f"Model: {results['model']} · snapshots at steps {results['steps']} · "
             f"{results['sequences']} held-out sequences of {results['seq_len']} tokens.", ""]
    if results["cms"]:
        last = results["cms"][-1]
        lines += ["## CMS (Figure 1)",
                  "- cos(fast, slow) of level outputs at the last snapshot: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in last["cosine"].items()),
                  "- level parameter norms: " + ", ".join(f"{k} {v:.2f}" for k, v in last["norm"].items()), ""]
    else:
        lines += ["## CMS", "- not in this model (cms off or Transformer).", ""]
    if results["meta_drift"] and results["meta_drift"][0]:
        final = results["meta_drift"][-1]
        early = results["meta_drift"][1] if len(results["meta_drift"]) > 1 else final
        share = np.mean([early[k] / final[k] for k in final if final[k] > 0])
        lines += ["## Self-modification (Figure 2)",
                  f"- meta-weight drift at the first snapshot after init is {100 * share:.0f}% of the final "
                  f"drift on average (step {results['steps'][min(1, len(results['steps']) - 1)]}).",
                  "- fast vs meta after reading held-out text (relative divergence · ‖fast‖/‖meta‖ · cos):"]
        lines += [f"  - {k}: {v['relative_divergence']:.3f} · {v['fast_over_meta_norm']:.3f} · "
                  f"{v['cosine_fast_meta']:.3f}" + (
                      f" ({v['sequences_past_10x']} of {v['sequences']} sequences past 10× the meta norm; "
                      f"median ‖fast‖/‖meta‖ {v['fast_over_meta_norm_median']:.3f})"
                      if v.get("sequences_past_10x") else "")
                  for k, v in results["fast_vs_meta"].items()]
        lines += ["- A relative divergence near 1 with ‖fast‖/‖meta‖ near 0 is forgetting, not adaptation.", ""]
    if results["surprise"]:
        s, ce = results["surprise"]["surprise"], results["surprise"]["cross_entropy"]
        rates = results["surprise"]["pass_rate_absolute"]
        lines += ["## Surprise (Figure 3)",
                  f"- surprise s_t: mean {s['mean']:.3f}, std {s['std']:.3f}, min {s['min']:.4f}, "
                  f"median {s['median']:.3f}; per feature (÷ d_head) mean "
                  f"{results['surprise']['surprise_per_feature']['mean']:.4f}.",
                  f"- per-token cross-entropy: mean {ce['mean']:.3f} nats, std {ce['std']:.3f}, min {ce['min']:.4f}.",
                  "- main memory, absolute gate pass rate: " + ", ".join(
                      f"γ={g}: {100 * v:.1f}%" for g, v in rates.items()),
                  "- main memory, relative gate pass rate: " + ", ".join(
                      f"γ={g}: {100 * v:.1f}%" for g, v in results["surprise"]["pass_rate_relative"].items())]
        by_memory, gate = results["surprise"]["by_memory"], results["surprise"]["gate"]
        lines.append("- mean surprise of every gated memory: " + ", ".join(
            f"{name} {v['surprise']['mean']:.3f}" for name, v in by_memory.items()))
        if gate:
            key, g = f"pass_rate_{gate['mode']}", str(gate["threshold"])
            lines.append(f"- pass rate of every gated memory at this run's gate ({gate['mode']} γ = {g}): "
                         + ", ".join(f"{name} {100 * v[key][g]:.1f}%" for name, v in by_memory.items()))
        else:
            lines.append("- this run has no gate; every memory's pass rates are in analysis.json (by_memory).")
        lines.append("")
    if results["online"]:
        o = results["online"]
        lines += ["## Online adaptation (Figure 4)",
                  f"- mean loss with memory writes {o['mean_on']:.4f} vs frozen {o['mean_frozen']:.4f} nats "
                  f"(last quarter of positions: {o['last_quarter_on']:.4f} vs {o['last_quarter_frozen']:.4f}).",
                  f"- what the writes buy (frozen − on, 95% CI over {results['sequences']} sequences): "
                  f"{o['gain']:+.4f} ± {o['gain_ci95']:.4f} nats overall, {o['last_quarter_gain']:+.4f} ± "
                  f"{o['last_quarter_gain_ci95']:.4f} in the last quarter; by {o['segment_len']}-token segment: "
                  + ", ".join(f"{g:+.3f} ± {h:.3f}" for g, h in zip(o["gain_by_segment"], o["gain_by_segment_ci95"])),
                  ""]
    return "\n".join(lines)


def analyze(run_dir, sequences=64, seq_len=None, out_dir=None):
    run_dir = Path(run_dir)
    out = Path(out_dir or run_dir / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    snapshots = load_snapshots(run_dir)
    final_checkpoint = snapshots[-1][1]
    model = build(final_checkpoint)
    seq_len = seq_len or model.config.seq_len
    x, y = heldout(final_checkpoint, sequences, seq_len)
    is_hope = model.config.model == "hope"
    steps, cms, drift = over_training(snapshots, x)
    divergence = fast_vs_meta(model, x) if is_hope else {}
    surprise, s_values, ce_values = surprise_and_loss(model, x, y) if is_hope else (None, None, None)
    online = online_adaptation(*loss_by_position(model, x, y), model.config.segment_len) if is_hope else None
    if online is not None:
        online["training_context"] = model.config.seq_len
    results = {"run_dir": str(run_dir), "model": model.config.model if not is_hope else
               f"hope (cms={model.config.cms}, self_mod={model.config.self_mod}, surprise={model.config.surprise}, "
               f"mixer={model.config.mixer})", "steps": steps, "sequences": sequences, "seq_len": seq_len,
               "cms": cms, "meta_drift": drift, "fast_vs_meta": divergence, "surprise": surprise, "online": online}
    results["figures"] = plot_all(out, steps, cms, drift, divergence, s_values, ce_values, surprise, online)
    train.atomic_write(out / "analysis.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    train.atomic_write(out / "analysis.md", lambda tmp: tmp.write_text(summary(results)))
    return results, out


def build_arg_parser():
    p = train.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.py --out-dir with snapshot checkpoints (--save-every)")
    p.add_argument("--sequences", type=int, default=64, help="held-out sequences to read")
    p.add_argument("--seq-len", type=int, default=None, help="their length (default: the training context)")
    p.add_argument("--out-dir", default=None, help="where to write (default: RUN_DIR/analysis)")
    return p


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    train.fast_cpu_math()
    try:
        if not Path(args.run_dir).is_dir():
            raise train.UserError(f"run directory {args.run_dir} does not exist")
        if args.sequences < 1 or (args.seq_len is not None and args.seq_len < 2):
            raise train.UserError("--sequences must be >= 1 and --seq-len >= 2")
        results, out = analyze(args.run_dir, args.sequences, args.seq_len, args.out_dir)
    except (train.UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(results))
    print(f"\nwrote {out}/analysis.json, analysis.md and {', '.join(results['figures'])}")


if __name__ == "__main__":
    main()
