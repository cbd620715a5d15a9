using System.Text;
using NativePeft.Data;
using NativePeft.Data.Jinja;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Quantization;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

/// <summary>
/// Seeded mutation fuzzing of every file reader (docs/reliability.md "Fuzzing"): valid seed files of each format are
/// mutated (bit flips, interesting bytes, inserts, deletes, splices, truncation, boundary integers in place of JSON
/// numbers, invalid UTF-8 and lone-surrogate escapes inside JSON strings) and read. Any exception that is not one of
/// the reader's typed errors fails, and so does an iteration that allocates more than
/// <see cref="AllocationBound"/> on its thread. <c>NATIVEPEFT_FUZZ_ITERATIONS</c> (per reader; default
/// <see cref="DefaultIterations"/>), <c>NATIVEPEFT_FUZZ_SEED</c> and <c>NATIVEPEFT_FUZZ_START</c> (first iteration)
/// make a longer run or reproduce one iteration: each iteration's mutations depend only on (seed, reader, iteration).
/// </summary>
[TestFixture]
public sealed class ReaderFuzzTests
{
    public const int DefaultIterations = 150;

    /// <summary>Bytes one iteration may allocate: 64 MiB plus 32 × the input (a reader may hold the file, its string and a document).</summary>
    public static long AllocationBound(long inputBytes) => (64L << 20) + 32 * inputBytes;

    private static readonly Type[] ModelFileErrors = [typeof(LlamaConfigException), typeof(SafetensorsException), typeof(HfCheckpointException)];
    private static readonly Type[] TokenizerErrors = [typeof(InvalidDataException), typeof(NotSupportedException), typeof(JinjaException)];
    private static readonly Type[] DataErrors = [typeof(DataFormatException), typeof(JinjaException)];

    /// <summary>A reader under test: its seed file (name, bytes), the folder's other files, and what reads it.</summary>
    private sealed record Target(string Name, string FileName, byte[] Seed, Action<string> Read, Type[] Typed, Action<string>? Prepare = null);

    private static readonly string TestDataDir = Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "tokenizers", "bpe");

    public static IEnumerable<string> TargetNames => Targets().Select(t => t.Name);

    private static IEnumerable<Target> Targets()
    {
        byte[] U(string s) => Encoding.UTF8.GetBytes(s);
        var tok = ByteTokenizer.Instance;

        yield return new Target("safetensors", "model.safetensors", SafetensorsSeed(), path =>
        {
            using var f = SafetensorsFile.Open(path);
            foreach (var t in f.Tensors) _ = f.GetBytes(t.Name).Length;
        }, [typeof(SafetensorsException)]);

        yield return new Target("safetensors-bnb4bit", "q.safetensors", Bnb4BitSeed(), path =>
        {
            using var f = SafetensorsFile.Open(path);
            _ = BitsAndBytes4Bit.Load(f, "model.layers.0.self_attn.q_proj");
        }, [typeof(SafetensorsException)]);

        yield return new Target("config.json", LlamaConfig.FileName, U(LlamaConfig.Preset("llama3.1-8b").ToJson()),
            path => LlamaConfig.Load(path), [typeof(LlamaConfigException)]);

        yield return new Target("model.safetensors.index.json", HfCheckpoint.IndexFileName, [], path =>
        {
            using var c = HfCheckpoint.Open(Path.GetDirectoryName(path)!);
            _ = c.FindProblems();
        }, ModelFileErrors, Prepare: ShardedCheckpoint);

        yield return new Target("tokenizer.json", "tokenizer.json", File.ReadAllBytes(Path.Combine(TestDataDir, "tokenizer.json")),
            path => HfBpeTokenizer.FromFile(path).Encode("Hello, world", addBos: false), TokenizerErrors);

        yield return new Target("tokenizer_config.json", "tokenizer_config.json", U("""
            {
              "bos_token": "<|begin_of_text|>",
              "eos_token": {"content": "<|end_of_text|>", "lstrip": false},
              "pad_token_id": 3,
              "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}",
              "model_max_length": 8192,
              "tokenizer_class": "PreTrainedTokenizerFast"
            }
            """), path =>
        {
            string dir = Path.GetDirectoryName(path)!;
            _ = TokenizerLoader.TryFromFolder(dir);
            var template = ChatTemplate.ForModel(dir);
            _ = template.Template;
        }, TokenizerErrors, Prepare: dir => File.Copy(Path.Combine(TestDataDir, "tokenizer.json"), Path.Combine(dir, "tokenizer.json"), true));

        yield return new Target("adapter_config.json", "adapter_config.json",
            U(PeftLoraConfig.From(new LoraSettings { Rank = 8, Alpha = 16, Dropout = 0.05, TargetModules = ["q_proj", "v_proj"] }, "base").ToJson()),
            path => PeftLoraConfig.ParseUtf8(File.ReadAllBytes(path), path), [typeof(PeftAdapterException)]);

        yield return new Target("data-pretokenized.jsonl", "d.jsonl",
            U("{\"input_ids\": [1, 2, 3, 4], \"labels\": [-100, 2, 3, 4]}\n{\"input_ids\": [5, 6, 7]}\n\n{\"input_ids\": [65, 66], \"labels\": null}\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 16), DataErrors);

        yield return new Target("data-text.jsonl", "t.jsonl", U("{\"text\": \"hello world\"}\n{\"text\": \"caf\\u00e9 \\ud83d\\ude00 ünïcode\"}\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 16, BadLinePolicy.Skip), DataErrors);

        yield return new Target("data-alpaca.jsonl", "a.jsonl",
            U("{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"hi\"}\n{\"instruction\": \"Upper\", \"input\": \"abc\", \"output\": \"ABC\"}\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 32), DataErrors);

        yield return new Target("data-alpaca.json", "a.json",
            U("[\n  {\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"hi\"},\n  {\"instruction\": \"Upper\", \"output\": \"ABC\"}\n]\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 32), DataErrors);

        yield return new Target("data-chat.jsonl", "c.jsonl",
            U("{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 64, BadLinePolicy.Stop, chatTemplate: ChatTemplate.Default), DataErrors);

        yield return new Target("data.txt", "d.txt", U("The quick brown fox\njumps over the lazy dog. ünïcödé ✓\n"),
            path => DatasetLoader.Load(path, DataFormat.Auto, tok, 8), DataErrors);
    }

    [TestCaseSource(nameof(TargetNames))]
    public void MutatedFilesGiveOnlyTypedErrors(string name)
    {
        Target target = Targets().Single(t => t.Name == name);
        int iterations = EnvInt("NATIVEPEFT_FUZZ_ITERATIONS") ?? DefaultIterations;
        int seed = EnvInt("NATIVEPEFT_FUZZ_SEED") ?? 20261206;
        int start = EnvInt("NATIVEPEFT_FUZZ_START") ?? 0;
        using var dir = new TempDir();
        target.Prepare?.Invoke(dir.Path);
        string path = dir[target.FileName];
        byte[] seedBytes = target.Seed.Length > 0 ? target.Seed : File.ReadAllBytes(path);

        // The seed itself must read cleanly (else the fuzzer tests nothing).
        File.WriteAllBytes(path, seedBytes);
        target.Read(path);

        var failures = new Dictionary<string, string>();
        int typed = 0;
        for (int i = start; i < start + iterations; i++)
        {
            var rng = new Random(HashCode.Combine(seed, name, i) ^ (seed * 31 + i));
            var (bytes, steps) = Mutate(seedBytes, rng);
            File.WriteAllBytes(path, bytes);
            long before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                target.Read(path);
            }
            catch (Exception e) when (target.Typed.Any(t => t.IsInstanceOfType(e)))
            {
                typed++;
            }
            catch (Exception e)
            {
                string key = e.GetType().Name + " at " + (e.StackTrace?.Split('\n').FirstOrDefault()?.Trim() ?? "?");
                failures.TryAdd(key, $"iteration {i} ({string.Join("; ", steps)}): {e.GetType().Name}: {e.Message.Split('\n')[0]}\n    {e.StackTrace?.Split('\n').Take(4).Select(l => l.Trim()).Aggregate((a, b) => a + "\n    " + b)}");
            }
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (allocated > AllocationBound(bytes.Length))
                failures.TryAdd("allocation", $"iteration {i} ({string.Join("; ", steps)}): allocated {allocated} bytes reading {bytes.Length}, more than {AllocationBound(bytes.Length)}");
        }
        TestContext.Out.WriteLine($"{name}: {iterations} iterations from {start}, seed {seed}: {typed} typed errors, {failures.Count} distinct failures");
        Assert.That(failures, Is.Empty,
            $"{name}: reproduce with NATIVEPEFT_FUZZ_SEED={seed} NATIVEPEFT_FUZZ_START=<iteration> NATIVEPEFT_FUZZ_ITERATIONS=1\n" +
            string.Join("\n", failures.Values));
    }

    private static int? EnvInt(string name) => int.TryParse(Environment.GetEnvironmentVariable(name), out int v) ? v : null;

    // ---------------------------------------------------------------- mutations

    private static readonly string[] BoundaryNumbers =
    [
        "0", "-1", "1", "2147483647", "2147483648", "-2147483649", "4294967296", "9223372036854775807", "9223372036854775808",
        "18446744073709551616", "1e308", "1e400", "-1e400", "1.5", "-0", "65536", "1024", "1000000000", "4194305", "16777217",
    ];

    private static readonly byte[][] BadUtf8 =
    [
        [0xFF], [0x80], [0xC3], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xE2, 0x82], [0xF0, 0x9F, 0x98],
    ];

    private static readonly string[] BadEscapes = [@"\ud800", @"\udc00", @"\ud800x", @"\ud800\u0041", @"\u00", @"\x41"];

    private static readonly byte[] Interesting = "\0\"\\{}[],:-.eE0 \n\r\t"u8.ToArray().Concat(new byte[] { 0xFF, 0x7F, 0x80 }).ToArray();

    private static (byte[] Bytes, List<string> Steps) Mutate(byte[] seed, Random rng)
    {
        var b = new List<byte>(seed);
        var steps = new List<string>();
        int count = 1 + rng.Next(3);
        for (int k = 0; k < count; k++)
        {
            int at = b.Count == 0 ? 0 : rng.Next(b.Count);
            switch (rng.Next(10))
            {
                case 0:
                    if (b.Count == 0) break;
                    b[at] ^= (byte)(1 << rng.Next(8));
                    steps.Add($"flip bit at {at}");
                    break;
                case 1:
                    if (b.Count == 0) break;
                    b[at] = Interesting[rng.Next(Interesting.Length)];
                    steps.Add($"byte {b[at]:X2} at {at}");
                    break;
                case 2:
                {
                    int n = 1 + rng.Next(8);
                    var ins = new byte[n];
                    rng.NextBytes(ins);
                    b.InsertRange(at, ins);
                    steps.Add($"insert {n} random bytes at {at}");
                    break;
                }
                case 3:
                {
                    int n = Math.Min(b.Count - at, 1 + rng.Next(16));
                    b.RemoveRange(at, n);
                    steps.Add($"delete {n} at {at}");
                    break;
                }
                case 4:
                {
                    if (b.Count == 0) break;
                    int from = rng.Next(b.Count), n = Math.Min(b.Count - from, 1 + rng.Next(64));
                    b.InsertRange(at, b.GetRange(from, n));
                    steps.Add($"splice {n} from {from} to {at}");
                    break;
                }
                case 5:
                    b.RemoveRange(at, b.Count - at);
                    steps.Add($"truncate at {at}");
                    break;
                case 6 or 7:
                {
                    // A JSON number (a run of digits) replaced by a boundary value.
                    var digits = Enumerable.Range(0, b.Count).Where(i => b[i] is >= (byte)'0' and <= (byte)'9' && (i == 0 || b[i - 1] is < (byte)'0' or > (byte)'9')).ToList();
                    if (digits.Count == 0) break;
                    int s = digits[rng.Next(digits.Count)], e = s;
                    while (e < b.Count && (b[e] is >= (byte)'0' and <= (byte)'9' or (byte)'.' or (byte)'e' or (byte)'-')) e++;
                    string v = BoundaryNumbers[rng.Next(BoundaryNumbers.Length)];
                    b.RemoveRange(s, e - s);
                    b.InsertRange(s, Encoding.ASCII.GetBytes(v));
                    steps.Add($"number at {s} := {v}");
                    break;
                }
                case 8:
                {
                    // Invalid UTF-8 right after a quote (inside a string, or a key).
                    var quotes = Enumerable.Range(0, b.Count).Where(i => b[i] == (byte)'"').ToList();
                    int q = quotes.Count == 0 ? at : quotes[rng.Next(quotes.Count)] + 1;
                    byte[] bad = BadUtf8[rng.Next(BadUtf8.Length)];
                    b.InsertRange(q, bad);
                    steps.Add($"invalid UTF-8 {Convert.ToHexString(bad)} at {q}");
                    break;
                }
                default:
                {
                    var quotes = Enumerable.Range(0, b.Count).Where(i => b[i] == (byte)'"').ToList();
                    int q = quotes.Count == 0 ? at : quotes[rng.Next(quotes.Count)] + 1;
                    string esc = BadEscapes[rng.Next(BadEscapes.Length)];
                    b.InsertRange(q, Encoding.ASCII.GetBytes(esc));
                    steps.Add($"escape {esc} at {q}");
                    break;
                }
            }
        }
        // Half the time a safetensors header length follows the header's new size, so mutations reach the JSON.
        byte[] result = b.ToArray();
        if (seed.Length > 8 && seed[8] == (byte)'{' && result.Length >= 8 && rng.Next(2) == 0)
        {
            ulong oldLen = BitConverter.ToUInt64(seed, 0);
            long newLen = (long)oldLen + (result.Length - seed.Length);
            if (newLen >= 0 && newLen + 8 <= result.Length)
            {
                BitConverter.GetBytes((ulong)newLen).CopyTo(result, 0);
                steps.Add($"header length := {newLen}");
            }
        }
        return (result, steps);
    }

    // ---------------------------------------------------------------- seeds

    private static byte[] SafetensorsSeed()
    {
        using var dir = new TempDir();
        SafetensorsWriter.Write(dir["s.safetensors"],
        [
            SafetensorsTensor.From("a.weight", [2, 3], new float[] { 1, 2, 3, 4, 5, 6 }),
            SafetensorsTensor.From("b.bias", [4], new[] { (BFloat16)1f, (BFloat16)2f, (BFloat16)3f, (BFloat16)4f }),
            SafetensorsTensor.From("ids", [5], new byte[] { 1, 2, 3, 4, 5 }),
        ], new Dictionary<string, string> { ["format"] = "pt", ["note"] = "héllo" });
        return File.ReadAllBytes(dir["s.safetensors"]);
    }

    private static byte[] Bnb4BitSeed()
    {
        using var dir = new TempDir();
        var x = Enumerable.Range(0, 128).Select(i => (float)Math.Sin(i)).ToArray();
        var t = Quantized4BitTensor.Quantize<float>(x, [2, 64], QuantType.Nf4, 64, true, DType.BF16);
        BitsAndBytes4Bit.Save(dir["q.safetensors"], "model.layers.0.self_attn.q_proj", t);
        return File.ReadAllBytes(dir["q.safetensors"]);
    }

    /// <summary>A tiny sharded checkpoint (config.json, shards, index): the fuzzer mutates the index.</summary>
    private static void ShardedCheckpoint(string dir) => HfCheckpoint.Write(dir, TrainingKit.Config, TrainingKit.RandomTensors(), maxShardBytes: 20_000);
}
