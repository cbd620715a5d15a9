using System.Text;
using NativePeft.IO;
using NativePeft.Numerics;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

public class SafetensorsTests
{
    private string _dir = "";

    [SetUp]
    public void SetUp()
    {
        _dir = Path.Combine(Path.GetTempPath(), "np-st-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_dir);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    /// <summary>8-byte little-endian header length, the header text, then the data bytes.</summary>
    private string HandFile(string name, string header, byte[] data, long? headerLengthOverride = null)
    {
        byte[] h = Encoding.UTF8.GetBytes(header);
        var bytes = new List<byte>();
        bytes.AddRange(BitConverter.GetBytes(headerLengthOverride ?? h.LongLength));
        bytes.AddRange(h);
        bytes.AddRange(data);
        string path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, bytes.ToArray());
        return path;
    }

    [Test]
    public void HandBuiltFileParses()
    {
        // F32 [2] = 1.5, -2.0 (0x3FC00000, 0xC0000000 little-endian), then U8 [2, 1] = 7, 9; metadata after the tensors.
        byte[] data = [0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0, 7, 9];
        string path = HandFile("hand.safetensors",
            "{\"b\":{\"dtype\":\"U8\",\"shape\":[2,1],\"data_offsets\":[8,10]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"__metadata__\":{\"format\":\"pt\"}}  ",
            data);
        using var f = SafetensorsFile.Open(path);
        Assert.That(f.Tensors.Select(t => t.Name), Is.EqualTo(new[] { "a", "b" }), "sorted by offset");
        Assert.That(f.GetSpan<float>("a").ToArray(), Is.EqualTo(new[] { 1.5f, -2f }));
        Assert.That(f.GetInfo("b").Shape, Is.EqualTo(new long[] { 2, 1 }));
        Assert.That(f.GetBytes("b").ToArray(), Is.EqualTo(new byte[] { 7, 9 }));
        Assert.That(f.Metadata, Is.EqualTo(new Dictionary<string, string> { ["format"] = "pt" }));
        var ex = Assert.Throws<SafetensorsException>(() => f.GetSpan<Half>("a"));
        Assert.That(ex!.Message, Does.Contain(path).And.Contain("a"));
    }

    [Test]
    public void WriterHeaderIsCompactAndPaddedToEight()
    {
        string path = Path.Combine(_dir, "w.safetensors");
        SafetensorsWriter.Write(path, [SafetensorsTensor.From("t", [3], new byte[] { 1, 2, 3 })]);
        byte[] bytes = File.ReadAllBytes(path);
        string json = "{\"t\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}"; // 53 bytes → padded to 56
        ulong n = BitConverter.ToUInt64(bytes, 0);
        Assert.That(n, Is.EqualTo(56UL));
        Assert.That(Encoding.UTF8.GetString(bytes, 8, 56), Is.EqualTo(json + "   "));
        Assert.That(bytes[64..], Is.EqualTo(new byte[] { 1, 2, 3 }));
    }

    [Test]
    public void RoundTripAllDtypesAndMetadata()
    {
        string path = Path.Combine(_dir, "rt.safetensors");
        float[] f32 = [1f, -2.5f, 3.25f, 0f, float.Epsilon, -0f];
        BFloat16[] bf = [(BFloat16)1.5f, (BFloat16)(-3f)];
        Half[] h = [(Half)0.5f, (Half)(-1f), (Half)65504f];
        long[] i64 = [long.MinValue, 42];
        var meta = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcode \"quoted\"" };
        SafetensorsWriter.Write(path,
        [
            SafetensorsTensor.From("model.w", [2, 3], f32),
            SafetensorsTensor.From("bf", [2], bf),
            SafetensorsTensor.From("h", [3], h),
            SafetensorsTensor.From("i", [2], i64),
            SafetensorsTensor.From("empty", [0, 4], Array.Empty<float>()),
            SafetensorsTensor.From("scalar", [], new byte[] { 5 }),
        ], meta);
        using var f = SafetensorsFile.Open(path);
        Assert.That(f.Tensors.Select(t => t.Name), Is.EqualTo(new[] { "model.w", "bf", "h", "i", "empty", "scalar" }));
        Assert.That(f.ReadArray<float>("model.w"), Is.EqualTo(f32));
        Assert.That(f.GetInfo("model.w").Shape, Is.EqualTo(new long[] { 2, 3 }));
        Assert.That(f.ReadArray<BFloat16>("bf").Select(v => v.RawValue), Is.EqualTo(bf.Select(v => v.RawValue)));
        Assert.That(f.ReadArray<Half>("h"), Is.EqualTo(h));
        Assert.That(f.ReadArray<long>("i"), Is.EqualTo(i64));
        Assert.That(f.GetBytes("empty").Length, Is.EqualTo(0));
        Assert.That(f.GetInfo("scalar").Shape, Is.Empty);
        Assert.That(f.Metadata, Is.EqualTo(meta));
        Assert.That(f.GetMemory("i").Length, Is.EqualTo(16));
        Assert.That((8 + (long)BitConverter.ToUInt64(File.ReadAllBytes(path), 0)) % 8, Is.EqualTo(0), "data starts 8-aligned");
        Assert.That(Directory.GetFiles(_dir), Has.Length.EqualTo(1), "no temp file left");
    }

    private const string A4 = "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}";

    private static IEnumerable<TestCaseData> Malformed()
    {
        yield return new TestCaseData("{" + A4.Replace("[0,4]", "[0,8]") + "}", 4, null, "outside the buffer").SetName("OffsetsPastBuffer");
        yield return new TestCaseData("{" + A4.Replace("[0,4]", "[4,0]") + "}", 4, null, "end before begin").SetName("EndBeforeBegin");
        yield return new TestCaseData("{" + A4.Replace("[1]", "[2]") + "}", 4, null, "size mismatch").SetName("SizeMismatch");
        yield return new TestCaseData("{" + A4.Replace("[0,4]", "[0,8]").Replace("[1]", "[2]") + ",\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, null, "overlap").SetName("Overlapping");
        yield return new TestCaseData("{" + A4.Replace("F32", "F31") + "}", 4, null, "unknown dtype").SetName("UnknownDtype");
        yield return new TestCaseData("{" + A4 + ",\"__metadata__\":{\"k\":1}}", 4, null, "metadata value").SetName("MetadataNotString");
        yield return new TestCaseData("{" + A4 + ",\"__metadata__\":[\"k\"]}", 4, null, "metadata array").SetName("MetadataNotObject");
        yield return new TestCaseData("{\"a\":{\"dtype\":\"F32\",", 4, null, "invalid json").SetName("InvalidJson");
        yield return new TestCaseData("[]", 0, null, "not an object").SetName("HeaderNotObject");
        yield return new TestCaseData("{" + A4 + "}", 4, 1000L, "header past EOF").SetName("HeaderPastEof");
        yield return new TestCaseData("{" + A4 + "}", 4, 200_000_000L, "header too large").SetName("HeaderTooLarge");
        yield return new TestCaseData("{" + A4 + "}", 12, null, "trailing bytes").SetName("BufferNotCovered");
        yield return new TestCaseData("{" + A4.Replace("[1]", "[-1]") + "}", 4, null, "negative dim").SetName("NegativeDimension");
    }

    [TestCaseSource(nameof(Malformed))]
    public void MalformedFileThrowsNamingTheFile(string header, int dataBytes, long? headerLength, string why)
    {
        string path = HandFile("bad.safetensors", header, new byte[dataBytes], headerLength);
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path).Dispose(), why);
        Assert.That(ex!.FilePath, Is.EqualTo(path));
        Assert.That(ex.Message, Does.StartWith(path));
        TestContext.Out.WriteLine(ex.Message);
    }

    [Test]
    public void ShortFileThrows()
    {
        string path = Path.Combine(_dir, "short.safetensors");
        File.WriteAllBytes(path, [1, 2, 3, 4]);
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path));
        Assert.That(ex!.Message, Does.Contain(path).And.Contain("shorter"));
    }

    [Test]
    public void MissingFileThrows()
    {
        string path = Path.Combine(_dir, "nope.safetensors");
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path));
        Assert.That(ex!.FilePath, Is.EqualTo(path));
    }

    [Test]
    public void WriterFailureLeavesNothingAtThePath()
    {
        string missingDir = Path.Combine(_dir, "no", "such", "dir", "x.safetensors");
        Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(missingDir, [SafetensorsTensor.From("t", [1], new float[] { 1 })]));
        Assert.That(File.Exists(missingDir), Is.False);

        string path = Path.Combine(_dir, "x.safetensors");
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(path,
        [
            SafetensorsTensor.From("ok", [1], new float[] { 1 }),
            new SafetensorsTensor("bad", DType.F32, [3], new byte[8]),
        ]));
        Assert.That(ex!.Message, Does.Contain(path).And.Contain("bad"));
        Assert.That(File.Exists(path), Is.False);
        Assert.That(Directory.GetFiles(_dir), Is.Empty, "no temp file left");

        Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(path,
            [SafetensorsTensor.From("t", [1], new float[] { 1 }), SafetensorsTensor.From("t", [1], new float[] { 2 })]));
        Assert.That(Directory.GetFiles(_dir), Is.Empty);
    }

    [Test]
    public void FailedOverwriteKeepsTheOldFile()
    {
        string path = Path.Combine(_dir, "x.safetensors");
        SafetensorsWriter.Write(path, [SafetensorsTensor.From("old", [1], new float[] { 7 })]);
        Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(path, [new SafetensorsTensor("bad", DType.F32, [2], new byte[4])]));
        using var f = SafetensorsFile.Open(path);
        Assert.That(f.ReadArray<float>("old"), Is.EqualTo(new[] { 7f }));
        Assert.That(Directory.GetFiles(_dir), Has.Length.EqualTo(1));
    }
}
