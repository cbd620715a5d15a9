#!/usr/bin/env python3
"""Cross-check NativePeft's 4-bit files against bitsandbytes, both ways. Run by `gpu-check` on a GPU machine
where torch, safetensors and bitsandbytes are installed (nothing here runs in CI).

  python3 bnb_crosscheck.py NATIVEPEFT_CLI WORKDIR

1. torch writes a bf16 checkpoint of random normal weights (and odd shapes) with safetensors.
2. bitsandbytes quantizes each weight (nf4 and fp4, blocksize 64, with and without compress_statistics) and the
   packed weight plus QuantState.as_dict(packed=True) go into theirs-*.safetensors, as transformers saves them.
3. `nativepeft quantize --device cuda` writes ours-*.safetensors from the same checkpoint.
4. Same bytes: packed weights, absmax (or qabsmax, nested_absmax), quant maps, quant_state JSON.
5. Ours loads there: QuantState.from_dict on our tensors, bnb dequantize_4bit equals bnb's dequantization of theirs.
6. Theirs loads here: `nativepeft dequantize` of their file equals bnb's dequantize_4bit, bit for bit.
Prints one PASS/FAIL line per check and exits 1 on any failure.
"""
import json
import os
import subprocess
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file

cli, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
torch.manual_seed(0)
shapes = {"a.q_proj": (512, 512), "a.down_proj": (384, 1376), "a.odd_proj": (33, 65)}
weights = {f"{k}.weight": (torch.randn(*s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
weights["a.norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
src = os.path.join(work, "input.safetensors")
save_file({k: v.contiguous() for k, v in weights.items()}, src, metadata={"format": "pt"})

failures = 0


def check(name, ok, detail=""):
    global failures
    print(("PASS " if ok else "FAIL ") + name + ("" if ok else f": {detail}"), flush=True)
    failures += 0 if ok else 1


def run(*args):
    r = subprocess.run([cli, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nativepeft {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


for quant_type in ("nf4", "fp4"):
    for dq in (False, True):
        tag = f"{quant_type}{'-dq' if dq else ''}"
        theirs, ours = {}, os.path.join(work, f"ours-{tag}.safetensors")
        deq_theirs = {}
        for k in shapes:
            w = weights[f"{k}.weight"].cuda()
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=quant_type)
            theirs[f"{k}.weight"] = packed.cpu()
            for key, t in state.as_dict(packed=True).items():
                theirs[f"{k}.weight.{key}"] = t.cpu()
            deq_theirs[k] = F.dequantize_4bit(packed, state).float().cpu()
        theirs["a.norm.weight"] = weights["a.norm.weight"]
        theirs_path = os.path.join(work, f"theirs-{tag}.safetensors")
        save_file({k: v.contiguous() for k, v in theirs.items()}, theirs_path, metadata={"format": "pt"})

        args = ["quantize", "--in", src, "--out", ours, "--quant-type", quant_type, "--blocksize", "64", "--device", "cuda"]
        run(*(args + (["--double-quant"] if dq else [])))
        mine = load_file(ours)
        for key, t in theirs.items():
            if key not in mine:
                check(f"{tag} {key} present in ours", False, "missing")
                continue
            m = mine[key]
            if key.endswith(tuple(f"quant_state.bitsandbytes__{q}" for q in ("nf4", "fp4"))):
                a, b = json.loads(bytes(t.tolist())), json.loads(bytes(m.tolist()))
                check(f"{tag} {key} JSON", a == b, f"theirs {a} ours {b}")
                check(f"{tag} {key} bytes", bytes(t.tolist()) == bytes(m.tolist()), "same values, different text")
            else:
                same = t.dtype == m.dtype and t.shape == m.shape and torch.equal(t.view(torch.uint8), m.view(torch.uint8))
                diff = "" if same else f"{t.dtype}{tuple(t.shape)} vs {m.dtype}{tuple(m.shape)}, " \
                    f"{(t.view(torch.uint8) != m.view(torch.uint8)).sum().item() if t.shape == m.shape and t.dtype == m.dtype else 'n/a'} bytes differ"
                check(f"{tag} {key} identical", same, diff)
        # ours loads there
        for k in shapes:
            qs = {key[len(f"{k}.weight."):]: v.cuda() for key, v in mine.items() if key.startswith(f"{k}.weight.")}
            state = F.QuantState.from_dict(qs, device=torch.device("cuda"))
            out = F.dequantize_4bit(mine[f"{k}.weight"].cuda(), state).float().cpu()
            check(f"{tag} {k} ours dequantized by bitsandbytes", torch.equal(out, deq_theirs[k]),
                  f"max |diff| {(out - deq_theirs[k]).abs().max().item()}")
        # theirs loads here
        back = os.path.join(work, f"theirs-{tag}-dequantized.safetensors")
        run("dequantize", "--in", theirs_path, "--out", back, "--dtype", "bf16", "--device", "cuda")
        restored = load_file(back)
        for k in shapes:
            ref = deq_theirs[k].to(torch.bfloat16)
            got = restored[f"{k}.weight"]
            check(f"{tag} {k} theirs dequantized by nativepeft", torch.equal(got, ref),
                  f"max |diff| {(got.float() - ref.float()).abs().max().item()}")

print(f"bnb cross-check: {failures} failure(s)")
sys.exit(1 if failures else 0)
