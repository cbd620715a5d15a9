#!/usr/bin/env python3
"""The peer of `nativepeft bench --op attention`: PyTorch's scaled_dot_product_attention on the same shapes, bf16, CUDA.
Run by `gpu-check` on the GPU machine (torch with CUDA needed; nothing here runs in CI).

  python3 attn_peer.py [--ours OURS.json] [--out PEER.json]     measure SDPA; shapes from OURS.json when given
                                                                 (else the CUDA defaults); then print ours / SDPA
  python3 attn_peer.py --compare OURS.json PEER.json             only print ours / SDPA (no torch needed)

What is measured, matching ours:
- prefill: causal grouped-query attention, q [B, Hq, T, D] and k, v [B, Hkv, T, D] contiguous bf16 (SDPA's own layout),
  values uniform in [-1, 1]. F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) on torch's
  default backend choice; where enable_gqa is not accepted (torch < 2.5) k and v are expanded to Hq heads with
  repeat_interleave (HF repeat_kv order) inside the timed call, and the JSON's notes say so.
  Forward: one call with q, k, v requiring grad (the training forward, which keeps the log-sum-exp, as ours writes lse).
  Backward: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on one saved forward: the backward only.
- decode: one query row [B, Hq, 1, D] against a KV cache [B, Hkv, T, D], under no_grad, is_causal=False: torch's
  is_causal aligns the mask to the top-left corner, so a single query with is_causal=True would see key 0 only; the
  newest token of a cache attends to every key. The caches rotate over >= 256 MiB so reads come from device memory.
- copy: dst.copy_(src) of 64M bf16 elements, read + write bytes counted.
- timing: CUDA events around a loop of calls (about 5 ms of work, 1..100 calls) after 2 warm-up calls; the median over
  >= 5 loops (more within about 0.5 s, at most 50).
- FLOPs (FlashAttention's convention): forward = 4*B*Hq*T^2*D / 2 (causal), backward = 2.5 * forward; decode GB/s =
  K+V bytes (B*T*Hkv*D*2 bytes * 2) / time.
The JSON has the keys of `nativepeft bench --op attention --json FILE`.
"""
import argparse
import json
import math
import statistics
import sys

FLOP_CONVENTION = ("FLOP convention (FlashAttention): forward = 4·B·Hq·T²·D / 2 (causal halves it), backward = 2.5 × forward; "
                   "decode GB/s = K+V bytes read (B·T·Hkv·D·2 bytes × 2) / time")
DEFAULT_PREFILL = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (4, 4096)]
DEFAULT_DECODE = [(1, 4096), (8, 4096)]
HQ, HKV, D = 32, 8, 128


def shape_key(row, seq_key):
    return (row["batch"], row[seq_key], row["heads_q"], row["heads_kv"], row["head_dim"])


def forward_flops(b, t, hq, d):
    return 4.0 * b * hq * t * t * d / 2


def num(x, width=9):
    """A rate for the table: one decimal from 10 up, 4 significant digits below (emulator-size figures stay readable)."""
    return f"{x:>{width}.1f}" if x >= 10 else f"{x:>{width}.4g}"


def ratio(a, b):
    return a / b if b and b > 0 and a is not None else float("nan")


def compare(ours, peer, out=sys.stdout):
    """Prints ours / SDPA per shape (a rate ratio: above 1 ours is faster) and one headline line."""
    peer_prefill = {shape_key(r, "seq"): r for r in peer.get("prefill", [])}
    peer_decode = {shape_key(r, "kv_len"): r for r in peer.get("decode", [])}
    print(f"ours ({ours.get('device', '?')}) / SDPA ({peer.get('implementation', '?')} on {peer.get('device', '?')}): "
          "rate ratios, above 1 ours is faster", file=out)
    print(f"{'B':>3} {'T':>6} {'Hq/Hkv/D':>10} | {'fwd ours':>9} {'fwd SDPA':>9} {'ratio':>7} | "
          f"{'bwd ours':>9} {'bwd SDPA':>9} {'ratio':>7}   (TFLOP/s)", file=out)
    headline = None
    for r in ours.get("prefill", []):
        p = peer_prefill.get(shape_key(r, "seq"))
        if p is None:
            print(f"{r['batch']:>3} {r['seq']:>6} {r['heads_q']}/{r['heads_kv']}/{r['head_dim']:>3} | no SDPA figure for this shape", file=out)
            continue
        rf, rb = ratio(r["fwd_tflops"], p["fwd_tflops"]), ratio(r["bwd_tflops"], p["bwd_tflops"])
        hd = f"{r['heads_q']}/{r['heads_kv']}/{r['head_dim']}"
        print(f"{r['batch']:>3} {r['seq']:>6} {hd:>10} | {num(r['fwd_tflops'])} {num(p['fwd_tflops'])} {rf:>7.3f} | "
              f"{num(r['bwd_tflops'])} {num(p['bwd_tflops'])} {rb:>7.3f}", file=out)
        text = (f"B={r['batch']} T={r['seq']}: fwd ours/SDPA {rf:.3f} ({num(r['fwd_tflops'], 0)} vs {num(p['fwd_tflops'], 0)} TFLOP/s), "
                f"bwd {rb:.3f} ({num(r['bwd_tflops'], 0)} vs {num(p['bwd_tflops'], 0)})")
        if headline is None or (r["batch"], r["seq"]) == (1, 4096):
            headline = text
    if ours.get("decode"):
        print(f"{'B':>3} {'KV T':>6} {'Hq/Hkv/D':>10} | {'ours GB/s':>9} {'SDPA GB/s':>9} {'ratio':>7} | "
              f"{'ours/copy':>9} {'SDPA/copy':>9}   (decode)", file=out)
    for r in ours.get("decode", []):
        p = peer_decode.get(shape_key(r, "kv_len"))
        hd = f"{r['heads_q']}/{r['heads_kv']}/{r['head_dim']}"
        if p is None:
            print(f"{r['batch']:>3} {r['kv_len']:>6} {hd:>10} | no SDPA figure for this shape", file=out)
            continue
        print(f"{r['batch']:>3} {r['kv_len']:>6} {hd:>10} | {num(r['gbps'])} {num(p['gbps'])} {ratio(r['gbps'], p['gbps']):>7.3f} | "
              f"{r['of_copy']:>9.2%} {p['of_copy']:>9.2%}", file=out)
    print(f"headline: {headline or 'no shape in common'}", file=out)
    return headline


def measure(args):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"attn_peer.py: torch not installed ({e})")

    if not torch.cuda.is_available():
        sys.exit("attn_peer.py: torch sees no CUDA device")
    dev = torch.device(args.device)
    dt = torch.bfloat16
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        prefill_shapes = [shape_key(r, "seq") for r in ours["prefill"]]
        decode_shapes = [shape_key(r, "kv_len") for r in ours["decode"]]
    else:
        ours = None
        prefill_shapes = [(b, t, HQ, HKV, D) for b, t in DEFAULT_PREFILL]
        decode_shapes = [(b, t, HQ, HKV, D) for b, t in DEFAULT_DECODE]

    def uniform(*shape, grad=False):
        return (torch.rand(*shape, device=dev, dtype=torch.float32) * 2 - 1).to(dt).requires_grad_(grad)

    # GQA: native enable_gqa (torch >= 2.5) when it is accepted, else K/V expanded to Hq heads.
    try:
        probe_q, probe_kv = uniform(1, 4, 8, 64), uniform(1, 2, 8, 64)
        F.scaled_dot_product_attention(probe_q, probe_kv, probe_kv, is_causal=True, enable_gqa=True)
        native_gqa = True
    except (TypeError, RuntimeError):
        native_gqa = False

    def sdpa(q, k, v, causal):
        if native_gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=causal)

    def time_ms(fn, min_loops=5, budget_s=0.5):
        fn(); torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        inner = min(max(math.ceil(5.0 / once), 1), 100)
        samples, spent = [], 0.0
        while len(samples) < min_loops or (spent < budget_s * 1e3 and len(samples) < 50):
            start.record()
            for _ in range(inner):
                fn()
            end.record(); end.synchronize()
            ms = start.elapsed_time(end)
            spent += ms
            samples.append(ms / inner)
        return statistics.median(samples)

    n = 64 << 20
    src, dst = torch.empty(n, device=dev, dtype=dt).uniform_(-1, 1), torch.empty(n, device=dev, dtype=dt)
    copy_ms = time_ms(lambda: dst.copy_(src))
    copy_gbps = 2.0 * n * 2 / (copy_ms * 1e-3) / 1e9
    del src, dst

    prefill = []
    for b, t, hq, hkv, d in prefill_shapes:
        q, k, v = uniform(b, hq, t, d, grad=True), uniform(b, hkv, t, d, grad=True), uniform(b, hkv, t, d, grad=True)
        dout = uniform(b, hq, t, d)
        fwd = time_ms(lambda: sdpa(q, k, v, True))
        out = sdpa(q, k, v, True)
        bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        ff = forward_flops(b, t, hq, d)
        prefill.append(dict(batch=b, seq=t, heads_q=hq, heads_kv=hkv, head_dim=d, fwd_ms=fwd, bwd_ms=bwd,
                            fwd_flops=ff, bwd_flops=2.5 * ff, fwd_tflops=ff / (fwd * 1e-3) / 1e12,
                            bwd_tflops=2.5 * ff / (bwd * 1e-3) / 1e12))
        print(f"prefill B={b} T={t} Hq={hq} Hkv={hkv} D={d}: fwd {fwd:.3f} ms {prefill[-1]['fwd_tflops']:.1f} TFLOP/s, "
              f"bwd {bwd:.3f} ms {prefill[-1]['bwd_tflops']:.1f} TFLOP/s", flush=True)
        del q, k, v, dout, out
        torch.cuda.empty_cache()

    decode = []
    with torch.no_grad():
        for b, t, hq, hkv, d in decode_shapes:
            kv_bytes = 2.0 * b * t * hkv * d * 2
            copies = min(max(int((256 << 20) // kv_bytes) + 1, 1), 64)
            q = uniform(b, hq, 1, d)
            caches = [(uniform(b, hkv, t, d), uniform(b, hkv, t, d)) for _ in range(copies)]
            state = {"i": 0}

            def step():
                k, v = caches[state["i"]]
                state["i"] = (state["i"] + 1) % copies
                return sdpa(q, k, v, False)

            ms = time_ms(step)
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            decode.append(dict(batch=b, kv_len=t, heads_q=hq, heads_kv=hkv, head_dim=d, ms=ms, kv_bytes=kv_bytes,
                               gbps=gbps, copy_gbps=copy_gbps, of_copy=gbps / copy_gbps))
            print(f"decode B={b} KV T={t}: {ms:.4f} ms {gbps:.1f} GB/s ({gbps / copy_gbps:.0%} of copy {copy_gbps:.0f} GB/s)", flush=True)
            del q, caches
            torch.cuda.empty_cache()

    gqa = "enable_gqa=True" if native_gqa else "K/V expanded to Hq heads (repeat_interleave; enable_gqa not accepted)"
    report = dict(
        implementation=f"torch {torch.__version__} scaled_dot_product_attention ({gqa})",
        device=torch.cuda.get_device_name(dev), device_kind="cuda", dtype="bf16", causal=True,
        timing="CUDA events around a loop of calls (about 5 ms of work) after 2 warm-up calls; median over >= 5 loops "
               "(about 0.5 s per figure)",
        flop_convention=FLOP_CONVENTION, copy_gbps=copy_gbps, prefill=prefill, decode=decode,
        notes=[f"GQA: {gqa}",
               "layout [B, H, T, D] contiguous; torch's default SDPA backend choice",
               "forward with q, k, v requiring grad (the training forward); backward = autograd.grad on a saved forward",
               "decode: is_causal=False (one query row at the end of the cache attends to every key), under no_grad"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        print(f"figures written to {args.out}")
    if ours is not None:
        compare(ours, report)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", help="nativepeft bench --op attention --json FILE: take its shapes and print ours / SDPA")
    ap.add_argument("--out", help="write SDPA's figures here (the keys of ours)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compare", nargs=2, metavar=("OURS", "PEER"), help="only print ours / SDPA from two JSON files")
    args = ap.parse_args()
    if args.compare:
        with open(args.compare[0]) as f:
            ours = json.load(f)
        with open(args.compare[1]) as f:
            peer = json.load(f)
        compare(ours, peer)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
