#!/usr/bin/python3
"""Trains the tiny SentencePiece BPE model the tokenizer tests load (Llama 2's tokenizer.model kind: BPE,
byte_fallback, <unk>=0 <s>=1 </s>=2, add_dummy_prefix), and records the sentencepiece library's own encodings
of a few strings as the oracle the C# tests compare against.

Needs Debian's python3-sentencepiece (apt-get install python3-sentencepiece); run with /usr/bin/python3:
    /usr/bin/python3 tests/reference/gen_tokenizer_spm.py
Writes tests/NativePeft.Tests/Data/tokenizers/spm/{tokenizer.model, expected.json, tokenizer_config.json}.
"""
import io, json, os
import sentencepiece as spm

OUT = os.path.join(os.path.dirname(__file__), "..", "NativePeft.Tests", "Data", "tokenizers", "spm")
CORPUS = """the cat sat on the mat
the dog sat on the log
a cat and a dog met on the mat
reverse the string and return the result
hello world, hello there
the quick brown fox jumps over the lazy dog
""" * 4

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS.splitlines()), model_writer=model,
    model_type="bpe", vocab_size=320, byte_fallback=True, character_coverage=1.0,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, add_dummy_prefix=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    hard_vocab_limit=False)
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())

sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
texts = ["the cat sat on the mat", "hello world", "a dog", "zebra 42!", "héllo ☃", "the  mat"]
cases = [{"text": t, "ids": sp.encode(t), "pieces": sp.encode(t, out_type=str), "decoded": sp.decode(sp.encode(t))}
         for t in texts]
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
               "unk_id": sp.unk_id(), "cases": cases}, f, ensure_ascii=False, indent=1)
with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}, f, indent=1)
print("vocab", sp.get_piece_size(), "model bytes", len(model.getvalue()))
