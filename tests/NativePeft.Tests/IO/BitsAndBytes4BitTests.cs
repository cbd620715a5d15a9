using System.Text;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

public class BitsAndBytes4BitTests
{
    private string _dir = "";

    [SetUp]
    public void SetUp()
    {
        _dir = Path.Combine(Path.GetTempPath(), "np-bnb-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_dir);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    // Expected strings: what CPython 3's repr(float) prints for these doubles.
    [TestCase(0.02452392503619194, "0.02452392503619194")]
    [TestCase(1e-05, "1e-05")]
    [TestCase(0.0001, "0.0001")]
    [TestCase(0.0123, "0.0123")]
    [TestCase(1.0, "1.0")]
    [TestCase(123.0, "123.0")]
    [TestCase(1e16, "1e+16")]
    [TestCase(1234567890123456.0, "1234567890123456.0")]
    [TestCase(1.5e-07, "1.5e-07")]
    [TestCase(-2.5, "-2.5")]
    [TestCase(0.0, "0.0")]
    [TestCase(1.7976931348623157e308, "1.7976931348623157e+308")]
    public void FloatReprMatchesPython(double value, string expected)
        => Assert.That(PythonJson.FloatRepr(value), Is.EqualTo(expected));

    [Test]
    public void Fp32OffsetIsPrintedAsItsDoubleValue()
        => Assert.That(PythonJson.FloatRepr(0.1f), Is.EqualTo("0.10000000149011612")); // float(torch.tensor(0.1)) in Python

    [Test]
    public void QuantStateJsonHasBitsandbytesKeyOrderAndSeparators()
    {
        var x = Enumerable.Range(0, 128).Select(i => (float)Math.Sin(i)).ToArray();
        var plain = Quantized4BitTensor.Quantize<float>(x, [2, 64], QuantType.Nf4, 64, false, DType.BF16);
        Assert.That(BitsAndBytes4Bit.QuantStateJson(plain.State),
            Is.EqualTo("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, 64]}"));
        var dq = Quantized4BitTensor.Quantize<float>(x, [2, 64], QuantType.Fp4, 64, true, DType.F16);
        string offset = PythonJson.FloatRepr(dq.State.Nested!.Offset);
        Assert.That(BitsAndBytes4Bit.QuantStateJson(dq.State),
            Is.EqualTo("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [2, 64], " +
                       "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " + offset + "}"));
        Assert.That((float)double.Parse(offset, System.Globalization.CultureInfo.InvariantCulture), Is.EqualTo(dq.State.Nested.Offset));
    }

    [TestCase(QuantType.Nf4, false)]
    [TestCase(QuantType.Nf4, true)]
    [TestCase(QuantType.Fp4, false)]
    [TestCase(QuantType.Fp4, true)]
    public void SaveLoadRoundTrip(QuantType qt, bool doubleQuant)
    {
        var rng = new Random(2);
        const int rows = 33, cols = 96; // n = 3168: 49.5 blocks of 64 → 50 blocks
        var x = new BFloat16[rows * cols];
        for (int i = 0; i < x.Length; i++) x[i] = (BFloat16)(float)(rng.NextDouble() - 0.5);
        var t = Quantized4BitTensor.Quantize<BFloat16>(x, [rows, cols], qt, 64, doubleQuant, DType.BF16);
        string path = Path.Combine(_dir, "q.safetensors");
        BitsAndBytes4Bit.Save(path, "model.layers.0.self_attn.q_proj", t);

        using var f = SafetensorsFile.Open(path);
        string w = "model.layers.0.self_attn.q_proj.weight";
        var expectedKeys = doubleQuant
            ? new[] { w, w + ".absmax", w + ".quant_map", w + ".nested_absmax", w + ".nested_quant_map", w + ".quant_state.bitsandbytes__" + qt.Name() }
            : new[] { w, w + ".absmax", w + ".quant_map", w + ".quant_state.bitsandbytes__" + qt.Name() };
        Assert.That(f.Tensors.Select(i => i.Name), Is.EqualTo(expectedKeys));
        Assert.That(f.GetInfo(w).Shape, Is.EqualTo(new long[] { rows * cols / 2, 1 }));
        Assert.That(f.GetInfo(w + ".absmax").DType, Is.EqualTo(doubleQuant ? DType.U8 : DType.F32));
        Assert.That(f.GetInfo(w + ".absmax").Shape, Is.EqualTo(new long[] { 50 }));
        Assert.That(f.GetInfo(w + ".quant_map").Shape, Is.EqualTo(new long[] { 16 }));
        if (doubleQuant)
        {
            Assert.That(f.GetInfo(w + ".nested_absmax").Shape, Is.EqualTo(new long[] { 1 }));
            Assert.That(f.ReadArray<float>(w + ".nested_quant_map"), Is.EqualTo(DynamicMap.Signed.ToArray()));
        }
        string json = Encoding.UTF8.GetString(f.GetBytes(w + ".quant_state.bitsandbytes__" + qt.Name()));
        Assert.That(json, Is.EqualTo(BitsAndBytes4Bit.QuantStateJson(t.State)));
        Assert.That(BitsAndBytes4Bit.Contains(f, "model.layers.0.self_attn.q_proj."), Is.True);

        var back = BitsAndBytes4Bit.Load(f, "model.layers.0.self_attn.q_proj.");
        Assert.That(back.Packed, Is.EqualTo(t.Packed));
        Assert.That(back.State.QuantType, Is.EqualTo(qt));
        Assert.That(back.State.Blocksize, Is.EqualTo(64));
        Assert.That(back.State.Dtype, Is.EqualTo(DType.BF16));
        Assert.That(back.State.Shape, Is.EqualTo(new long[] { rows, cols }));
        Assert.That(back.State.QuantMap, Is.EqualTo(FourBitCode.QuantMap(qt)));
        Assert.That(back.State.GetAbsmax(), Is.EqualTo(t.State.GetAbsmax()));
        Assert.That(back.DequantizeToBFloat16().Select(v => v.RawValue), Is.EqualTo(t.DequantizeToBFloat16().Select(v => v.RawValue)));
    }

    [Test]
    public void ANonFiniteAbsmaxIsRefusedNamingTheKey()
    {
        var x = new float[128];
        x[3] = 1;
        var t = Quantized4BitTensor.Quantize<float>(x, [2, 64], QuantType.Nf4, 64, false, DType.F32);
        var tensors = BitsAndBytes4Bit.ToTensors("m", t).Select(s =>
            s.Name == "m.weight.absmax" ? SafetensorsTensor.From(s.Name, s.Shape, new[] { 1f, float.NaN }) : s).ToList();
        string path = Path.Combine(_dir, "nan-absmax.safetensors");
        SafetensorsWriter.Write(path, tensors);
        using var f = SafetensorsFile.Open(path);
        var e = Assert.Throws<SafetensorsException>(() => BitsAndBytes4Bit.Load(f, "m"))!;
        Assert.That(e.Message, Does.Contain("m.weight.absmax").And.Contain("element 1 is NaN"));
    }

    /// <summary>Writes a plain NF4 weight whose JSON is replaced, then loads it.</summary>
    private SafetensorsException LoadWithJson(string json, string? weightKeySuffix = "nf4", int packedBytes = 64)
    {
        var x = new float[128];
        x[3] = 1;
        var t = Quantized4BitTensor.Quantize<float>(x, [2, 64], QuantType.Nf4, 64, false, DType.F32);
        var tensors = BitsAndBytes4Bit.ToTensors("m", t).Where(s => !s.Name.Contains("quant_state")).ToList();
        if (packedBytes != 64)
            tensors[0] = new SafetensorsTensor("m.weight", DType.U8, [packedBytes, 1], new byte[packedBytes]);
        byte[] j = Encoding.UTF8.GetBytes(json);
        tensors.Add(new SafetensorsTensor("m.weight.quant_state.bitsandbytes__" + weightKeySuffix, DType.U8, [j.Length], j));
        string path = Path.Combine(_dir, Guid.NewGuid().ToString("N") + ".safetensors");
        SafetensorsWriter.Write(path, tensors);
        using var f = SafetensorsFile.Open(path);
        var ex = Assert.Throws<SafetensorsException>(() => BitsAndBytes4Bit.Load(f, "m"))!;
        Assert.That(ex.FilePath, Is.EqualTo(path));
        TestContext.Out.WriteLine(ex.Message);
        return ex;
    }

    [Test]
    public void LoadValidatesTheQuantState()
    {
        const string ok = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 64]}";
        Assert.That(LoadWithJson(ok.Replace("\"nf4\"", "\"int4\"")).Message, Does.Contain("quant_type"));
        Assert.That(LoadWithJson(ok.Replace("\"nf4\"", "\"fp4\"")).Message, Does.Contain("key suffix"));
        Assert.That(LoadWithJson(ok.Replace("64,", "48,")).Message, Does.Contain("blocksize"));
        Assert.That(LoadWithJson(ok.Replace("float32", "int8")).Message, Does.Contain("dtype"));
        Assert.That(LoadWithJson(ok.Replace("[2, 64]", "[2, 66]")).Message, Does.Contain("m.weight"));
        Assert.That(LoadWithJson(ok, packedBytes: 65).Message, Does.Contain("packed bytes"));
        Assert.That(LoadWithJson("{\"quant_type\": ").Message, Does.Contain("JSON"));
        Assert.That(LoadWithJson(ok.Replace("}", ", \"nested_offset\": 0.5, \"nested_blocksize\": 256}")).Message, Does.Contain("nested_absmax"));
    }
}
