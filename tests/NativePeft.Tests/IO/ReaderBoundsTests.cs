using System.Text;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

/// <summary>
/// Issue 10, classes 4 and 5: sizes from a file are bounded (docs/reliability.md "Bounds") before anything is sized
/// from them, and malformed text inside otherwise valid files (invalid UTF-8, a JSON escape that is a lone UTF-16
/// surrogate) is each reader's typed error naming the file and the position.
/// </summary>
[TestFixture]
public sealed class ReaderBoundsTests
{
    private const string TinyConfig =
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, " +
        "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 300, \"max_position_embeddings\": 256}";

    private static string With(string field, string value) =>
        System.Text.RegularExpressions.Regex.Replace(TinyConfig, $"\"{field}\": [0-9]+", $"\"{field}\": {value}");

    // ---------------------------------------------------------------- class 4: bounds

    [TestCase("num_hidden_layers", "200000000", "[1, 1024]")]
    [TestCase("num_hidden_layers", "1025", "[1, 1024]")]
    [TestCase("vocab_size", "2147483647", "[1, 4194304]")]
    [TestCase("hidden_size", "1048576", "[1, 131072]")]
    [TestCase("intermediate_size", "2000000000", "[1, 524288]")]
    [TestCase("num_key_value_heads", "4096", "[1, 1024]")]
    [TestCase("max_position_embeddings", "2147483647", "[1, 16777216]")]
    public void AnAbsurdSizeInConfigJsonIsRefusedNamingTheField(string field, string value, string range)
    {
        string json = With(field, value);
        Assert.That(json, Does.Contain($"\"{field}\": {value}"));
        var e = Assert.Throws<LlamaConfigException>(() => LlamaConfig.Parse(json, "config.json"))!;
        Assert.That(e.Field, Is.EqualTo(field), e.Message);
        Assert.That(e.Message, Does.Contain(value + " must be in " + range));
    }

    [Test]
    public void SizesWithinTheBoundsWhoseProductIsAbsurdAreRefused()
    {
        // Every field within its bound and every weight at most 2^36 elements, but 1024 layers × (4 · 2^34 + 3 · 2^36)
        // = 2^48 ≈ 2.8e14 parameters (hand-computed), above the 2^42 ≈ 4.4e12 limit.
        string json = "{\"model_type\": \"llama\", \"hidden_size\": 131072, \"intermediate_size\": 524288, \"num_hidden_layers\": 1024, " +
                      "\"num_attention_heads\": 1024, \"vocab_size\": 524288, \"max_position_embeddings\": 4096}";
        var e = Assert.Throws<LlamaConfigException>(() => LlamaConfig.Parse(json, "config.json"))!;
        Assert.That(e.Message, Does.Contain("parameters, more than the 4398046511104 limit"));
    }

    [Test]
    public void HeadsTimesHeadDimAboveTheHiddenBoundIsRefused()
    {
        // 1024 heads × head_dim 2048 = 2097152 > 131072; each value is within its own bound.
        string json = TinyConfig.Replace("\"num_attention_heads\": 4, \"num_key_value_heads\": 2", "\"num_attention_heads\": 1024, \"num_key_value_heads\": 1024, \"head_dim\": 2048");
        var e = Assert.Throws<LlamaConfigException>(() => LlamaConfig.Parse(json, "config.json"))!;
        Assert.That(e.Field, Is.EqualTo("head_dim"), e.Message);
        Assert.That(e.Message, Does.Contain("2097152"));
    }

    [Test]
    public void TheLargestPublishedConfigsAreWithinTheBounds()
    {
        foreach (string name in LlamaConfig.PresetNames) Assert.DoesNotThrow(() => LlamaConfig.Preset(name).Validate(name));
        // Llama-3.1-405B (published config.json values).
        var c405 = LlamaConfig.Preset("llama3.1-70b") with { HiddenSize = 16384, IntermediateSize = 53248, NumHiddenLayers = 126, NumAttentionHeads = 128 };
        Assert.DoesNotThrow(() => c405.Validate("405b"));
    }

    [Test]
    public void AnAdapterRankAboveTheBoundIsRefused()
    {
        var e = Assert.Throws<PeftAdapterException>(() => PeftLoraConfig.Parse("{\"peft_type\": \"LORA\", \"r\": 1000000000}", "adapter_config.json"))!;
        Assert.That(e.Message, Does.Contain("r: 1000000000 must be in [1, 8192]"));
    }

    [Test]
    public void ABatcherWhoseBatchWouldOverflowAnIntArrayIsRefusedWhenMade()
    {
        var examples = new[] { new TrainingExample([1, 2, 3], [1, 2, 3]), new TrainingExample([4, 5], [4, 5]) };
        // 2 rows × 2e9 = 4e9 tokens: int arithmetic would wrap.
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => _ = new Batcher(examples, new BatcherOptions { BatchSize = 2, SeqLen = 2_000_000_000 }, padId: 0))!;
        Assert.That(e.Message, Does.Contain("4000000000 tokens"));
    }

    // ---------------------------------------------------------------- class 5: malformed text

    private static byte[] Utf8(string s) => Encoding.UTF8.GetBytes(s);

    /// <summary>Bytes of <paramref name="text"/> with the marker "@" replaced by a lone 0xFF byte.</summary>
    private static byte[] WithFF(string text)
    {
        var b = Utf8(text).ToList();
        int at = b.IndexOf((byte)'@');
        b[at] = 0xFF;
        return b.ToArray();
    }

    [Test]
    public void ConfigJsonWithAnInvalidUtf8ByteNamesTheByteAndLine()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir["config.json"], WithFF(TinyConfig.Replace("\"llama\"", "\"lla@ma\"").Replace(", \"hidden_size\"", ",\n\"hidden_size\"")));
        var e = Assert.Throws<LlamaConfigException>(() => LlamaConfig.Load(dir["config.json"]))!;
        // {"model_type": "lla → the 0xFF is byte 19 (0-based) on line 1, column 20.
        Assert.That(e.Message, Does.Contain("invalid UTF-8 at byte 19 (line 1, column 20): 0xFF"));
        Assert.That(e.Message, Does.StartWith(dir["config.json"]));
    }

    [Test]
    public void SafetensorsMetadataWithALoneSurrogateEscapeIsATypedError()
    {
        using var dir = new TempDir();
        string header = "{\"__metadata__\": {\"note\": \"a\\ud800b\"}, \"t\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}}";
        WriteSafetensors(dir["x.safetensors"], Utf8(header), [1, 2]);
        var e = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(dir["x.safetensors"]).Dispose())!;
        // The escape starts at byte 28 of the header ({"__metadata__": {"note": "a → 28 bytes before the backslash).
        Assert.That(e.Message, Does.Contain("header: a \\u escape at byte 28 (line 1, column 29) is a lone UTF-16 surrogate"));
    }

    [Test]
    public void SafetensorsTensorNameWithInvalidUtf8IsATypedError()
    {
        using var dir = new TempDir();
        byte[] header = WithFF("{\"t@\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}}");
        WriteSafetensors(dir["x.safetensors"], header, [1, 2]);
        var e = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(dir["x.safetensors"]).Dispose())!;
        Assert.That(e.Message, Does.Contain("invalid UTF-8 at byte 3 (line 1, column 4): 0xFF"));
    }

    private static void WriteSafetensors(string path, byte[] header, byte[] data)
    {
        using var fs = File.Create(path);
        fs.Write(BitConverter.GetBytes((ulong)header.Length));
        fs.Write(header);
        fs.Write(data);
    }

    [Test]
    public void IndexJsonWithALoneSurrogateInATensorNameIsATypedError()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["config.json"], TinyConfig);
        File.WriteAllText(dir[HfCheckpoint.IndexFileName], "{\"weight_map\": {\"model.\\udc00x\": \"model-00001-of-00001.safetensors\"}}");
        var e = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(dir.Path).Dispose())!;
        Assert.That(e.Message, Does.Contain("a \\u escape at byte 23 (line 1, column 24) is a lone UTF-16 surrogate"));
    }

    [Test]
    public void AdapterConfigWithAnInvalidUtf8ByteIsATypedError()
    {
        var e = Assert.Throws<PeftAdapterException>(() => PeftLoraConfig.ParseUtf8(WithFF("{\"peft_type\": \"LORA\", \"base_model_name_or_path\": \"m@\"}"), "adapter_config.json"))!;
        Assert.That(e.Message, Does.Contain("invalid UTF-8 at byte 51 (line 1, column 52): 0xFF"));
    }

    [Test]
    public void TokenizerJsonWithInvalidUtf8InAVocabularyKeyIsATypedError()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir["tokenizer.json"], WithFF("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a@\": 0}, \"merges\": []}, \"decoder\": {\"type\": \"ByteLevel\"}}"));
        var e = Assert.Throws<InvalidDataException>(() => HfBpeTokenizer.FromFile(dir["tokenizer.json"]))!;
        Assert.That(e.Message, Does.StartWith(dir["tokenizer.json"]));
        Assert.That(e.Message, Does.Contain("invalid UTF-8 at byte 38 (line 1, column 39): 0xFF"));
    }

    [Test]
    public void TokenizerJsonWithATokenIdBeyondTheVocabularyBoundIsATypedError()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["tokenizer.json"], "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 2147483647}, \"merges\": []}, \"decoder\": {\"type\": \"ByteLevel\"}}");
        var e = Assert.Throws<InvalidDataException>(() => HfBpeTokenizer.FromFile(dir["tokenizer.json"]))!;
        Assert.That(e.Message, Does.Contain("model.vocab \"b\": 2147483647 is not a token id in [0, 4194304)"));
    }

    [Test]
    public void TokenizerConfigWithALoneSurrogateInTheChatTemplateIsATypedError()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["tokenizer_config.json"], "{\"chat_template\": \"{{ '\\ud800' }}\"}");
        var e = Assert.Throws<InvalidDataException>(() => ChatTemplate.ForModel(dir.Path))!;
        Assert.That(e.Message, Does.Contain("a \\u escape at byte 23 (line 1, column 24) is a lone UTF-16 surrogate"));
    }

    [Test]
    public void AJsonlDatasetLineWithInvalidUtf8NamesTheLineAndIsSkippedUnderSkip()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir["d.jsonl"], WithFF("{\"text\": \"good\"}\n{\"text\": \"b@d\"}\n{\"text\": \"fine\"}\n"));
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(dir["d.jsonl"], DataFormat.TextJsonl, ByteTokenizer.Instance, 16))!;
        Assert.That(e.LineNumber, Is.EqualTo(2));
        Assert.That(e.Message, Does.Contain(":2: invalid UTF-8 at column 12 (byte 0xFF)"));
        var skipped = DatasetLoader.Load(dir["d.jsonl"], DataFormat.TextJsonl, ByteTokenizer.Instance, 16, BadLinePolicy.Skip);
        Assert.That(skipped.SkippedLines, Is.EqualTo(1));
    }

    [Test]
    public void AJsonlDatasetLineWithALoneSurrogateEscapeIsADataFormatError()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["d.jsonl"], "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"\\udfff\", \"output\": \"y\"}\n");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(dir["d.jsonl"], DataFormat.Alpaca, ByteTokenizer.Instance, 16))!;
        Assert.That(e.LineNumber, Is.EqualTo(2));
        Assert.That(e.Message, Does.Contain("lone UTF-16 surrogate"));
    }

    [Test]
    public void APlainTextDatasetWithInvalidUtf8NamesTheLine()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir["d.txt"], WithFF("one\ntwo\nth@ree\n"));
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(dir["d.txt"], DataFormat.PlainText, ByteTokenizer.Instance, 8))!;
        Assert.That(e.LineNumber, Is.EqualTo(3));
        Assert.That(e.Message, Does.Contain("invalid UTF-8 at byte 10 (line 3, column 3): 0xFF"));
    }

    [Test]
    public void AJsonArrayDatasetWithInvalidUtf8NamesTheLine()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir["a.json"], WithFF("[\n{\"instruction\": \"x\", \"output\": \"y\"},\n{\"instruction\": \"@\", \"output\": \"y\"}\n]"));
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(dir["a.json"], DataFormat.Alpaca, ByteTokenizer.Instance, 16))!;
        Assert.That(e.LineNumber, Is.EqualTo(3));
    }

    [Test]
    public void TheUtf8ScannerFindsEachKindOfMalformation()
    {
        // Hand-made cases: offsets of the first bad byte / escape.
        Assert.That(TextInput.FindInvalidUtf8("abc"u8), Is.EqualTo(-1));
        Assert.That(TextInput.FindInvalidUtf8([0x61, 0xC3, 0xA9, 0x80]), Is.EqualTo(3)); // é then a stray continuation
        Assert.That(TextInput.FindInvalidUtf8([0xED, 0xA0, 0x80]), Is.EqualTo(0));       // an encoded surrogate
        Assert.That(TextInput.FindInvalidUtf8([0x61, 0xF0, 0x9F, 0x98]), Is.EqualTo(1)); // a truncated 4-byte sequence
        Assert.That(TextInput.FindLoneSurrogateEscape("\"\\ud83d\\ude00\""u8), Is.EqualTo(-1)); // a pair
        Assert.That(TextInput.FindLoneSurrogateEscape("\"\\\\ud800\""u8), Is.EqualTo(-1));      // an escaped backslash, then text
        Assert.That(TextInput.FindLoneSurrogateEscape("\"x\\ud800\""u8), Is.EqualTo(2));
        Assert.That(TextInput.FindLoneSurrogateEscape("\"\\ud800\\u0041\""u8), Is.EqualTo(1));
        Assert.That(TextInput.FindLoneSurrogateEscape("\"\\n\\udc00\""u8), Is.EqualTo(3));
    }
}
