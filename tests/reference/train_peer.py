#!/usr/bin/env python3
"""The peer of `nativepeft bench --model`: transformers + PEFT training steps of a random Llama of the same shape.
Run by `gpu-check` on the GPU machine (torch with CUDA, transformers and peft needed; nothing here runs in CI).

  python3 train_peer.py [--ours OURS.json] [--json PEER.json] [--model M] [--layers N] [--method lora|qlora]
                        [--batch B] [--seq T] [--rank R] [--recompute] [--steps N]
        measure; the shape and settings come from OURS.json (`nativepeft bench --model ... --json OURS.json`) when
        given, else from the options; then print ours / peer per method
  python3 train_peer.py --compare OURS.json PEER.json      only print ours / peer (no torch needed)
  python3 train_peer.py --dry-run [options]                print the shape, parameter count and FLOPs (no torch needed)

What is measured, matching ours:
- the model: LlamaForCausalLM of the published config (llama3-1b/3b = Llama 3.2, tied embeddings; llama3-8b/70b;
  tiny/small = the bench's small shapes), optionally cut to --layers, with random weights made directly on the GPU
  (torch.device('cuda') as the default device and bf16 as the default dtype while it is built: seconds for 8B),
  attn_implementation "sdpa".
- lora: the bf16 base frozen, PEFT LoRA r=R, alpha 2R, dropout 0, on q/k/v/o/gate/up/down_proj, adapters in fp32
  (PEFT's autocast_adapter_dtype), as ours. qlora: every projection replaced by a bitsandbytes Linear4bit (NF4,
  double quant, blocksize 64, bf16 compute) holding the same random weights, then the same LoRA; without bitsandbytes
  it prints "skipped: bitsandbytes not installed" and exits 0. --recompute: gradient checkpointing (ours: recompute).
- a step: forward with labels = input ids (HF's shifted loss), backward, clip_grad_norm_(1.0), torch.optim.AdamW
  (lr 2e-4, weight decay 0) step, zero_grad; the same as ours (forward + backward + clip 1.0 + AdamW update).
- timing: torch.cuda.synchronize() around each step; 2 warm-up steps (ours: one warm-up and one profiled step), then
  --steps timed steps, or at least 3 and more up to 20 within 10 s; the median step.
- memory: torch.cuda.max_memory_allocated() over the steps (reset after building the model; ours: the pool's peak),
  and the driver's view: torch.cuda.mem_get_info() free memory before the model is built less the least seen after
  each step (ours: the same with cuMemGetInfo, before the method's pool).
- FLOPs: the convention of ours (nativepeft's TrainingFlops), MFU against the same table of dense bf16 peaks.
The JSON has the keys of ours for each method row (method_id, ms_per_step, tokens_per_second, peak_bytes,
driver_peak_bytes, flops_per_step, tflops, mfu).
"""
import argparse
import json
import statistics
import sys
import time

STEP = "forward + backward + clip grad norm 1.0 + AdamW update (lr 2e-4, weight decay 0)"
FLOP_CONVENTION = ("full: 6 × linear params × tokens; LoRA/QLoRA: 4 × linear params × tokens (frozen base: forward + "
                   "input-gradient GEMMs) + 6 × LoRA params × tokens; linear = the 7 projections per layer + lm_head; plus "
                   "causal attention per layer: forward 2·2·B·T²·Hq·D/2, backward 2.5 × forward")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 peaks (TFLOP/s) by a substring of the device name, most specific first (ours: TrainingFlops.KnownPeaks).
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", None), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0)]

_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001)
_LLAMA32 = dict(_LLAMA3, tie_word_embeddings=True, max_position_embeddings=131072,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
# The shapes of `nativepeft bench --model` (ModelBench.Shape), as LlamaConfig keyword arguments.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 num_hidden_layers=4, vocab_size=2048, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False),
    "small": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  num_hidden_layers=8, vocab_size=8192, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "llama3-1b": dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama3-3b": dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False),
}


def config_kwargs(model, layers=None):
    """LlamaConfig keyword arguments of a --model name, cut to `layers` (ValueError naming the option otherwise)."""
    if model not in SHAPES:
        raise ValueError(f"--model {model}: expected one of {', '.join(SHAPES)}")
    kw = dict(SHAPES[model])
    if layers is not None:
        if not 1 <= layers <= kw["num_hidden_layers"]:
            raise ValueError(f"--layers {layers}: expected 1 to {kw['num_hidden_layers']} (the layers of {model})")
        kw["num_hidden_layers"] = layers
    return kw


def projection_shapes(kw):
    """(name, out, in) of the seven projections of one layer."""
    c, i, q, kv = kw["hidden_size"], kw["intermediate_size"], kw["num_attention_heads"] * kw["head_dim"], kw["num_key_value_heads"] * kw["head_dim"]
    return [("q_proj", q, c), ("k_proj", kv, c), ("v_proj", kv, c), ("o_proj", c, q),
            ("gate_proj", i, c), ("up_proj", i, c), ("down_proj", c, i)]


def parameter_count(kw):
    """All parameters of LlamaForCausalLM: embedding, per layer 7 projections and 2 norms, final norm, lm_head unless tied."""
    c, v, n = kw["hidden_size"], kw["vocab_size"], kw["num_hidden_layers"]
    per_layer = sum(o * i for _, o, i in projection_shapes(kw)) + 2 * c
    return v * c + n * per_layer + c + (0 if kw.get("tie_word_embeddings") else v * c)


def step_flops(kw, batch, seq, rank):
    """FLOPs of one step by ours' convention; rank None is full fine-tuning."""
    tokens = batch * seq
    n = kw["num_hidden_layers"]
    linear = n * sum(o * i for _, o, i in projection_shapes(kw)) + kw["vocab_size"] * kw["hidden_size"]
    attn_fwd = 2.0 * 2.0 * batch * seq * seq * kw["num_attention_heads"] * kw["head_dim"] / 2
    attention = 3.5 * attn_fwd * n
    if rank is None:
        return 6.0 * linear * tokens + attention
    lora = n * sum(rank * (o + i) for name, o, i in projection_shapes(kw) if name in TARGETS)
    return 4.0 * linear * tokens + 6.0 * lora * tokens + attention


def peak_tflops(device_name):
    for key, tflops in PEAKS:
        if key.lower() in (device_name or "").lower():
            return tflops
    return None


def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def mfu_text(mfu):
    return "unknown peak" if mfu is None else f"{100 * mfu:.1f} %"


def ratio(a, b):
    return a / b if a is not None and b else float("nan")


def build_model(kw, method, rank, device, recompute=False):
    """LlamaForCausalLM with random bf16 weights made on `device`, the base frozen (4-bit for qlora), PEFT LoRA on top."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if method == "qlora":
        quantize_projections(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model


def quantize_projections(model, device):
    """Every q/k/v/o/gate/up/down_proj nn.Linear → bitsandbytes Linear4bit (NF4, double quant, blocksize 64, bf16
    compute) of the same weight, quantized on `device` (the bf16 weight is freed layer by layer)."""
    import torch
    import bitsandbytes as bnb
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name not in TARGETS or not isinstance(child, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            setattr(module, name, q.to(device))
            del child


def measure(kw, method, batch, seq, rank, recompute, steps, device):
    import torch
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    model = build_model(kw, method, rank, device, recompute)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, kw["vocab_size"], (batch, seq), generator=g).to(device)
    min_free = free_before if cuda else None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    step()
    times = []
    start = time.perf_counter()
    while (len(times) < steps) if steps else (len(times) < 3 or (time.perf_counter() - start < 10 and len(times) < 20)):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        if cuda:
            min_free = min(min_free, torch.cuda.mem_get_info()[0])
    ms = statistics.median(times)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    flops = step_flops(kw, batch, seq, rank)
    tflops = flops / (ms * 1e-3) / 1e12
    peak = peak_tflops(name) if cuda else None
    row = dict(method_id=method, ms_per_step=ms, tokens_per_second=batch * seq / (ms * 1e-3), timed_steps=len(times),
               peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
               driver_peak_bytes=(free_before - min_free) if cuda else None,
               flops_per_step=flops, tflops=tflops, mfu=tflops / peak if peak else None, loss=loss,
               build_seconds=build_s, trainable_parameters=sum(p.numel() for p in params))
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return row, name


def compare(ours, peer, out=sys.stdout):
    """Prints ours / peer per method (tokens/s: above 1 ours is faster; memory: below 1 ours uses less) and a headline."""
    peer_rows = {r["method_id"]: r for r in peer.get("rows", [])}
    shape = f"{ours.get('model', '?')} x{ours.get('layers', '?')} layers {ours.get('batch', '?')}x{ours.get('seq', '?')}"
    print(f"ours ({ours.get('device', '?')}) / peer ({peer.get('implementation', '?')} on {peer.get('device', '?')}), {shape}; "
          f"step: {peer.get('step', STEP)}", file=out)
    print(f"{'method':<7} | {'tok/s ours':>10} {'tok/s peer':>10} {'ratio':>6} | {'ms ours':>8} {'ms peer':>8} | "
          f"{'peak ours':>10} {'peak peer':>10} {'ratio':>6} | {'drv ours':>10} {'drv peer':>10} | {'MFU ours':>8} {'MFU peer':>8}", file=out)
    parts = []
    for r in ours.get("rows", []):
        m = r.get("method_id")
        p = peer_rows.get(m)
        if p is None or p.get("skipped"):
            print(f"{m:<7} | no peer figure{': ' + p['skipped'] if p else ''}", file=out)
            continue
        rt, rp = ratio(r["tokens_per_second"], p["tokens_per_second"]), ratio(r["peak_bytes"], p["peak_bytes"])

        print(f"{m:<7} | {r['tokens_per_second']:>10.0f} {p['tokens_per_second']:>10.0f} {rt:>6.3f} | {r['ms_per_step']:>8.1f} "
              f"{p['ms_per_step']:>8.1f} | {gib(r['peak_bytes']):>10} {gib(p['peak_bytes']):>10} {rp:>6.3f} | "
              f"{gib(r.get('driver_peak_bytes')):>10} {gib(p.get('driver_peak_bytes')):>10} | {mfu_text(r.get('mfu')):>8} {mfu_text(p.get('mfu')):>8}",
              file=out)
        parts.append(f"{m} tokens/s ours/peer {rt:.2f} ({r['tokens_per_second']:.0f} vs {p['tokens_per_second']:.0f}), "
                     f"peak {rp:.2f} ({gib(r['peak_bytes'])} vs {gib(p['peak_bytes'])})")
    for m, p in peer_rows.items():
        if p.get("skipped"):
            parts.append(f"{m}: peer {p['skipped']}")
    headline = f"{shape}: " + ("; ".join(parts) if parts else "no method in common")
    print(f"headline: {headline}", file=out)
    return headline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", help="nativepeft bench --model ... --json FILE: take its shape and settings, then print ours / peer")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write the peer's figures here (the row keys of ours)")
    ap.add_argument("--compare", nargs=2, metavar=("OURS", "PEER"), help="only print ours / peer from two JSON files")
    ap.add_argument("--dry-run", action="store_true", help="print the shape, parameter count and FLOPs per step, and exit")
    ap.add_argument("--model", choices=list(SHAPES), help="the shape (default llama3-8b, or that of --ours)")
    ap.add_argument("--layers", type=int, help="keep only the first N layers")
    ap.add_argument("--method", choices=["lora", "qlora"], help="one method (default: lora and qlora, or those of --ours)")
    ap.add_argument("--batch", type=int, help="batch size (default 4)")
    ap.add_argument("--seq", type=int, help="sequence length (default 1024)")
    ap.add_argument("--rank", type=int, help="LoRA rank (default 16; alpha 2 x rank)")
    ap.add_argument("--recompute", action="store_true", help="gradient checkpointing (ours: --recompute)")
    ap.add_argument("--steps", type=int, help="timed steps (default: at least 3, up to 20 within 10 s)")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)

    if a.compare:
        with open(a.compare[0]) as f:
            ours = json.load(f)
        with open(a.compare[1]) as f:
            peer = json.load(f)
        compare(ours, peer)
        return 0

    ours = None
    if a.ours:
        with open(a.ours) as f:
            ours = json.load(f)
    model = a.model or (ours or {}).get("model") or "llama3-8b"
    layers = a.layers if a.layers is not None else (ours or {}).get("layers")
    batch = a.batch or (ours or {}).get("batch") or 4
    seq = a.seq or (ours or {}).get("seq") or 1024
    rank = a.rank or (ours or {}).get("rank") or 16
    recompute = a.recompute or bool((ours or {}).get("recompute"))
    if a.method:
        methods = [a.method]
    elif ours is not None:
        methods = [r["method_id"] for r in ours.get("rows", []) if r.get("method_id") in ("lora", "qlora")] or ["lora"]
    else:
        methods = ["lora", "qlora"]
    for name, value in (("--batch", batch), ("--seq", seq), ("--rank", rank), ("--steps", a.steps or 1)):
        if value < 1:
            ap.error(f"{name} {value}: expected a positive integer")
    try:
        kw = config_kwargs(model, layers)
    except ValueError as e:
        ap.error(str(e))
    print(f"peer: transformers + PEFT, {model} ({kw['num_hidden_layers']} layers, {parameter_count(kw):,} parameters), "
          f"batch {batch} x {seq}, LoRA r={rank} alpha {2 * rank} on {len(TARGETS)} projections, bf16, sdpa, "
          f"{'recompute, ' if recompute else ''}methods {', '.join(methods)}")
    print(f"step: {STEP}")
    print(f"FLOP convention: {FLOP_CONVENTION}")
    if a.dry_run:
        for m in methods:
            print(f"{m}: {step_flops(kw, batch, seq, rank):.0f} FLOP per step")
        return 0

    import torch
    rows, device_name = [], a.device
    for m in methods:
        if m == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print("skipped: bitsandbytes not installed")
                rows.append(dict(method_id=m, skipped="bitsandbytes not installed"))
                continue
        try:
            row, device_name = measure(kw, m, batch, seq, rank, recompute, a.steps, a.device)
        except torch.cuda.OutOfMemoryError as e:
            print(f"{m}: not run, out of device memory ({str(e).splitlines()[0]})", flush=True)
            rows.append(dict(method_id=m, skipped="out of device memory"))
            import gc
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print(f"{m}: {row['tokens_per_second']:.0f} tokens/s, {row['ms_per_step']:.1f} ms/step (median of {row['timed_steps']}), "
              f"peak {gib(row['peak_bytes'])} allocated (torch), driver {gib(row['driver_peak_bytes'])}, "
              f"{row['tflops']:.1f} TFLOP/s, MFU {mfu_text(row['mfu'])}, "
              f"loss {row['loss']:.4f}, model built in {row['build_seconds']:.1f} s", flush=True)
    import transformers
    import peft
    peer = dict(implementation=f"transformers {transformers.__version__} + peft {peft.__version__} + torch {torch.__version__}",
                device=device_name, device_total_bytes=torch.cuda.mem_get_info()[1] if a.device.startswith("cuda") else None, model=model, layers=kw["num_hidden_layers"], parameters=parameter_count(kw), batch=batch,
                seq=seq, rank=rank, alpha=2 * rank, targets=TARGETS, recompute=recompute, compute_dtype="bf16",
                step=STEP, flop_convention=FLOP_CONVENTION, peak_tflops=peak_tflops(device_name), rows=rows)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(peer, f, indent=2)
            f.write("\n")
    if ours is not None:
        compare(ours, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
