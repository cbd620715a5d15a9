using NativePeft.Data;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

public class DatasetTests
{
    private const int M = TrainingExample.IgnoreIndex;
    private static readonly ByteTokenizer Bt = ByteTokenizer.Instance;

    private static string Write(string content, string ext = ".jsonl")
    {
        string p = Path.Combine(Path.GetTempPath(), "np-data-" + Guid.NewGuid().ToString("N") + ext);
        File.WriteAllText(p, content);
        return p;
    }

    [Test]
    public void PreTokenized_ReadsIdsAndLabels_SkipsBlankLines()
    {
        string p = Write("{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [4, 5], \"labels\": [-100, 5]}\n");
        var d = DatasetLoader.Load(p, DataFormat.Auto, Bt, 16);
        Assert.That(d.Count, Is.EqualTo(2));
        Assert.That(d[0].InputIds, Is.EqualTo(new[] { 1, 2, 3 }));
        Assert.That(d[0].Labels, Is.EqualTo(new[] { 1, 2, 3 }));
        Assert.That(d[1].Labels, Is.EqualTo(new[] { M, 5 }));
    }

    [TestCase("{\"input_ids\": [1]}\n{\"input_ids\": [1,}\n", 2, "invalid JSON")]
    [TestCase("{\"input_ids\": [1]}\n\n{\"labels\": [1]}\n", 3, "missing \"input_ids\"")]
    [TestCase("{\"input_ids\": [1, 2], \"labels\": [1]}\n", 1, "\"labels\" has 1 entries, \"input_ids\" has 2")]
    [TestCase("{\"input_ids\": [1]}\n{\"input_ids\": [259]}\n", 2, "input_ids[0] = 259 is outside the vocabulary [0, 259)")]
    [TestCase("{\"input_ids\": [1, 2], \"labels\": [-1, 2]}\n", 1, "labels[0] = -1")]
    [TestCase("{\"input_ids\": [1.5]}\n", 1, "input_ids[0] is not an integer")]
    public void PreTokenized_ErrorsNameTheLine(string content, int line, string what)
    {
        string p = Write(content);
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.PreTokenizedJsonl(p, 259));
        Assert.That(e!.LineNumber, Is.EqualTo(line));
        Assert.That(e.Message, Does.StartWith($"{p}:{line}: "));
        Assert.That(e.Message, Does.Contain(what));
    }

    [Test]
    public void PreTokenized_IdsAreCheckedAgainstTheModelsVocabSizeWhenGiven()
    {
        // The byte tokenizer has 259 ids; a model whose vocab_size is 300 takes 299 and refuses 300.
        string ok = Write("{\"input_ids\": [299, 258, 260], \"labels\": [-100, 258, 299]}\n");
        var d = DatasetLoader.Load(ok, DataFormat.Auto, Bt, 16, vocabSize: 300);
        Assert.That(d[0].InputIds, Is.EqualTo(new[] { 299, 258, 260 }));
        Assert.That(d[0].Labels, Is.EqualTo(new[] { M, 258, 299 }));
        string bad = Write("{\"input_ids\": [1]}\n{\"input_ids\": [1, 300]}\n");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(bad, DataFormat.Auto, Bt, 16, vocabSize: 300))!;
        Assert.That(e.Message, Does.StartWith($"{bad}:2: ").And.Contain("input_ids[1] = 300 is outside the vocabulary [0, 300)"));
        Assert.Throws<DataFormatException>(() => DatasetLoader.Load(ok, DataFormat.Auto, Bt, 16), "without vocabSize: the tokenizer's 259");
    }

    [Test]
    public void TextFormatsWithTheIdsOnlyTokenizerNameTheMissingTokenizerFiles()
    {
        var ids = new IdsOnlyTokenizer("/models/m", 300);
        string text = Write("{\"text\": \"hello\"}\n");
        var e = Assert.Throws<FileNotFoundException>(() => DatasetLoader.Load(text, DataFormat.Auto, ids, 16))!;
        Assert.That(e.Message, Does.StartWith("/models/m has no tokenizer.json or tokenizer.model").And.Contain(text));
        string pre = Write("{\"input_ids\": [299]}\n");
        Assert.That(DatasetLoader.Load(pre, DataFormat.Auto, ids, 16)[0].InputIds, Is.EqualTo(new[] { 299 }), "pre-tokenized: the stand-in's 300 ids");
    }

    [Test]
    public void BadLines_SkipPolicy_CountsThem()
    {
        string p = Write("{\"input_ids\": [1]}\nnot json\n{\"input_ids\": [999]}\n{\"input_ids\": [2]}\n");
        var d = DatasetLoader.PreTokenizedJsonl(p, 259, BadLinePolicy.Skip);
        Assert.That(d.Count, Is.EqualTo(2));
        Assert.That(d.SkippedLines, Is.EqualTo(2));
        Assert.That(d.SkippedMessages[0], Does.Contain(":2:"));
        Assert.That(d.SkippedMessages[1], Does.Contain(":3:"));
    }

    [Test]
    public void PlainText_PackedIntoFixedLengthSequences()
    {
        string p = Write("abcdefg", ".txt");
        var d = DatasetLoader.Load(p, DataFormat.Auto, Bt, 4);
        Assert.That(d.Count, Is.EqualTo(2));
        Assert.That(d[0].InputIds, Is.EqualTo(new[] { 256, 'a', 'b', 'c' }));
        Assert.That(d[1].InputIds, Is.EqualTo(new[] { (int)'d', 'e', 'f', 'g' }));
        Assert.That(d[1].Labels, Is.EqualTo(d[1].InputIds));
    }

    [Test]
    public void TextJsonl_DocumentsPackedWithEosBetween()
    {
        string p = Write("{\"text\": \"ab\"}\n{\"text\": \"cd\"}\n");
        var d = DatasetLoader.Load(p, DataFormat.Auto, Bt, 3);
        Assert.That(d.Examples.Select(e => e.InputIds), Is.EqualTo(new[]
        {
            new[] { 256, 'a', 'b' }, new[] { 257, 256, 'c' }, new[] { (int)'d', 257 },
        }));
        var e2 = Assert.Throws<DataFormatException>(() => DatasetLoader.TextJsonl(Write("{\"text\": \"a\"}\n{\"txt\": \"b\"}\n"), Bt, 8));
        Assert.That(e2!.LineNumber, Is.EqualTo(2));
    }

    [Test]
    public void Alpaca_TemplateIsStanfordAlpacas()
    {
        Assert.That(AlpacaFormat.Prompt("Add.", "1 2"), Is.EqualTo(
            "Below is an instruction that describes a task, paired with an input that provides further context. " +
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:"));
        Assert.That(AlpacaFormat.Prompt("Say hi.", ""), Is.EqualTo(
            "Below is an instruction that describes a task. " +
            "Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:"));
        Assert.That(AlpacaFormat.Prompt("{input}", "x"), Does.Contain("### Instruction:\n{input}\n"), "fields are not re-substituted");
    }

    [Test]
    public void Alpaca_LabelsMaskExactlyThePrompt()
    {
        string p = Write("{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"hi\"}\n" +
                         "{\"instruction\": \"Add.\", \"input\": \"1 2\", \"output\": \"3\"}\n");
        var d = DatasetLoader.Load(p, DataFormat.Auto, Bt, 512);
        Assert.That(d.Count, Is.EqualTo(2));
        for (int i = 0; i < 2; i++)
        {
            string prompt = i == 0 ? AlpacaFormat.Prompt("Say hi.", null) : AlpacaFormat.Prompt("Add.", "1 2");
            string output = i == 0 ? "hi" : "3";
            int promptLen = 1 + System.Text.Encoding.UTF8.GetByteCount(prompt);   // bos + bytes
            var ex = d[i];
            Assert.That(ex.InputIds, Is.EqualTo(Bt.Encode(prompt + output, true).Append(257).ToArray()));
            Assert.That(ex.Labels.Take(promptLen), Is.All.EqualTo(M));
            Assert.That(ex.Labels.Skip(promptLen), Is.EqualTo(ex.InputIds.Skip(promptLen)), "response and eos carry the loss");
            Assert.That(ex.Labels[^1], Is.EqualTo(257));
            Assert.That(ex.Labels.Count(l => l != M), Is.EqualTo(output.Length + 1));
        }
    }

    [Test]
    public void Alpaca_JsonArrayFile_AndErrorsNameTheRecord()
    {
        string p = Write("[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"c\"}\n]", ".json");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(p, DataFormat.Auto, Bt, 64));
        Assert.That(e!.LineNumber, Is.EqualTo(2));
        Assert.That(e.Message, Does.Contain("missing \"output\""));
        var d = DatasetLoader.Alpaca(p, Bt, BadLinePolicy.Skip);
        Assert.That((d.Count, d.SkippedLines), Is.EqualTo((1, 1)));
    }

    [Test]
    public void Alpaca_WithBpe_MasksThePromptsOwnTokens()
    {
        var t = TokenizerLoader.Load(Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "tokenizers", "bpe"));
        var ex = AlpacaFormat.Build(t, "Greet.", "", " hello");
        int[] prompt = t.Encode(AlpacaFormat.Prompt("Greet.", ""), true);
        Assert.That(ex.InputIds.Take(prompt.Length), Is.EqualTo(prompt));
        Assert.That(ex.InputIds.Skip(prompt.Length), Is.EqualTo(new[] { 220, 257, 266, 78, 301 }));
        Assert.That(ex.Labels.Take(prompt.Length), Is.All.EqualTo(M));
        Assert.That(ex.Labels.Skip(prompt.Length), Is.EqualTo(new[] { 220, 257, 266, 78, 301 }));
    }

    [Test]
    public void DetectFormat_ByFirstRecord()
    {
        Assert.That(DatasetLoader.DetectFormat(Write("{\"input_ids\": [1]}")), Is.EqualTo(DataFormat.PreTokenized));
        Assert.That(DatasetLoader.DetectFormat(Write("\n{\"instruction\": \"x\"}")), Is.EqualTo(DataFormat.Alpaca));
        Assert.That(DatasetLoader.DetectFormat(Write("{\"text\": \"x\"}")), Is.EqualTo(DataFormat.TextJsonl));
        Assert.That(DatasetLoader.DetectFormat(Write("x", ".txt")), Is.EqualTo(DataFormat.PlainText));
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.DetectFormat(Write("\n{\"foo\": 1}")));
        Assert.That(e!.LineNumber, Is.EqualTo(2));
    }
}
