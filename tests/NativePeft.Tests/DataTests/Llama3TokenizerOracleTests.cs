using System.Text.Json;
using System.Text.Json.Nodes;
using NativePeft.Data;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

/// <summary>
/// HfBpeTokenizer on Llama 3's tokenizer against ids from an independent implementation (the npm package
/// llama3-tokenizer-js 1.2.0, cross-checked there by a textbook BPE): tests/reference/gen_tokenizer_llama3.mjs wrote
/// Data/tokenizers/llama3-subset/{tokenizer.json, expected.json}. tokenizer.json is Llama 3's, with the vocabulary and
/// merges cut down to those the strings can reach (original ids and merge order; the script argues and checks why
/// that encodes the strings exactly as the full tokenizer does).
/// </summary>
public class Llama3TokenizerOracleTests
{
    // AppContext.BaseDirectory, not TestContext's TestDirectory: NUnit builds the cases before a test context exists.
    private static string DataFile(string name) =>
        Path.Combine(AppContext.BaseDirectory, "Data", "tokenizers", "llama3-subset", name);

    public sealed record Case(string Label, string Text, int[] Ids, string Decoded)
    {
        public override string ToString() => Label;
    }

    private static Case[] Cases()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(DataFile("expected.json")));
        return doc.RootElement.EnumerateArray().Select(e => new Case(
            e.GetProperty("label").GetString()!, e.GetProperty("text").GetString()!,
            e.GetProperty("ids").EnumerateArray().Select(i => i.GetInt32()).ToArray(),
            e.GetProperty("decoded").GetString()!)).ToArray();
    }

    private static IEnumerable<TestCaseData> EncodeCases() => Named("Llama3Oracle_Encode");
    private static IEnumerable<TestCaseData> DecodeCases() => Named("Llama3Oracle_Decode");
    private static IEnumerable<TestCaseData> Named(string what) =>
        Cases().Select(c => new TestCaseData(c).SetName($"{what}({c.Label})"));

    private static HfBpeTokenizer? s_tokenizer;
    private static HfBpeTokenizer Tokenizer => s_tokenizer ??= HfBpeTokenizer.FromFile(DataFile("tokenizer.json"));

    [TestCaseSource(nameof(EncodeCases))]
    public void Encode_MatchesIndependentImplementation(Case c)
    {
        Assert.That(Tokenizer.Encode(c.Text, addBos: false), Is.EqualTo(c.Ids), $"{c.Label}: {JsonSerializer.Serialize(c.Text)}");
    }

    [TestCaseSource(nameof(DecodeCases))]
    public void Decode_OfIndependentIds_GivesTheText(Case c)
    {
        // Byte-level round trip; special tokens are dropped on decode (as HF's skip_special_tokens).
        Assert.That(Tokenizer.Decode(c.Ids), Is.EqualTo(c.Decoded), c.Label);
    }

    // Negative controls: the oracle must see a planted defect in the tokenizer.json.

    [Test]
    public void PlantedDefect_DigitGroupsOfTwo_ChangesIds()
    {
        string json = File.ReadAllText(DataFile("tokenizer.json"));
        const string groups = @"\\p{N}{1,3}";   // as JSON escapes it
        Assert.That(json, Does.Contain(groups));
        AssertSomeCaseDiffers(json.Replace(groups, @"\\p{N}{1,2}"), "digits_1_to_10");
    }

    [Test]
    public void PlantedDefect_TwoMergesSwappedInRank_ChangesIds()
    {
        // "o n" (rank 16 in Llama 3) and "u l" (rank 157) compete for the letters around "monoul" in
        // "Pneumonoultramicroscopic…": with their ranks swapped BPE builds different tokens there.
        var doc = JsonNode.Parse(File.ReadAllText(DataFile("tokenizer.json")))!;
        var merges = doc["model"]!["merges"]!.AsArray();
        int i = IndexOf(merges, MergeA), j = IndexOf(merges, MergeB);
        Assert.That(i, Is.LessThan(j), "the two merges are in the subset, in Llama 3's order");
        (merges[i], merges[j]) = (merges[j]!.DeepClone(), merges[i]!.DeepClone());
        AssertSomeCaseDiffers(doc.ToJsonString(), Label);
    }

    [Test]
    public void PlantedDefect_IgnoreMergesOff_ChangesIds()
    {
        // Llama 3 has whole words in its vocabulary that its merges would not build (" dikkat" = 106350, BPE gives
        // " d" "ikk" "at"); ignore_merges takes the whole word.
        string json = File.ReadAllText(DataFile("tokenizer.json"));
        Assert.That(json, Does.Contain("\"ignore_merges\": true"));
        AssertSomeCaseDiffers(json.Replace("\"ignore_merges\": true", "\"ignore_merges\": false"), "whole_word_in_vocabulary");
    }

    private const string MergeA = "o n", MergeB = "u l", Label = "long_words";

    private static int IndexOf(JsonArray merges, string merge)
    {
        for (int k = 0; k < merges.Count; k++) if (merges[k]!.GetValue<string>() == merge) return k;
        return -1;
    }

    private static void AssertSomeCaseDiffers(string tokenizerJson, string label)
    {
        using var stream = new MemoryStream(System.Text.Encoding.UTF8.GetBytes(tokenizerJson));
        var planted = HfBpeTokenizer.FromStream(stream);
        Case c = Cases().Single(x => x.Label == label);
        Assert.That(Tokenizer.Encode(c.Text, false), Is.EqualTo(c.Ids), "the unmodified tokenizer agrees");
        Assert.That(planted.Encode(c.Text, false), Is.Not.EqualTo(c.Ids), $"{label}: the planted defect must change the ids");
    }
}
