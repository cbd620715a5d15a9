#!/usr/bin/env python3
"""Writes the small byte-level BPE tokenizer.json the tokenizer tests load. Its layout is Llama 3's
(tokenizer.json of meta-llama/Meta-Llama-3-8B): model.type BPE with byte-level symbols, a Sequence pre-tokenizer of
a Split on Llama 3's regex and a ByteLevel step (use_regex false), a ByteLevel decoder, added special tokens. The
vocabulary is GPT-2's 256 byte symbols (ids 0..255 in bytes_to_unicode order) plus a handful of merges, so the
expected encodings in the C# tests can be worked out by hand. Standard library only:
    python3 tests/reference/gen_tokenizer_bpe.py
Writes tests/NativePeft.Tests/Data/tokenizers/bpe/{tokenizer.json, tokenizer_config.json}.
"""
import json, os

OUT = os.path.join(os.path.dirname(__file__), "..", "NativePeft.Tests", "Data", "tokenizers", "bpe")

def bytes_to_unicode():  # GPT-2's byte -> printable character table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return bs, [chr(c) for c in cs]

bs, cs = bytes_to_unicode()
vocab = {c: i for i, c in enumerate(cs)}          # id i = i-th byte symbol, as GPT-2 / Llama 3 order them
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("c", "at"), ("Ġ", "c"), ("Ġc", "at"),
          ("1", "2"), ("12", "3"), ("'", "s"), ("l", "l"), ("e", "ll"), ("h", "ell"), ("hell", "o")]
for a, b in MERGES:
    vocab[a + b] = len(vocab)                      # 256, 257, ... in merge order
SPECIAL = {"<|begin_of_text|>": 300, "<|end_of_text|>": 301, "<|eot_id|>": 302}

LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
doc = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True} for t, i in SPECIAL.items()],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [], "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [300], "tokens": ["<|begin_of_text|>"]}}},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
              "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]},
}
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(doc, f, ensure_ascii=False, indent=1)
with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 8192,
               "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
print({a + b: vocab[a + b] for a, b in MERGES})
