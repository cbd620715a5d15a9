#!/usr/bin/env python3
"""The whole-model oracle: transformers + PEFT write what TransformersOracleTests compares our model with, no Python in CI.
Run by `gpu-check` (section `oracle`) on the GPU machine, where torch, transformers, peft and safetensors are installed;
then copy OUT_DIR into tests/NativePeft.Tests/Data/oracle/ and commit it (docs/gpu-validation.md, "The next run").

  python3 gen_model_oracle.py OUT_DIR [--device cuda|cpu] [--builtin DIR]

--device: where transformers computes (default cuda when available, else cpu); float32 throughout, TF32 off, eager
attention. --builtin: NativePeft's built-in model folder (default ./builtin-model next to this script, as in the
bundle, else src/NativePeft.Cli/builtin-model of the repository). Deterministic: every random number comes from a seeded
torch generator on the CPU.

OUT_DIR receives (about 450 KB):
- tiny-gqa/: a random LlamaForCausalLM (hidden 64, MLP 160, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 320,
  rope_theta 500000 with Llama-3 rope scaling whose three bands all hold a frequency, rms_norm_eps 1e-5, untied),
  every parameter drawn from a seeded normal (norms 1 + N(0, 0.1²), the rest N(0, 0.2²)), saved in bf16 by
  save_pretrained as exactly two safetensors shards with their index.
- tiny-gqa-logits.safetensors ("logits", F32 [2, 16, 320]) and oracle.json's tiny_gqa.loss: the folder loaded back in
  float32 (the bf16 weights upcast, exact) on the batch tiny_gqa.ids, loss = the model's own loss with labels = ids
  (transformers shifts inside: the mean over 2 x 15 predicted tokens).
- builtin-logits.safetensors and builtin.loss: the same for NativePeft's built-in model on the batch builtin.ids.
- tiny-gqa-adapter/: PEFT's save_pretrained of get_peft_model(tiny-gqa in float32, LoraConfig(r 4, lora_alpha 8, the
  seven projections, dropout 0, init_lora_weights False)) with lora_A and lora_B redrawn from a seeded N(0, 0.1²) (so
  that B is not zero whatever PEFT's init does); tiny-gqa-adapter-logits.safetensors and adapter.loss on tiny_gqa.ids.
- tiny-gqa-merged-rows.safetensors: after merge_and_unload(), rows 0 and last of every merged projection weight (F32,
  "<weight name>.row0" and ".row_last"); oracle.json's merged.weights: per weight its shape, float64 sum and sum of squares.
- oracle.json: the versions of python/torch/transformers/peft/safetensors, the device, the settings above, every number,
  and the size of every file written.
"""
import argparse
import json
import os
import platform
import shutil
import sys

# Everything is local: no hub look-ups (PEFT's save_pretrained asks the hub about a base path it cannot find locally).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
import peft
import safetensors
from safetensors.torch import save_file, load_file
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
            # wavelengths 2*pi/inv_freq = 6.3, 32, 167, ...: below 64/4 kept, between 16 and 64 blended, above 64 divided by 8
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu", attention_bias=False,
            mlp_bias=False)
BATCH, SEQ = 2, 16
R, ALPHA = 4, 8
SEED_WEIGHTS, SEED_IDS, SEED_LORA, SEED_BUILTIN_IDS = 1234, 5678, 4321, 8765


def tiny_config_kwargs():
    """TINY as LlamaConfig keywords: transformers >= 5 takes rope_parameters (rope_type, rope_theta and the scaling fields
    in one dict), older ones rope_theta and rope_scaling."""
    kw = dict(TINY)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = dict(kw.pop("rope_scaling"), rope_theta=kw.pop("rope_theta"))
    return kw


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    default_builtin = os.path.join(here, "builtin-model")
    if not os.path.isdir(default_builtin):
        default_builtin = os.path.join(here, "..", "..", "src", "NativePeft.Cli", "builtin-model")
    p.add_argument("--builtin", default=os.path.normpath(default_builtin))
    return p.parse_args()


def load_f32(path, device):
    """from_pretrained in float32 with eager attention: transformers >= 5 takes dtype= (its default is "auto", which would
    keep bf16), older ones torch_dtype= (an unknown dtype= would be ignored there), so the version picks the keyword and
    the parameters' dtype is checked."""
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", **kw)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise SystemExit(f"{path}: loaded with parameter dtypes {dtypes}, expected float32 only")
    return model.to(device).eval()


@torch.no_grad()
def forward(model, ids, device):
    """(logits float32 [B, T, V] on the CPU, the model's loss with labels = ids, the same loss recomputed here)."""
    x = ids.to(device)
    out = model(input_ids=x, labels=x)
    logits = out.logits.float().cpu()
    mine = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    loss = float(out.loss)
    if abs(loss - float(mine)) > 1e-5 * max(1.0, abs(loss)):
        raise SystemExit(f"the model's loss {loss} disagrees with the shifted mean cross-entropy of its logits {float(mine)}")
    return logits.clone(), loss, float(mine)


def save_logits(path, logits):
    save_file({"logits": logits}, path, metadata={"format": "pt"})


def main():
    args = parse()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if not os.path.isfile(os.path.join(args.builtin, "config.json")):
        raise SystemExit(f"--builtin {args.builtin}: no config.json there (pass the built-in model's folder)")
    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    oracle = {
        "format": 1,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "safetensors": safetensors.__version__},
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "compute": "float32 (bf16 weights upcast), TF32 off, attn_implementation eager",
    }

    # 1. tiny-gqa: random weights, saved in bf16 as two shards
    torch.manual_seed(SEED_WEIGHTS)
    config = LlamaConfig(**tiny_config_kwargs())
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(SEED_WEIGHTS)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    model = model.to(torch.bfloat16)
    total = sum(p.numel() * 2 for p in model.parameters())
    tiny_dir = os.path.join(out, "tiny-gqa")
    # Greedy sharding at 60 % of the total: the first shard ends within one tensor (the largest is 16 % of the total)
    # of 60 %, so the rest (< 56 %) fits one more shard: exactly two.
    shard = int(total * 0.6)
    try:
        model.save_pretrained(tiny_dir, max_shard_size=shard, safe_serialization=True)
    except TypeError:  # a transformers without the safe_serialization keyword writes safetensors anyway
        model.save_pretrained(tiny_dir, max_shard_size=shard)
    with open(os.path.join(tiny_dir, "config.json")) as f:
        rope_saved = '"llama3"' in f.read()
    if not rope_saved:
        print("WARNING: config.json has no llama3 rope scaling: the oracle checks plain RoPE only", flush=True)
    shards = sorted(f for f in os.listdir(tiny_dir) if f.endswith(".safetensors"))
    expected = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    if shards != expected or not os.path.isfile(os.path.join(tiny_dir, "model.safetensors.index.json")):
        raise SystemExit(f"{tiny_dir}: expected {expected} and model.safetensors.index.json, got {sorted(os.listdir(tiny_dir))}")
    for f in shards:
        for k, t in load_file(os.path.join(tiny_dir, f)).items():
            if t.dtype != torch.bfloat16:
                raise SystemExit(f"{f}: {k} is {t.dtype}, expected bfloat16")
    del model

    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED_IDS))
    base = load_f32(tiny_dir, device)
    logits, loss, mine = forward(base, ids, device)
    save_logits(os.path.join(out, "tiny-gqa-logits.safetensors"), logits)
    oracle["tiny_gqa"] = {"dir": "tiny-gqa", "shards": shards, "parameters": total // 2, "llama3_rope_scaling_saved": rope_saved, "ids": ids.tolist(),
                          "logits": "tiny-gqa-logits.safetensors", "loss": loss, "loss_from_logits": mine,
                          "weights": "every parameter N(0, 0.2^2), norms 1 + N(0, 0.1^2), then rounded to bf16",
                          "seeds": {"weights": SEED_WEIGHTS, "ids": SEED_IDS}}
    print(f"tiny-gqa: {total // 2} parameters in {len(shards)} bf16 shards, loss {loss:.6f}", flush=True)

    # 2. the built-in model
    builtin = load_f32(args.builtin, device)
    bids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED_BUILTIN_IDS))
    blogits, bloss, bmine = forward(builtin, bids, device)
    save_logits(os.path.join(out, "builtin-logits.safetensors"), blogits)
    oracle["builtin"] = {"ids": bids.tolist(), "logits": "builtin-logits.safetensors", "loss": bloss,
                         "loss_from_logits": bmine, "seeds": {"ids": SEED_BUILTIN_IDS}}
    print(f"built-in model: loss {bloss:.6f}", flush=True)
    del builtin

    # 3. a PEFT adapter on tiny-gqa (float32), A and B both random
    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(base, lcfg)
    gl = torch.Generator().manual_seed(SEED_LORA)
    n_lora = 0
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gl, dtype=torch.float32))
                n_lora += 1
    if n_lora != 2 * len(TARGETS) * TINY["num_hidden_layers"]:
        raise SystemExit(f"PEFT made {n_lora} LoRA matrices, expected {2 * len(TARGETS) * TINY['num_hidden_layers']}")
    adapter_dir = os.path.join(out, "tiny-gqa-adapter")
    pm.save_pretrained(adapter_dir)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise SystemExit(f"{adapter_dir}: PEFT wrote {sorted(os.listdir(adapter_dir))}, no adapter_model.safetensors")
    pm.eval()
    alogits, aloss, amine = forward(pm, ids, device)
    if abs(aloss - loss) < 1e-3:
        raise SystemExit(f"the adapter changed the loss only from {loss} to {aloss}: were its weights set?")
    save_logits(os.path.join(out, "tiny-gqa-adapter-logits.safetensors"), alogits)
    oracle["adapter"] = {"dir": "tiny-gqa-adapter", "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS,
                         "init": "lora_A and lora_B N(0, 0.1^2)", "seeds": {"lora": SEED_LORA},
                         "logits": "tiny-gqa-adapter-logits.safetensors", "loss": aloss, "loss_from_logits": amine}
    print(f"adapter: loss {aloss:.6f} (base {loss:.6f})", flush=True)

    # 4. merge_and_unload: every merged projection's checksums and first and last rows
    merged = pm.merge_and_unload()
    state = {k: v.detach().float().cpu() for k, v in merged.state_dict().items()}
    weights, rows = {}, {}
    for layer in range(TINY["num_hidden_layers"]):
        for t in TARGETS:
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{sub}.{t}.weight"
            w = state[name]
            d = w.double()
            weights[name] = {"shape": list(w.shape), "sum": float(d.sum()), "sum_sq": float((d * d).sum())}
            # clones: safetensors refuses tensors that share storage (two rows of one weight would)
            rows[name + ".row0"] = w[0].clone()
            rows[name + ".row_last"] = w[-1].clone()
    merged_logits, merged_loss, _ = forward(merged, ids, device)
    save_file(rows, os.path.join(out, "tiny-gqa-merged-rows.safetensors"), metadata={"format": "pt"})
    oracle["merged"] = {"rows": "tiny-gqa-merged-rows.safetensors", "weights": weights, "loss": merged_loss,
                        "dtype": "float32 (PEFT's merge on the float32 model: W + (B @ A) * lora_alpha / r)"}
    print(f"merge_and_unload: {len(weights)} weights, loss {merged_loss:.6f} (adapter {aloss:.6f})", flush=True)

    files = {}
    for root, _, names in os.walk(out):
        for f in names:
            path = os.path.join(root, f)
            files[os.path.relpath(path, out).replace(os.sep, "/")] = os.path.getsize(path)
    oracle["files"] = dict(sorted(files.items()))
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1)
        f.write("\n")
    size = sum(files.values()) + os.path.getsize(os.path.join(out, "oracle.json"))
    print(f"headline: oracle written: {len(files) + 1} files, {size // 1024} KB; losses tiny-gqa {loss:.6f}, "
          f"built-in {bloss:.6f}, adapter {aloss:.6f}, merged {merged_loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
