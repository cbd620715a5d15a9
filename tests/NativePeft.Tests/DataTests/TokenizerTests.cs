using System.Text.Json;
using NativePeft.Data;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

public class TokenizerTests
{
    private static string DataDir(params string[] parts) =>
        Path.Combine([TestContext.CurrentContext.TestDirectory, "Data", "tokenizers", .. parts]);

    [Test]
    public void ByteTokenizer_EncodesUtf8BytesAndSpecials()
    {
        var t = ByteTokenizer.Instance;
        Assert.That(t.VocabSize, Is.EqualTo(259));
        Assert.That((t.BosId, t.EosId, t.PadId), Is.EqualTo(((int?)256, (int?)257, (int?)258)));
        Assert.That(t.Encode("aé", addBos: true), Is.EqualTo(new[] { 256, 0x61, 0xC3, 0xA9 }));
        Assert.That(t.Encode("", addBos: false), Is.Empty);
        Assert.That(t.Decode([256, 0x68, 0x69, 257, 258]), Is.EqualTo("hi"));
        string s = "Héllo ☃ wörld\n\t";
        Assert.That(t.Decode(t.Encode(s, true)), Is.EqualTo(s));
        Assert.Throws<ArgumentOutOfRangeException>(() => t.Decode([259]));
    }

    [Test]
    public void Bpe_LoadsFolder_WithSpecialsFromTokenizerConfig()
    {
        var t = TokenizerLoader.Load(DataDir("bpe"));
        Assert.That(t, Is.InstanceOf<HfBpeTokenizer>());
        Assert.That(t.VocabSize, Is.EqualTo(303));
        Assert.That(t.BosId, Is.EqualTo(300));
        Assert.That(t.EosId, Is.EqualTo(301));
        Assert.That(t.PadId, Is.Null);
    }

    // Worked out by hand from gen_tokenizer_bpe.py: byte symbol id = its index in GPT-2's bytes_to_unicode order
    // (printable ASCII c → ord(c) − 33, space 'Ġ' → 220); merges Ġt=256 he=257 Ġthe=258 at=259 cat=260 Ġc=261
    // Ġcat=262 12=263 123=264 's=265 ll=266 ell=267 hell=268 hello=269 (rank = merge order).
    // Llama 3's regex splits "the cat's 12345 hello" into the | Ġcat | 's | Ġ | 123 | 45 | Ġhello:
    //   "the"    → t h e → (h e, rank 1) → t he                 → 83 257
    //   " cat"   → "Ġcat" is in the vocabulary (ignore_merges)  → 262   (plain BPE would give Ġ cat = 220 260)
    //   "'s"     → 265; " " → 220; "123" → 264 (the regex takes at most 3 digits); "45" → 19 20
    //   " hello" → Ġ h e l l o → he (rank 1) then ll (rank 10); "e ll" can no longer apply → 220 257 266 78
    [Test]
    public void Bpe_KnownEncodings_ByHand()
    {
        var t = TokenizerLoader.Load(DataDir("bpe"));
        Assert.That(t.Encode("the cat's 12345 hello", addBos: false),
            Is.EqualTo(new[] { 83, 257, 262, 265, 220, 264, 19, 20, 220, 257, 266, 78 }));
        Assert.That(t.Encode("hello", addBos: true), Is.EqualTo(new[] { 300, 269 }), "whole word in the vocabulary (ignore_merges)");
        Assert.That(t.Encode("cat", addBos: false), Is.EqualTo(new[] { 260 }));
        Assert.That(t.Encode("x<|end_of_text|>hi", addBos: false), Is.EqualTo(new[] { 'x' - 33, 301, 'h' - 33, 'i' - 33 }),
            "an added token in the text becomes its id");
        Assert.That(t.Encode("\n", addBos: false), Is.EqualTo(new[] { 198 }), "newline is GPT-2's Ċ = 198");
    }

    [Test]
    public void Bpe_RoundTrips_AndDropsSpecialsOnDecode()
    {
        var t = TokenizerLoader.Load(DataDir("bpe"));
        foreach (string s in new[] { "the cat sat", "Héllo wörld ☃ 😀", "a\n\n  b\t'll 9999", "" })
            Assert.That(t.Decode(t.Encode(s, addBos: true)), Is.EqualTo(s), s);
        Assert.That(t.Decode([300, 269, 301]), Is.EqualTo("hello"));
    }

    [Test]
    public void Bpe_SpecialsFromConfigJson_WhenNoTokenizerConfig()
    {
        string dir = TempDir();
        File.Copy(DataDir("bpe", "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        File.WriteAllText(Path.Combine(dir, "config.json"), "{\"bos_token_id\": 300, \"eos_token_id\": [302, 301], \"vocab_size\": 303}");
        var t = TokenizerLoader.FromFolder(dir);
        Assert.That((t.BosId, t.EosId), Is.EqualTo(((int?)300, (int?)302)));
    }

    [Test]
    public void Bpe_UnknownSpecialTokenNameInConfig_IsAnError()
    {
        string dir = TempDir();
        File.Copy(DataDir("bpe", "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{\"bos_token\": {\"content\": \"<s>\"}}");
        var e = Assert.Throws<InvalidDataException>(() => TokenizerLoader.FromFolder(dir));
        Assert.That(e!.Message, Does.Contain("<s>"));
    }

    [Test]
    public void SentencePiece_MatchesTheSentencepieceLibrary()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(DataDir("spm", "expected.json")));
        var exp = doc.RootElement;
        var t = TokenizerLoader.Load(DataDir("spm"));
        Assert.That(t, Is.InstanceOf<SentencePieceModelTokenizer>());
        Assert.That(t.VocabSize, Is.EqualTo(exp.GetProperty("vocab_size").GetInt32()));
        Assert.That(t.BosId, Is.EqualTo(exp.GetProperty("bos_id").GetInt32()));
        Assert.That(t.EosId, Is.EqualTo(exp.GetProperty("eos_id").GetInt32()));
        foreach (var c in exp.GetProperty("cases").EnumerateArray())
        {
            string text = c.GetProperty("text").GetString()!;
            int[] ids = c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.That(t.Encode(text, addBos: false), Is.EqualTo(ids), text);
            Assert.That(t.Encode(text, addBos: true), Is.EqualTo(ids.Prepend(1).ToArray()), text);
            Assert.That(t.Decode([1, .. ids, 2]), Is.EqualTo(c.GetProperty("decoded").GetString()), text);
        }
    }

    [Test]
    public void Folder_PrefersTokenizerJson_AndFallsBackToModelForNonByteLevelJson()
    {
        string both = TempDir();
        File.Copy(DataDir("bpe", "tokenizer.json"), Path.Combine(both, "tokenizer.json"));
        File.Copy(DataDir("spm", "tokenizer.model"), Path.Combine(both, "tokenizer.model"));
        Assert.That(TokenizerLoader.FromFolder(both), Is.InstanceOf<HfBpeTokenizer>());

        // A Llama-2-style tokenizer.json (Metaspace normalizer, byte_fallback) is not read: tokenizer.model is used.
        string llama2 = TempDir();
        File.WriteAllText(Path.Combine(llama2, "tokenizer.json"),
            "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": []}, \"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": [], \"byte_fallback\": true}}");
        File.Copy(DataDir("spm", "tokenizer.model"), Path.Combine(llama2, "tokenizer.model"));
        Assert.That(TokenizerLoader.FromFolder(llama2), Is.InstanceOf<SentencePieceModelTokenizer>());
        File.Delete(Path.Combine(llama2, "tokenizer.model"));
        Assert.Throws<NotSupportedException>(() => TokenizerLoader.FromFolder(llama2));
    }

    [Test]
    public void Folder_MarkedByteTokenizer_LoadsByteTokenizer()
    {
        string dir = TempDir();
        TokenizerLoader.WriteByteTokenizerConfig(dir);
        Assert.That(TokenizerLoader.FromFolder(dir), Is.SameAs(ByteTokenizer.Instance));
        Assert.Throws<FileNotFoundException>(() => TokenizerLoader.FromFolder(TempDir()));
    }

    private static string TempDir()
    {
        string d = Path.Combine(Path.GetTempPath(), "np-tok-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }
}
