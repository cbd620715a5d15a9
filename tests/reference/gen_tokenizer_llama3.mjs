// Writes the Llama 3 tokenizer oracle that Llama3TokenizerOracleTests checks HfBpeTokenizer against.
//
// The ids come from an independent implementation of Meta's Llama 3 tokenizer: the npm package
// llama3-tokenizer-js, version 1.2.0 (belladoreai; MIT; vocabulary and merges of Meta-Llama-3(.1)'s tokenizer.json
// baked into the bundle, its own JavaScript pre-tokenizer and priority-queue BPE). Every id it returns is also checked
// against a second, textbook BPE written below (repeatedly merge the lowest-ranked adjacent pair, leftmost first, as
// HF tokenizers' BPE does) on the package's vocabulary and merges; the script stops if the two disagree.
//
// What HF tokenizers does with Llama 3's tokenizer.json, and so what both implementations here do:
//   * added tokens (all 256 of Llama 3 are special) are matched anywhere in the text, leftmost-longest, and become
//     their ids (split_special_tokens is off by default);
//   * every other stretch is split by the Split pre-tokenizer's regex (Isolated), matched on code points
//     (so astral letters such as 𝐀 are \p{L} and astral digits such as 𝟏 are \p{N});
//   * each piece is mapped byte by byte to GPT-2's printable symbols; if the whole piece is a vocabulary entry it is
//     that id (ignore_merges: true), otherwise BPE merges it by rank;
//   * no BOS here: expected.json holds encode(text) without the post-processor's <|begin_of_text|>.
//
// Outputs (next to the C# test data):
//   tests/NativePeft.Tests/Data/tokenizers/llama3-subset/tokenizer.json  Llama 3's layout (pre_tokenizer, decoder,
//       post_processor as in meta-llama/Meta-Llama-3-8B's tokenizer.json; added tokens with Llama 3.1's names, as the
//       package has them), whose vocabulary and merges are the SUBSET of the real ones that the strings below reach:
//         - a merge (a, b) is kept, in its original order, iff a+b is a substring of some pre-token of the strings
//           (pre-token = the byte-symbol form of one regex piece);
//         - a vocabulary entry is kept, with its original id, iff it is one of the 256 byte symbols or a substring of
//           some pre-token (in Llama 3 every longer entry is the result of a merge, so these are exactly the results
//           of kept merges; the script checks that).
//       Why the subset encodes those strings exactly as the full tokenizer does: BPE on a pre-token w starts from
//       its byte symbols (all kept) and only ever merges two ADJACENT symbols, each a substring of w, so every merge
//       that can fire has a+b a substring of w and is kept; a dropped merge could never fire on w. Kept merges keep
//       their relative order, and BPE only compares ranks, so it picks the same merge at every step. The
//       ignore_merges lookup of the whole w gives the same answer (w is a substring of itself, so it is kept if it
//       was there). Ids are the original ones. The script re-encodes every string with the textbook BPE on the
//       subset and stops if any id differs from the package's.
//   tests/NativePeft.Tests/Data/tokenizers/llama3-subset/expected.json  [{label, text, ids, decoded}], decoded =
//       the package's decode of the non-special ids (what a decode that skips special tokens gives).
//
// Regenerate (node 20; the package is not part of the repository, CI needs only the two outputs):
//   npm install --prefix /tmp/l3tok llama3-tokenizer-js@1.2.0
//   node tests/reference/gen_tokenizer_llama3.mjs /tmp/l3tok/node_modules/llama3-tokenizer-js
//
// Strings the package is NOT a faithful oracle for, so none are used: U+0085 (in HF's \s, not in JavaScript's) and
// U+FEFF (the reverse); "'ſ" and other case-folding contractions (HF's (?i:'s|...) folds ſ to s, the package spells
// the group [sS] and does not).
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL, fileURLToPath } from 'node:url';

const pkgDir = process.argv[2];
if (!pkgDir) { console.error('usage: node gen_tokenizer_llama3.mjs <path to node_modules/llama3-tokenizer-js>'); process.exit(2); }
const pkgJson = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
if (pkgJson.version !== '1.2.0') throw new Error(`llama3-tokenizer-js ${pkgJson.version}; this script was written for 1.2.0`);
const tok = (await import(pathToFileURL(path.join(pkgDir, pkgJson.main)).href)).default;
const OUT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'NativePeft.Tests', 'Data', 'tokenizers', 'llama3-subset');

// label -> text. Varied on purpose: scripts, whitespace, digits, emoji, code, special tokens in text.
const CASES = [
  ['en_sentence', 'The quick brown fox jumps over the lazy dog.'],
  ['en_mixed_case', 'HELLO World, this IS Mixed-Case text!'],
  ['contractions', "I'm sure it's fine, we'll see; they've said you'd come, won't they?"],
  ['contractions_upper', "IT'S DONE, DON'T YOU THINK? WE'LL SEE. I'M HERE 'S 'T 'LL 'Re 'VE"],
  ['german', 'Größenmaßstäbe für Übergänge: Straße, Äpfel, Öl.'],
  ['french', 'Où est la bibliothèque ? Déjà vu, naïve façade, cœur élève.'],
  ['chinese', '我们今天去北京大学参观，天气很好。'],
  ['japanese', '東京は日本の首都です。ひらがなとカタカナ、漢字を混ぜた文。'],
  ['russian', 'Привет, мир! Съешь же ещё этих мягких французских булок.'],
  ['arabic', 'مرحبا بالعالم، كيف حالك اليوم؟'],
  ['hindi', 'नमस्ते दुनिया, आप कैसे हैं?'],
  ['korean', '안녕하세요 세계'],
  ['greek', 'Καλημέρα κόσμε'],
  ['thai', 'สวัสดีครับ'],
  ['mixed_scripts', 'Hello世界Привет123مرحبا'],
  ['combining_marks', 'e\u0301te\u0301 cafe\u0301 n\u0303'],
  ['emoji', 'I love 🦙 and 🎉🎉!'],
  ['emoji_zwj', 'Family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 flag'],
  ['emoji_skin_tones', 'Thumbs 👍🏽👍🏿 waving 👋🏻'],
  ['astral_letters', '𝐀𝐁𝐂abc x𝐀y'],
  ['astral_digits', '𝟏𝟐𝟑𝟒 and 𝟓𝟔'],
  ['cjk_extension_b', '𠀀𠀁abc 𠀂'],
  ['astral_letter_contractions', "𝐁𝐨𝐥𝐝's style, 𝑥'll do; 𠮷野家's bowl"],
  ['space_runs', 'a  b   c    d'],
  ['tabs', '\tindented\t\ttabs\t'],
  ['newlines', 'line1\nline2\n\nline4\n\n\n'],
  ['crlf', 'first\r\nsecond\r\n\r\nthird'],
  ['trailing_spaces', 'trailing spaces   '],
  ['leading_spaces', '   leading'],
  ['spaces_around_newlines', 'end  \n  next \n\t\nlast'],
  ['whitespace_only', '   \n\t  '],
  ['unicode_spaces', '100\u00a0km and\u2003em\u3000wide'],
  ['digits_1_to_10', '1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890'],
  ['numbers_separators', '1,234,567.89 and 3.14159 and 1_000_000 and 2024-12-06 and -42'],
  ['digits_in_words', 'abc123def4567ghi'],
  ['whole_word_in_vocabulary', 'Bu konuya dikkat edin, bir milyon sahibi; odbor; phylum Arthropoda'],  // ignore_merges decides
  ['long_words', 'Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism'],
  ['code_python', 'def f(x):\n    if x > 0:\n        return x ** 2\n    return -x  # negative\n'],
  ['code_csharp', 'public static int Add(int a, int b)\n{\n\treturn a + b; // sum\n}\n'],
  ['code_json', '{"key": [1, 2, 3], "nested": {"a": null}}'],
  ['url', 'See https://example.com/path/to?q=llama&lang=en#frag for more.'],
  ['email', 'mail me: first.last+tag@example.org'],
  ['punctuation_runs', 'Wait... what?!?! --- ((nested)) [[x]] <<>> ;;\n'],
  ['quotes', '"Hello," she said. \'Goodbye.\''],
  ['special_in_text', 'a<|eot_id|>b'],
  ['special_at_start', '<|begin_of_text|>Hi'],
  ['special_chat', '<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'],
  ['special_with_spaces', 'x <|eot_id|> y'],
  ['special_adjacent', '<|end_of_text|><|end_of_text|>'],
  ['special_lookalikes', '<|reserved_special_token_250|> <|not_special|> <|eot_id'],
];

// ---- the package's data --------------------------------------------------------------------------------------------
const vocabById = tok.vocabById;                       // id -> token string (0..128255; 128000.. are the specials)
const NUM_SPECIAL_START = 128000;
const vocab = new Map(); vocabById.forEach((t, id) => { if (id < NUM_SPECIAL_START) vocab.set(t, id); });
const merges = [];                                      // in rank order; the package stores rank r as 2r+1
for (const [key, prio] of tok.merges) merges[(prio - 1) / 2] = key.split(' ');
if (merges.length !== 280147 || merges.some(m => m === undefined)) throw new Error('unexpected merges table');
const specials = vocabById.slice(NUM_SPECIAL_START);
if (specials.length !== 256) throw new Error('expected 256 special tokens');

// GPT-2's bytes_to_unicode.
const byteToChar = (() => {
  const bs = []; for (let b = 33; b <= 126; b++) bs.push(b); for (let b = 161; b <= 172; b++) bs.push(b); for (let b = 174; b <= 255; b++) bs.push(b);
  const map = new Array(256); let n = 0;
  for (let b = 0; b < 256; b++) map[b] = bs.includes(b) ? String.fromCharCode(b) : String.fromCharCode(256 + n++);
  return map;
})();
const toSymbols = s => Array.from(new TextEncoder().encode(s), b => byteToChar[b]).join('');

// Llama 3's Split regex, as in Meta-Llama-3-8B's tokenizer.json (written out for the JSON), and a JavaScript
// equivalent for splitting here (JavaScript has no (?i:...) group; 'u' makes \p{..} work on code points).
const LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const JS_REGEX = new RegExp(LLAMA3_REGEX.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])"), 'gu');

function splitKeep(text, regex) {           // matches and the text between them, in order
  const out = []; let prev = 0;
  for (const m of text.matchAll(regex)) {
    if (m.index > prev) out.push([false, text.slice(prev, m.index)]);
    if (m[0].length > 0) out.push([true, m[0]]);
    prev = m.index + m[0].length;
  }
  if (prev < text.length) out.push([false, text.slice(prev)]);
  return out;
}
const SPECIAL_REGEX = new RegExp([...specials].sort((a, b) => b.length - a.length).map(s => s.replace(/[|]/g, '\\|')).join('|'), 'g');
// Pieces of a text: {special: id} or {pretoken: byte-symbol string}.
function pieces(text) {
  const out = [];
  for (const [isSpecial, part] of splitKeep(text, SPECIAL_REGEX)) {
    if (isSpecial) { out.push({ special: NUM_SPECIAL_START + specials.indexOf(part) }); continue; }
    for (const [, p] of splitKeep(part, JS_REGEX)) out.push({ pretoken: toSymbols(p) });
  }
  return out;
}

// Textbook BPE (HF's order: lowest rank first, leftmost among equal ranks), with ignore_merges.
function bpe(word, vocabMap, rankOf) {
  if (vocabMap.has(word)) return [vocabMap.get(word)];
  let syms = Array.from(word);
  for (;;) {
    let best = -1, bestRank = Infinity;
    for (let i = 0; i + 1 < syms.length; i++) {
      const r = rankOf.get(syms[i] + ' ' + syms[i + 1]);
      if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
    }
    if (best < 0) break;
    syms.splice(best, 2, syms[best] + syms[best + 1]);
  }
  return syms.map(s => { if (!vocabMap.has(s)) throw new Error(`symbol ${s} not in vocabulary`); return vocabMap.get(s); });
}
function encodeWith(text, vocabMap, rankOf) {
  return pieces(text).flatMap(p => p.special !== undefined ? [p.special] : bpe(p.pretoken, vocabMap, rankOf));
}

const fullRank = new Map(merges.map(([a, b], r) => [a + ' ' + b, r]));
const expected = [];
for (const [label, text] of CASES) {
  const ids = tok.encode(text, { bos: false, eos: false });
  const textbook = encodeWith(text, vocab, fullRank);
  if (JSON.stringify(ids) !== JSON.stringify(textbook))
    throw new Error(`${label}: package ${JSON.stringify(ids)} != textbook BPE ${JSON.stringify(textbook)}`);
  const decoded = tok.decode(ids.filter(id => id < NUM_SPECIAL_START));
  if (decoded !== text.replace(SPECIAL_REGEX, '')) throw new Error(`${label}: decode does not round-trip`);
  expected.push({ label, text, ids, decoded });
}

// ---- the subset ----------------------------------------------------------------------------------------------------
const substrings = new Set();
for (const [, text] of CASES)
  for (const p of pieces(text)) {
    if (p.pretoken === undefined) continue;
    const syms = Array.from(p.pretoken);
    for (let i = 0; i < syms.length; i++) for (let j = i + 1; j <= syms.length; j++) substrings.add(syms.slice(i, j).join(''));
  }
const keptMerges = merges.filter(([a, b]) => substrings.has(a + b));
const byteSymbols = new Set(byteToChar);
const keptVocab = [...vocab].filter(([t]) => byteSymbols.has(t) || substrings.has(t)).sort((x, y) => x[1] - y[1]);
const mergeResults = new Set(keptMerges.map(([a, b]) => a + b));
for (const [t] of keptVocab) if (!byteSymbols.has(t) && !mergeResults.has(t)) throw new Error(`kept vocabulary entry ${t} is no kept merge's result`);
for (const [a, b] of keptMerges) if (!substrings.has(a) || !substrings.has(b)) throw new Error('kept merge with a dropped part');
const subVocab = new Map(keptVocab);
const subRank = new Map(keptMerges.map(([a, b], r) => [a + ' ' + b, r]));
for (const e of expected) {
  const sub = encodeWith(e.text, subVocab, subRank);
  if (JSON.stringify(sub) !== JSON.stringify(e.ids)) throw new Error(`${e.label}: the subset encodes ${JSON.stringify(sub)}, the full tokenizer ${JSON.stringify(e.ids)}`);
  for (const id of e.ids) if (id < NUM_SPECIAL_START && !keptVocab.some(([, i]) => i === id)) throw new Error(`${e.label}: id ${id} missing`);
}

const addedTokens = specials.map((content, i) => ({ id: NUM_SPECIAL_START + i, content, single_word: false, lstrip: false,
  rstrip: false, normalized: false, special: true }));
const doc = {
  version: '1.0', truncation: null, padding: null,
  added_tokens: addedTokens,
  normalizer: null,
  pre_tokenizer: { type: 'Sequence', pretokenizers: [
    { type: 'Split', pattern: { Regex: LLAMA3_REGEX }, behavior: 'Isolated', invert: false },
    { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] },
  post_processor: { type: 'Sequence', processors: [
    { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    { type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } },
             { SpecialToken: { id: '<|begin_of_text|>', type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<|begin_of_text|>': { id: '<|begin_of_text|>', ids: [128000], tokens: ['<|begin_of_text|>'] } } }] },
  decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
  model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
           fuse_unk: false, byte_fallback: false, ignore_merges: true,
           vocab: Object.fromEntries(keptVocab), merges: keptMerges.map(([a, b]) => `${a} ${b}`) },
};
fs.mkdirSync(OUT, { recursive: true });
fs.writeFileSync(path.join(OUT, 'tokenizer.json'), JSON.stringify(doc, null, 1) + '\n');
fs.writeFileSync(path.join(OUT, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|begin_of_text|>',
  eos_token: '<|end_of_text|>', model_max_length: 131072, tokenizer_class: 'PreTrainedTokenizerFast' }, null, 1) + '\n');
fs.writeFileSync(path.join(OUT, 'expected.json'),
  '[\n' + expected.map(e => ' ' + JSON.stringify(e)).join(',\n') + '\n]\n');
console.log(`${expected.length} strings; subset: ${keptVocab.length} vocabulary entries, ${keptMerges.length} merges; ` +
  `tokenizer.json ${fs.statSync(path.join(OUT, 'tokenizer.json')).size} bytes`);
