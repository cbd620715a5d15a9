#!/usr/bin/env python3
"""Cross-check NativePeft's adapters, merged checkpoints and forward pass against transformers + PEFT, both ways.
Run by `gpu-check` on the GPU machine where torch, transformers, peft and safetensors are installed (nothing here
runs in CI; CI has no transformers).

  python3 peft_crosscheck.py NATIVEPEFT_CLI BUILTIN_MODEL_DIR WORKDIR [DEVICE]

DEVICE is the --device our training and the second evaluation use (default cuda). Every loss is the mean next-token
cross-entropy over every predicted token of every line of one pre-tokenized file (eval's definition), computed by
transformers in float32 on the CPU as the reference.

1. The base: `nativepeft eval` (cpu, fp32) equals transformers' LlamaForCausalLM on the built-in model.
2. Ours loads there: `nativepeft train --method lora` on DEVICE writes a PEFT adapter; PeftModel.from_pretrained loads
   it (no missing or unexpected keys) and gives the loss our `eval --adapter` gives (cpu fp32, and DEVICE fp32).
3. Merge: our `merge --dtype fp32` checkpoint loads in transformers with the loss of PEFT's merge_and_unload().
4. Theirs loads here: PEFT's get_peft_model (random lora_B, rsLoRA off, r 8 on q/v/gate) save_pretrained writes an
   adapter; our `eval --adapter` gives PEFT's loss.
5. QLoRA's adapter: `train --method qlora` on DEVICE; PEFT on the bf16 base gives a loss close to ours on the NF4 base
   (the same adapter, a different base precision: reported, checked only loosely).
Prints one PASS/FAIL line per check and exits 1 on any failure.
"""
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

cli, base_dir, work = sys.argv[1], sys.argv[2], sys.argv[3]
device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
os.makedirs(work, exist_ok=True)
failures = 0


def check(name, ok, detail):
    global failures
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures += 1


def run(*args):
    r = subprocess.run([cli, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nativepeft {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def ours(*args):
    return json.loads(run("eval", "--json", *args))["loss"]


# Pre-tokenized lines of the byte-level built-in model: UTF-8 bytes are the token ids (no BOS).
texts = ["upper: table\nTABLE", "upper: quiet\nQUIET", "upper: ox\nOX", "copy: river stone\nriver stone"]
lines = [list(t.encode("utf-8")) for t in texts]
data = os.path.join(work, "eval.jsonl")
with open(data, "w") as f:
    for ids in lines:
        f.write(json.dumps({"input_ids": ids}) + "\n")


@torch.no_grad()
def theirs(model):
    model.eval()
    total, count = 0.0, 0
    for ids in lines:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += loss.item()
        count += len(ids) - 1
    return total / count


def base():
    return LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)


def close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


# 1. the base model's forward
ref = base_loss = theirs(base())
mine = ours("--model", base_dir, "--data", data)
check("base forward", close(mine, ref, 1e-4), f"nativepeft {mine:.6f} vs transformers {ref:.6f}")

# 2. our adapter in PEFT
train_dir = os.path.join(work, "train-lora")
run("train", "--model", base_dir, "--data", "builtin", "--method", "lora", "--steps", "60", "--lr", "3e-3", "--batch", "16",
    "--seq", "24", "--dropout", "0", "--device", device, "--out", train_dir)
adapter = os.path.join(train_dir, "adapter")
peft_model = PeftModel.from_pretrained(base(), adapter)
ref = theirs(peft_model)
mine_cpu = ours("--model", base_dir, "--adapter", adapter, "--data", data)
mine_dev = ours("--model", base_dir, "--adapter", adapter, "--data", data, "--device", device, "--precision", "fp32")
mine_bf16 = ours("--model", base_dir, "--adapter", adapter, "--data", data, "--device", device, "--precision", "bf16")
check("PEFT loaded our adapter's weights", abs(ref - base_loss) > 1e-3, f"PEFT {ref:.6f} vs the base alone {base_loss:.6f}")
check("our adapter in PEFT (cpu fp32)", close(mine_cpu, ref, 1e-4), f"nativepeft {mine_cpu:.6f} vs PEFT {ref:.6f}")
check(f"our adapter in PEFT ({device} fp32)", close(mine_dev, ref, 1e-4), f"nativepeft {mine_dev:.6f} vs PEFT {ref:.6f}")
check(f"our adapter in PEFT ({device} bf16)", close(mine_bf16, ref, 3e-2), f"nativepeft {mine_bf16:.6f} vs PEFT fp32 {ref:.6f}")

# 3. merge
merged_dir = os.path.join(work, "merged")
run("merge", "--model", base_dir, "--adapter", adapter, "--dtype", "fp32", "--out", merged_dir)
ref = theirs(peft_model.merge_and_unload())
mine = theirs(LlamaForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32))
check("merged checkpoint in transformers", close(mine, ref, 1e-5), f"ours merged {mine:.6f} vs PEFT merge_and_unload {ref:.6f}")

# 4. their adapter here
torch.manual_seed(0)
config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"],
                    init_lora_weights=True, task_type="CAUSAL_LM")
theirs_model = get_peft_model(base(), config)
with torch.no_grad():
    for name, p in theirs_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)  # PEFT initialises B to zero: make the adapter do something
their_dir = os.path.join(work, "peft-adapter")
theirs_model.save_pretrained(their_dir)
ref = theirs(theirs_model)
mine = ours("--model", base_dir, "--adapter", their_dir, "--data", data)
check("PEFT's adapter here (cpu fp32)", close(mine, ref, 1e-4), f"nativepeft {mine:.6f} vs PEFT {ref:.6f}")

# 5. a QLoRA adapter on the bf16 base in PEFT (loose: the adapter was trained on the NF4 base)
qlora_dir = os.path.join(work, "train-qlora")
run("train", "--model", base_dir, "--data", "builtin", "--method", "qlora", "--steps", "60", "--lr", "3e-3", "--batch", "16",
    "--seq", "24", "--dropout", "0", "--device", device, "--out", qlora_dir)
ref = theirs(PeftModel.from_pretrained(base(), os.path.join(qlora_dir, "adapter")))
mine = ours("--model", base_dir, "--adapter", os.path.join(qlora_dir, "adapter"), "--data", data, "--quantize", "nf4")
check("QLoRA adapter: ours on NF4 vs PEFT on bf16", close(mine, ref, 0.25), f"nativepeft nf4 {mine:.6f} vs PEFT bf16 {ref:.6f}")

print(f"peft cross-check: {failures} failure(s)")
sys.exit(1 if failures else 0)
