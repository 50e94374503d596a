"""
ablate.py — the seed paper's ablation table (Table 1), its threshold sweep (Table 2) and its training
curves (Figure 5), by training every row of ABLATION_ROWS with the same data, seed and steps.

    python ablate.py --preset cpu                 # every row at the `tiny` scale on a CPU
    python ablate.py --preset cpu --seeds 3       # mean ± std per cell, and whether each Δ beats noise
    python ablate.py --preset cpu --steps 2000    # the seed paper's step count, at the `tiny` scale
    python ablate.py --preset paper               # Small and Scaled on OpenWebText, 2,000 steps (GPU)
    python ablate.py --preset cpu --sweep         # surprise thresholds, absolute and relative
    python ablate.py --params                     # parameter counts of every row at every scale

Every finished run is cached under OUT_DIR/runs/ by its config and the code of hope.py and train.py,
and skipped on a rerun; an interrupted run (Ctrl-C, a killed process) continues from its last
checkpoint; a crashing run is recorded and the others go on. Results:
OUT_DIR/results.{md,csv,json}, fig5_curves.png.
"""
import ast
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import hope
import train

# Each preset: the scales (name -> train.py preset plus overrides) and the data.
PRESETS = {
    "paper": dict(scales={"Small (256d, 6L)": dict(train.PRESETS["small"]),
                          "Scaled (512d, 8L)": dict(train.PRESETS["scaled"])},
                  data="openwebtext", tokenizer="gpt2"),
    "cpu": dict(scales={"tiny": dict(train.PRESETS["tiny"])}, data="shakespeare", tokenizer="byte"),
    "smoke": dict(scales={"smoke": dict(dim=32, layers=1, d_head=16, seq_len=32, chunk_size=8, segment_len=16,
                                        batch_size=4, steps=4, lr=2e-3, eval_every=2, eval_batches=1,
                                        save_every=2)},
                  data="shakespeare", tokenizer="byte"),
}


def code_version(*modules):
    """A hash of what the modules' code does: their syntax trees without docstrings, so that an edit
    to comments or docstrings keeps the cached runs, and any edit to the code itself does not."""
    trees = []
    for module in modules:
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        trees.append(ast.dump(tree))
    return hashlib.sha1("\n".join(trees).encode()).hexdigest()


# Cached runs are keyed by their config and by the code that trains them: edit either, and rerun.
CODE_VERSION = code_version(hope, train)
SWEEP = [("absolute", g) for g in (0.005, 0.01, 0.02, 0.05, 0.1)] + [("relative", g) for g in (0.1, 0.3, 1.0, 3.0)]


# The rows of the seed paper's Table 1, as flags on one config.
ABLATION_ROWS = {
    "Full HOPE": dict(model="hope", cms=True, self_mod=True, surprise=True),
    "No CMS": dict(model="hope", cms=False, self_mod=True, surprise=True),
    "No Self-Mod": dict(model="hope", cms=True, self_mod=False, surprise=True),
    "No Surprise": dict(model="hope", cms=True, self_mod=True, surprise=False),
    "Titans": dict(model="hope", cms=True, self_mod=False, surprise=False),
    "Transformer": dict(model="transformer"),
    "Transformer (matched)": dict(model="transformer"),
    # Two rows that pull apart what "No CMS" mixes, in-context learning and capacity:
    "CMS frozen": dict(model="hope", cms=True, self_mod=True, surprise=True, cms_lr_max=0.0),
    "No CMS (matched MLP)": dict(model="hope", cms=False, self_mod=True, surprise=True),
    # NL's own HOPE: no attention, a self-modifying memory, CMS levels chained, no surprise gate
    # (it writes with our default write rule, not NL's DGD: docs/deviations.md 2)
    "NL's HOPE": dict(model="hope", mixer="lmm", cms=True, cms_arrangement="chained", self_mod=True,
                      surprise=False),
}


def count_params(config):
    """Parameters of a config, without allocating them."""
    with torch.device("meta"):
        return hope.LanguageModel(config).num_params()


def ablation_config(row, config):
    """The config of one ablation row, built from a base config (dims, data, training context)."""
    if row not in ABLATION_ROWS:
        raise ValueError(f"unknown ablation row '{row}' ({', '.join(ABLATION_ROWS)})")
    base = {k: v for k, v in vars(config).items() if k not in ("heads",)}
    row_config = hope.HOPEConfig(**{**base, **ABLATION_ROWS[row]})
    if row == "Transformer (matched)":
        # same layers, dim = the smallest multiple of 64 whose parameters reach Full HOPE's
        target = count_params(ablation_config("Full HOPE", config))
        dim = 64
        while count_params(hope.HOPEConfig(**{**base, **ABLATION_ROWS[row], "dim": dim})) < target:
            dim += 64
        row_config = hope.HOPEConfig(**{**base, **ABLATION_ROWS[row], "dim": dim})
    if row == "No CMS (matched MLP)":
        # the MLP's hidden width h whose parameters, (2·dim + 1)·h + dim, come closest to CMS's
        with torch.device("meta"):
            cms = sum(p.numel() for p in hope.CMS(row_config).parameters())
        row_config.mlp_hidden = max(1, round((cms - config.dim) / (2 * config.dim + 1)))
    return row_config


def configs(scale_settings, data, tokenizer, row, seed, out_dir, device, overrides=None, label=None):
    """(model config, train config) of one run; the run directory is named by a hash of both.
    row: an ablation row, applied to the settings, or None (the settings are the model); label: the
    run's name, if not the row's."""
    settings = {**scale_settings, "data": data, "tokenizer": tokenizer, "seed": seed, "device": device,
                "vocab_size": train.VOCAB_SIZES[tokenizer], **(overrides or {})}
    if data in train.RECALL_TASKS:
        train.apply_recall_task(settings)
    base = hope.HOPEConfig(**{k: v for k, v in settings.items() if k in train.MODEL_FIELDS})
    model_cfg = base if row is None else ablation_config(row, base)
    cfg = train.TrainConfig(**{k: v for k, v in settings.items() if k in train.TRAIN_FIELDS})
    key = json.dumps([dataclasses.asdict(model_cfg), {**dataclasses.asdict(cfg), "out_dir": None, "device": None},
                      CODE_VERSION], sort_keys=True, default=str)
    slug = "".join(c if c.isalnum() else "-" for c in (label or row).lower())
    cfg.out_dir = str(Path(out_dir) / "runs" / f"{slug}-seed{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    return model_cfg, cfg


def lock_path(run_dir):
    return Path(run_dir) / "training.lock"


def claim(run_dir):
    """Claim a run directory for this process: a lock file that holds its pid. False while another
    live process holds it (two processes with overlapping --rows); a dead process's lock is taken."""
    lock = lock_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(lock, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            time.sleep(0.1)                                    # let its owner finish writing its pid
            try:
                owner = int(lock.read_text())
                os.kill(owner, 0)                              # raises if no such process
                return False
            except (FileNotFoundError, ValueError, ProcessLookupError):
                lock.unlink(missing_ok=True)
            except PermissionError:                            # alive, another user's
                return False


def result_path(cfg):
    """Where a run's result is cached: written once it finished (or diverged)."""
    return Path(cfg.out_dir) / "result.json"


def finished_result(cfg):
    """The cached result of the run at cfg.out_dir, or None if it has not finished."""
    path = result_path(cfg)
    return json.loads(path.read_text()) if path.exists() else None


def run_once(model_cfg, cfg):
    """Train one run, or read its cached result. A crash is recorded, not raised; a diverged run
    (NonFiniteLoss) is cached like a finished one, as it would diverge again. A run that another
    process is training is waited for, then read."""
    if (result := finished_result(cfg)) is not None:
        return result
    if not claim(cfg.out_dir):
        print(f"waiting for another process to finish {cfg.out_dir}", flush=True)
        while not claim(cfg.out_dir):
            time.sleep(10)
    try:
        if (result := finished_result(cfg)) is not None:        # the other process finished it
            return result
        return train_and_record(model_cfg, cfg)
    finally:
        lock_path(cfg.out_dir).unlink(missing_ok=True)


def train_and_record(model_cfg, cfg):
    """Train one run and write its result.json; a run interrupted before (Ctrl-C, a killed process)
    continues from the ckpt.pt it left, exactly as `train.py --resume` would."""
    checkpoint = interrupted_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    try:
        result = train.train_model(model_cfg, cfg, checkpoint)
    except KeyboardInterrupt:
        raise
    except train.UserError:
        raise
    except Exception as e:                                     # NonFiniteLoss, out of memory, a bug
        print(f"run {cfg.out_dir} failed: {type(e).__name__}: {e}", file=sys.stderr)
        failure = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        if isinstance(e, train.NonFiniteLoss):                 # deterministic: it would diverge again
            train.atomic_write(result_path(cfg), lambda tmp: tmp.write_text(json.dumps(failure)))
        return failure
    train.atomic_write(result_path(cfg), lambda tmp: tmp.write_text(json.dumps(result)))
    return result


def interrupted_checkpoint(path):
    """The checkpoint an interrupted run left in its directory, or None (none, or unreadable: then
    the run starts over). The directory's name hashes the configs and the code, so it fits."""
    if not path.exists():
        return None
    try:
        checkpoint = train.load_checkpoint(path)
    except train.UserError as e:
        print(f"{e}; training {path.parent} from the start", flush=True)
        return None
    print(f"resuming {path.parent} from step {checkpoint['step']}", flush=True)
    return checkpoint


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# Two-sided 5 % quantiles of Student's t, by degrees of freedom (a df between two entries takes the
# smaller one's, the larger quantile).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def paired_delta(runs, reference):
    """Δ = mean over seeds of (row − Full HOPE), each seed against the same seed: seed s of every row
    trains on the same batches (train.get_batch), so pairing removes the data order's share of the
    noise. Returns (Δ, its standard error, whether it beats noise: a two-sided paired t-test at
    5 %), or None with fewer than two seeds that both finished."""
    diffs = [a["train_loss"] - b["train_loss"] for a, b in zip(runs, reference)
             if "error" not in a and "error" not in b]
    if len(diffs) < 2:
        return None
    stderr = statistics.stdev(diffs) / len(diffs) ** 0.5
    t = T_975[max(df for df in T_975 if df <= len(diffs) - 1)]
    return statistics.fmean(diffs), stderr, abs(statistics.fmean(diffs)) > t * stderr


def summarize(results, rows, scales):
    """One cell per (scale, row): loss mean/std over seeds, Δ vs Full HOPE, whether Δ beats noise."""
    table = {}
    for scale in scales:
        reference = [r["train_loss"] for r in results[scale].get("Full HOPE", []) if "error" not in r]
        for row in rows:
            runs = [r for r in results[scale].get(row, []) if "error" not in r]
            loss, loss_std = mean_std([r["train_loss"] for r in runs])
            val, val_std = mean_std([r["val_loss"] for r in runs])
            cell = dict(loss=loss, loss_std=loss_std, val_loss=val, val_std=val_std, n=len(runs),
                        params=runs[0]["params"] if runs else None,
                        tokens_per_s=mean_std([r["tokens_per_s"] for r in runs])[0],
                        errors=[r["error"] for r in results[scale].get(row, []) if "error" in r])
            ref = mean_std(reference)[0]
            if loss is not None and ref is not None and row != "Full HOPE":
                cell["delta"] = loss - ref
                paired = paired_delta(results[scale][row], results[scale]["Full HOPE"])
                if paired is not None:
                    cell["delta"], cell["delta_stderr"], cell["beats_noise"] = paired
            table[(scale, row)] = cell
    return table


def fmt(value, std=None, digits=3):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(table, rows, scales, baselines, title):
    header = "| Variant | " + " | ".join(f"{s} Loss | Δ | val loss | params | tokens/s" for s in scales) + " |"
    lines = [f"### {title}", "", header, "|" + "---|" * (1 + 5 * len(scales))]
    for row in rows:
        cells = []
        for scale in scales:
            c = table[(scale, row)]
            best = min((table[(scale, r)]["loss"] for r in rows if table[(scale, r)]["loss"] is not None), default=None)
            loss = fmt(c["loss"], c["loss_std"])
            loss = f"**{loss}**" if c["loss"] is not None and c["loss"] == best else loss
            delta = "—" if "delta" not in c else f"{c['delta']:+.3f}" + (
                "" if "beats_noise" not in c else
                f" ± {c['delta_stderr']:.3f} " + ("(> noise)" if c["beats_noise"] else "(≤ noise)"))
            if c["errors"] and c["loss"] is None:
                loss = "failed"
            cells += [loss, delta, fmt(c["val_loss"], c["val_std"]),
                      f"{c['params'] / 1e6:.2f}M" if c["params"] else "—",
                      f"{c['tokens_per_s']:,.0f}" if c["tokens_per_s"] else "—"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Loss: final training loss (mean of the train losses since the last evaluation), as the "
              "seed paper's Table 1; val loss on held-out data with fresh memory per sequence; "
              "Δ = Loss − Full HOPE's (positive = worse), ± its standard error, paired by seed (seed s of "
              "every row trains on the same batches); > noise: a two-sided paired t-test at 5 %; "
              "best Loss per scale in bold."]
    for scale, b in baselines.items():
        lines.append(f"- {scale}: corpus baselines on train, unigram {b['unigram']:.2f}, bigram {b['bigram']:.2f} (nats per token).")
    return "\n".join(lines)


def plot_curves(results, rows, scales, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(scales), figsize=(6.5 * len(scales), 4), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        for row in rows:
            runs = [r for r in results[scale].get(row, []) if "error" not in r]
            if runs:
                points = [(p["step"], p["train_loss"]) for p in runs[0]["curve"] if p["train_loss"] is not None]
                ax.plot(*zip(*points), marker=".", label=row) if points else None
        ax.set(title=f"training loss, {scale}", xlabel="step", ylabel="loss (nats per token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    train.atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_results(out_dir, table, payload, md):
    out = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["scale", "row", "loss", "loss_std", "delta", "beats_noise", "val_loss", "val_std",
                     "params", "tokens_per_s", "seeds", "errors"])
    for (scale, row), c in table.items():
        writer.writerow([scale, row, c["loss"], c["loss_std"], c.get("delta"), c.get("beats_noise"), c["val_loss"],
                         c["val_std"], c["params"], c["tokens_per_s"], c["n"], "; ".join(c["errors"])])
    train.atomic_write(out / "results.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
    train.atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))
    train.atomic_write(out / "results.md", lambda tmp: tmp.write_text(md + "\n"))


def ablate(preset="cpu", rows=None, seeds=1, seed=1337, out_dir=None, device="auto", steps=None):
    """The ablation table: every row (or the chosen ones) at every scale of the preset, `seeds` seeds
    each. steps: train this many steps instead of each scale's own (its own directory by default)."""
    spec = PRESETS[preset]
    rows = rows or list(ABLATION_ROWS)
    out_dir = Path(out_dir or f"ablation_{preset}" + (f"_{steps}steps" if steps else ""))
    scales = list(spec["scales"])
    results, baselines = {s: {} for s in scales}, {}
    for scale, settings in spec["scales"].items():
        settings = {**settings, **({"steps": steps} if steps else {})}
        for row in rows:
            for s in range(seed, seed + seeds):
                print(f"== {scale} · {row} · seed {s}", flush=True)
                model_cfg, cfg = configs(settings, spec["data"], spec["tokenizer"], row, s, out_dir, device)
                result = run_once(model_cfg, cfg)
                results[scale].setdefault(row, []).append(result)
                if "baselines" in result:
                    baselines[scale] = result["baselines"]
    table = summarize(results, rows, scales)
    title = f"Ablation, preset `{preset}`" + (f", {steps} steps" if steps else "") + f", {seeds} seed(s)"
    md = markdown(table, rows, scales, baselines, title)
    payload = {"preset": preset, "rows": rows, "seeds": seeds, "scales": spec["scales"], "baselines": baselines,
               "table": [{"scale": s, "row": r, **c} for (s, r), c in table.items()],
               "runs": {s: {r: [{k: v for k, v in x.items() if k != "traceback"} for x in runs]
                            for r, runs in results[s].items()} for s in scales}}
    write_results(out_dir, table, payload, md)
    plot_curves(results, rows, scales, out_dir / "fig5_curves.png")
    return md, out_dir


def sweep(preset="cpu", seed=1337, out_dir=None, device="auto"):
    """Table 2: Full HOPE at each surprise threshold, with the gate pass rate on held-out data."""
    import analyze
    spec = PRESETS[preset]
    scale, settings = next(iter(spec["scales"].items()))
    out_dir = Path(out_dir or f"ablation_{preset}")
    reference = run_once(*configs(settings, spec["data"], spec["tokenizer"], "Full HOPE", seed, out_dir, device))
    lines = [f"### Surprise threshold sweep, Full HOPE, {scale}", "",
             "| mode | threshold | Final loss | Δ vs Full HOPE (γ = 0.02) | val loss | gate pass rate |",
             "|---|---|---|---|---|---|"]
    entries = []
    for mode, gamma in SWEEP:
        model_cfg, cfg = configs(settings, spec["data"], spec["tokenizer"], "Full HOPE", seed, out_dir, device,
                                 dict(surprise_mode=mode, surprise_threshold=gamma))
        result = run_once(model_cfg, cfg)
        if "error" in result:
            lines.append(f"| {mode} | {gamma} | failed | — | — | — |")
            continue
        checkpoint = train.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
        x, y = analyze.heldout(checkpoint, 8, model_cfg.seq_len)
        stats = analyze.surprise_and_loss(analyze.build(checkpoint), x, y)[0]
        rate = stats[f"pass_rate_{mode}"].get(str(gamma))
        delta = result["train_loss"] - reference["train_loss"] if "error" not in reference else None
        entries.append(dict(mode=mode, threshold=gamma, **{k: result[k] for k in ("train_loss", "val_loss")},
                            delta=delta, pass_rate=rate))
        lines.append(f"| {mode} | {gamma} | {result['train_loss']:.3f} | {fmt(delta)} | {result['val_loss']:.3f} | "
                     f"{'—' if rate is None else f'{100 * rate:.1f}%'} |")
    lines += ["", "Pass rate: share of (layer, head, token) writes of the main memory whose surprise passes the "
              "threshold, measured on held-out sequences after training."]
    md = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    train.atomic_write(out_dir / "sweep.md", lambda tmp: tmp.write_text(md + "\n"))
    train.atomic_write(out_dir / "sweep.json", lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))
    return md, out_dir


# The recall table: which memories memorize in context? Multi-query associative recall (train.py
# --data mqar) at dim 64, 2 layers, heads of 16, attention-free (`lmm`) unless a variant says
# otherwise, within the Transformer's calibration budget (1,500 steps of batch 64), each memory with
# its writes on and frozen (θ_max = 0: no token ever writes, only the forget gate still decays the
# initial weights). Then passkey retrieval against distance, on the same budget.
RECALL_BASE = dict(dim=64, layers=2, d_head=16, chunk_size=16, segment_len=64, batch_size=64, steps=1500,
                   lr=1e-3, eval_every=250, eval_batches=8, mixer="lmm", cms=False, self_mod=False,
                   surprise=False, data="mqar", tokenizer="byte")
FROZEN = dict(lr_max=0.0)
MAC16 = dict(mixer="mac", chunk_size=8, segment_len=16)    # attention sees 16 tokens: not the pairs
# heads of 16 hold too few pairs from the initial state (docs/benchmarks.md, what one write
# stores): one of 64
PAIRS32, PAIRS64 = dict(mqar_pairs=32, d_head=64), dict(mqar_pairs=64, mqar_keys=64, d_head=64)


def with_frozen_twin(label, overrides):
    return [(label, overrides), (f"{label}, frozen", dict(overrides, **FROZEN))]


RECALL_VARIANTS = [
    ("Transformer (calibration)", dict(model="transformer")),
    *with_frozen_twin("Titans", {}),
    ("Titans, Titans rule (θ_max 0.02)", dict(write_rule="titans")),   # the default before the proximal rule
    ("Titans, longhorn rule", dict(write_rule="longhorn")),
    *with_frozen_twin("Titans, 32 pairs, one head of 64", PAIRS32),
    *with_frozen_twin("Titans, 64 pairs, one head of 64", PAIRS64),
    *with_frozen_twin("Self-Mod", dict(self_mod=True)),
    *with_frozen_twin("CMS (+ Titans)", dict(cms=True)),
    *with_frozen_twin("Full HOPE", dict(cms=True, self_mod=True, surprise=True)),
    *with_frozen_twin("NL's HOPE", dict(cms=True, cms_arrangement="chained", self_mod=True)),
    *with_frozen_twin("Titans MAC, segment 16", MAC16),
]
PASSKEY_DISTANCES = (256, 1024)
PASSKEY = dict(data="passkey")
PASSKEY_VARIANTS = [*with_frozen_twin("passkey: Titans", PASSKEY),
                    ("passkey: Titans MAC, window 64", dict(**PASSKEY, mixer="mac"))]
RECALL_LABELS = [label for label, _ in RECALL_VARIANTS + PASSKEY_VARIANTS]


NOT_RUN = {"error": "not run"}


def recall_runs(variants, seeds, seed, out_dir, device, extra=None, train_missing=True):
    """{label: [result per seed]} of recall variants, each on RECALL_BASE plus its overrides. With
    train_missing False, a run not finished before reads NOT_RUN instead of being trained."""
    results = {}
    for label, overrides in variants:
        for s in range(seed, seed + seeds):
            settings = {**RECALL_BASE, **overrides, **(extra or {})}
            model_cfg, cfg = configs(settings, settings["data"], "byte", None, s, out_dir, device, label=label)
            if train_missing:
                print(f"== recall · {label} · seed {s}", flush=True)
                result = run_once(model_cfg, cfg)
            else:
                result = finished_result(cfg) or NOT_RUN
            results.setdefault(label, []).append(result)
    return results


def accuracy_cell(runs):
    """mean ± std of the finished runs' accuracy (and how many seeds, where some are not run), or
    why none finished ("diverged at step N", "not run")."""
    values = [r["accuracy"] for r in runs if "error" not in r]
    ran = [r for r in runs if r is not NOT_RUN]
    mean, std = mean_std(values)
    if mean is not None:
        return fmt(mean, std) + (f" ({len(values)} of {len(runs)} seeds)" if len(ran) < len(runs) else "")
    if not ran:
        return "not run"
    steps = [m.group(1) for r in ran if (m := re.search(r"non-finite \w+ at step (\d+)", r["error"]))]
    return f"diverged at step {', '.join(steps)}" if len(steps) == len(ran) else "failed"


def brief(result):
    """A run's result without its traceback and curve, for the summary JSON files."""
    return {k: v for k, v in result.items() if k not in ("traceback", "curve")}


def recall(seeds=2, seed=1337, out_dir=None, device="auto", rows=None, cached=False):
    """MQAR accuracy of every memory with writes on and frozen; passkey accuracy against distance.
    rows: a subset of RECALL_LABELS to train (e.g. one half per process); only a run of all the
    rows writes the table. cached: train nothing, write the table of the runs finished so far."""
    out_dir = Path(out_dir or "ablation_recall")
    chosen = lambda variants: [v for v in variants if rows is None or v[0] in rows]
    collect = lambda variants, **extra: recall_runs(variants, seeds, seed, out_dir, device, extra, not cached)
    passkey = {d: collect(chosen(PASSKEY_VARIANTS), passkey_distance=d) for d in PASSKEY_DISTANCES}
    mqar = collect(chosen(RECALL_VARIANTS))
    if rows is not None:
        return f"trained {len(rows)} recall rows; run without --rows for the table", out_dir
    lines = [f"### Recall (MQAR, {RECALL_BASE['steps']} steps, mean ± std over {seeds} seeds)", "",
             "| variant | mixer | pairs | accuracy | chance | val loss (nats/answer) | params |",
             "|---|---|---|---|---|---|---|"]
    for label, overrides in RECALL_VARIANTS:
        runs, settings = mqar[label], {**RECALL_BASE, **overrides}
        good = [r for r in runs if "error" not in r]
        mixer = "attention" if settings.get("model") == "transformer" else settings["mixer"]
        pairs = settings.get("mqar_pairs", train.TrainConfig.mqar_pairs)
        val_loss = fmt(*mean_std([r["val_loss"] for r in good])) if good else ""
        params = f"{good[0]['params'] / 1e3:.0f}K" if good else ""
        chance = f"{1 / train.TrainConfig.mqar_values:.3f}" if good else ""
        lines.append(f"| {label} | {mixer} | {pairs} | {accuracy_cell(runs)} | {chance} | {val_loss} | {params} |")
    lines += ["", f"### Passkey (4 digits, {RECALL_BASE['steps']} steps; accuracy per digit against the distance "
              f"from code to question; MAC attention window {RECALL_BASE['segment_len']}; chance 0.100)", "",
              "| variant | " + " | ".join(f"distance {d}" for d in PASSKEY_DISTANCES) + " |",
              "|---|" + "---|" * len(PASSKEY_DISTANCES)]
    for label, _ in PASSKEY_VARIANTS:
        lines.append(f"| {label} | " + " | ".join(accuracy_cell(passkey[d][label]) for d in PASSKEY_DISTANCES) + " |")
    md = "\n".join(lines)
    payload = {"base": RECALL_BASE,
               "mqar": {label: {"overrides": o, "runs": [brief(r) for r in mqar[label]]} for label, o in RECALL_VARIANTS},
               "passkey": {str(d): {label: [brief(r) for r in runs] for label, runs in passkey[d].items()}
                           for d in PASSKEY_DISTANCES}}
    out_dir.mkdir(parents=True, exist_ok=True)
    train.atomic_write(out_dir / "recall.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    train.atomic_write(out_dir / "recall.md", lambda tmp: tmp.write_text(md + "\n"))
    return md, out_dir


# The init recipe, measured: each recipe trains the Transformer on MQAR and on Shakespeare (the
# `tiny` preset), and the old and the new recipe train Full HOPE on Shakespeare too. One seed.
RECIPES = [("GPT-2: N(0, 0.02) everywhere, tied head", dict(embed_std=0.02, init_std=0.02, tied_head=True)),
           ("N(0, 0.02) everywhere, untied head", dict(embed_std=0.02, init_std=0.02)),
           ("PyTorch's init, tied head", dict(tied_head=True)),
           ("PyTorch's init, embedding N(0, 0.02)", dict(embed_std=0.02)),
           ("PyTorch's embedding, linear maps N(0, 0.02)", dict(init_std=0.02)),
           ("PyTorch's init, untied head (the default)", {})]
RECIPE_TASKS = [("Transformer, MQAR accuracy", "mqar", dict(RECALL_BASE, model="transformer"), "accuracy"),
                ("Transformer, Shakespeare val loss", "shakespeare", dict(train.PRESETS["tiny"], model="transformer"),
                 "val_loss"),
                ("Full HOPE, Shakespeare val loss", "shakespeare", dict(train.PRESETS["tiny"]), "val_loss")]
FULL_HOPE_RECIPES = (RECIPES[0][0], RECIPES[-1][0])        # Full HOPE is slow: the old and the new recipe


def recipe(seed=1337, out_dir=None, device="auto"):
    """The table that chose the init recipe: recall and language under each recipe."""
    out_dir = Path(out_dir or "ablation_recipe")
    lines = ["### Init recipe: MQAR accuracy (8 pairs, chance 0.031) and Shakespeare val loss (nats/byte)", "",
             "| recipe | " + " | ".join(name for name, *_ in RECIPE_TASKS) + " |", "|---|" + "---|" * len(RECIPE_TASKS)]
    payload = {}
    for label, overrides in RECIPES:
        cells = []
        for task, data, settings, key in RECIPE_TASKS:
            if task.startswith("Full HOPE") and label not in FULL_HOPE_RECIPES:
                cells.append("—")
                continue
            print(f"== recipe · {label} · {task}", flush=True)
            model_cfg, cfg = configs({**settings, **overrides}, data, "byte", None, seed, out_dir, device,
                                     label=f"{label} {task}")
            result = run_once(model_cfg, cfg)
            payload.setdefault(label, {})[task] = brief(result)
            cells.append("failed" if "error" in result else f"{result[key]:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    train.atomic_write(out_dir / "recipe.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    train.atomic_write(out_dir / "recipe.md", lambda tmp: tmp.write_text(md + "\n"))
    return md, out_dir


def param_table():
    """Parameters of every row at tiny, Small and Scaled with the GPT-2 vocabulary (50,257)."""
    scales = {"tiny": train.PRESETS["tiny"], "Small (256d, 6L)": train.PRESETS["small"],
              "Scaled (512d, 8L)": train.PRESETS["scaled"]}
    lines = ["| Variant | " + " | ".join(scales) + " |", "|---|" + "---|" * len(scales)]
    for row in ABLATION_ROWS:
        cells = []
        for settings in scales.values():
            base = hope.HOPEConfig(**{k: v for k, v in settings.items() if k in train.MODEL_FIELDS}, vocab_size=50257)
            config = ablation_config(row, base)
            cells.append(f"{count_params(config) / 1e6:.2f}M" + (f" (dim {config.dim})" if config.dim != base.dim else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_arg_parser():
    p = train.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="cpu (tiny scale) | paper (Small + Scaled, GPU) | smoke (tests)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(ABLATION_ROWS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (mean ± std when > 1; "
                   "default 1, 2 for --recall)")
    p.add_argument("--seed", type=int, default=1337, help="first seed")
    p.add_argument("--steps", type=int, default=None, help="train every row this many steps instead of the "
                   "preset's (results in ablation_<preset>_<steps>steps/)")
    p.add_argument("--sweep", action="store_true", help="the surprise-threshold sweep (Table 2) instead")
    p.add_argument("--recall", action="store_true", help="the recall table (MQAR, passkey) instead; "
                   "--rows then takes recall labels (a subset to train, e.g. one per process)")
    p.add_argument("--recipe", action="store_true", help="the init-recipe table (recall and language) instead")
    p.add_argument("--cached", action="store_true", help="with --recall: train nothing, write the table of "
                   "the runs finished so far (a cell without one reads 'not run')")
    p.add_argument("--params", action="store_true", help="print parameter counts of every row and exit")
    p.add_argument("--out-dir", default=None, help="default: ablation_<preset>")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    try:
        if args.params:
            print(param_table())
            return
        if args.preset not in PRESETS:
            raise train.UserError(f"unknown preset '{args.preset}' ({', '.join(PRESETS)})")
        if (args.seeds is not None and args.seeds < 1) or args.seed < 0:
            raise train.UserError("--seeds must be >= 1 and --seed >= 0")
        if args.steps is not None and (args.steps < 1 or args.recall or args.recipe or args.sweep):
            raise train.UserError("--steps must be >= 1, and applies to the ablation table only")
        if args.cached and (not args.recall or args.rows):
            raise train.UserError("--cached writes the recall table: use it with --recall and without --rows")
        rows = [r.strip() for r in args.rows.split(";" if args.recall else ",")] if args.rows else None
        known = RECALL_LABELS if args.recall else list(ABLATION_ROWS)
        unknown = [r for r in rows or [] if r not in known]
        if unknown:
            raise train.UserError(f"unknown rows {unknown} (choose from: {'; '.join(known)})")
        if args.recipe:
            md, out = recipe(args.seed, args.out_dir, args.device)
        elif args.recall:
            md, out = recall(args.seeds or 2, args.seed, args.out_dir, args.device, rows, args.cached)
        elif args.sweep:
            md, out = sweep(args.preset, args.seed, args.out_dir, args.device)
        else:
            md, out = ablate(args.preset, rows, args.seeds or 1, args.seed, args.out_dir, args.device, args.steps)
    except train.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n" + md + f"\n\nwrote {out}/")


if __name__ == "__main__":
    main()
