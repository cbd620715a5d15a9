using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using NativePeft.Numerics;
using NativePeft.Quantization;

namespace NativePeft.IO;

/// <summary>
/// bitsandbytes' serialization of a 4-bit tensor in a state dict (QuantState.as_dict(packed=True)): under a module
/// prefix, <c>weight</c> (uint8 [(n+1)/2, 1]), <c>weight.absmax</c> (float32, or uint8 with double quant),
/// <c>weight.quant_map</c> (float32 [16]), <c>weight.nested_absmax</c>, <c>weight.nested_quant_map</c> (double quant
/// only) and <c>weight.quant_state.bitsandbytes__nf4</c> / <c>__fp4</c> (uint8 bytes of a UTF-8 JSON written by
/// json.dumps with default separators).
/// </summary>
public static class BitsAndBytes4Bit
{
    /// <summary>"model.layers.0.mlp.down_proj" or "model.layers.0.mlp.down_proj." → "model.layers.0.mlp.down_proj."; "" stays "".</summary>
    public static string NormalizePrefix(string modulePrefix)
        => modulePrefix.Length == 0 || modulePrefix.EndsWith('.') ? modulePrefix : modulePrefix + ".";

    /// <summary>The tensors to write for <paramref name="tensor"/> under <paramref name="modulePrefix"/>, in bitsandbytes' order.</summary>
    public static IReadOnlyList<SafetensorsTensor> ToTensors(string modulePrefix, Quantized4BitTensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        QuantState4Bit s = tensor.State;
        s.Validate();
        string w = NormalizePrefix(modulePrefix) + "weight";
        long n = s.ElementCount;
        if (tensor.Packed.LongLength != Quant4Bit.PackedLength(n))
            throw new ArgumentException($"{w}: packed has {tensor.Packed.Length} bytes, expected {Quant4Bit.PackedLength(n)}");
        var list = new List<SafetensorsTensor>
        {
            new(w, DType.U8, [Quant4Bit.PackedLength(n), 1], tensor.Packed),
        };
        if (s.Nested is { } nested)
        {
            list.Add(new(w + ".absmax", DType.U8, [nested.QuantizedAbsmax.Length], nested.QuantizedAbsmax));
            list.Add(F32(w + ".quant_map", s.QuantMap));
            list.Add(F32(w + ".nested_absmax", nested.NestedAbsmax));
            list.Add(F32(w + ".nested_quant_map", nested.NestedQuantMap));
        }
        else
        {
            list.Add(F32(w + ".absmax", s.Absmax!));
            list.Add(F32(w + ".quant_map", s.QuantMap));
        }
        byte[] json = Encoding.UTF8.GetBytes(QuantStateJson(s));
        list.Add(new(w + ".quant_state.bitsandbytes__" + s.QuantType.Name(), DType.U8, [json.Length], json));
        return list;
    }

    private static SafetensorsTensor F32(string name, float[] values)
        => new(name, DType.F32, [values.Length], MemoryMarshal.AsBytes(values.AsSpan()).ToArray());

    /// <summary>
    /// The JSON bitsandbytes writes: {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4096, 11008]
    /// [, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": &lt;repr of the fp32 offset as a double&gt;]}.
    /// </summary>
    public static string QuantStateJson(QuantState4Bit s)
    {
        var sb = new StringBuilder();
        sb.Append("{\"quant_type\": ").Append(PythonJson.String(s.QuantType.Name()));
        sb.Append(", \"blocksize\": ").Append(s.Blocksize);
        sb.Append(", \"dtype\": ").Append(PythonJson.String(s.Dtype.TorchName()));
        sb.Append(", \"shape\": [").Append(string.Join(", ", s.Shape)).Append(']');
        if (s.Nested is { } nested)
        {
            sb.Append(", \"nested_blocksize\": ").Append(nested.NestedBlockSize);
            sb.Append(", \"nested_dtype\": \"float32\"");
            sb.Append(", \"nested_offset\": ").Append(PythonJson.FloatRepr(nested.Offset));
        }
        return sb.Append('}').ToString();
    }

    /// <summary>Whether <paramref name="file"/> holds a bitsandbytes 4-bit weight under the prefix.</summary>
    public static bool Contains(SafetensorsFile file, string modulePrefix)
    {
        string w = NormalizePrefix(modulePrefix) + "weight";
        return file.Contains(w + ".quant_state.bitsandbytes__nf4") || file.Contains(w + ".quant_state.bitsandbytes__fp4");
    }

    /// <summary>Writes one quantized tensor to a new safetensors file (atomically).</summary>
    public static void Save(string path, string modulePrefix, Quantized4BitTensor tensor, IReadOnlyDictionary<string, string>? metadata = null)
        => SafetensorsWriter.Write(path, ToTensors(modulePrefix, tensor), metadata);

    /// <summary>Reads and validates the 4-bit weight under <paramref name="modulePrefix"/>; errors are SafetensorsException naming the file and key.</summary>
    public static Quantized4BitTensor Load(SafetensorsFile file, string modulePrefix)
    {
        ArgumentNullException.ThrowIfNull(file);
        string w = NormalizePrefix(modulePrefix) + "weight";
        string? stateKey = null;
        QuantType keyType = default;
        foreach (QuantType qt in new[] { QuantType.Nf4, QuantType.Fp4 })
        {
            string k = w + ".quant_state.bitsandbytes__" + qt.Name();
            if (file.Contains(k))
            {
                if (stateKey is not null)
                    throw new SafetensorsException(file.Path, k, "both nf4 and fp4 quant states are present");
                stateKey = k;
                keyType = qt;
            }
        }
        if (stateKey is null)
            throw new SafetensorsException(file.Path, w + ".quant_state.bitsandbytes__nf4", "no bitsandbytes 4-bit quant state");

        SafetensorsException Bad(string key, string problem) => new(file.Path, key, problem);

        // --- the JSON
        Require(file, stateKey, DType.U8);
        byte[] jsonBytes = file.ReadArray<byte>(stateKey);
        QuantType quantType;
        int blocksize;
        DType dtype;
        long[] shape;
        int? nestedBlocksize = null;
        float? nestedOffset = null;
        bool hasNestedKeys;
        try
        {
            using JsonDocument doc = TextInput.ParseJson(jsonBytes, (problem, inner) => Bad(stateKey, $"quant state JSON: {problem}"));
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw Bad(stateKey, "quant state JSON must be an object");
            string qtName = GetString(root, "quant_type") ?? throw Bad(stateKey, "quant_type missing or not a string");
            if (!QuantTypes.TryParse(qtName, out quantType))
                throw Bad(stateKey, $"quant_type \"{qtName}\" is not nf4 or fp4");
            if (quantType != keyType)
                throw Bad(stateKey, $"quant_type \"{qtName}\" does not match the key suffix {keyType.Name()}");
            if (!root.TryGetProperty("blocksize", out JsonElement bs) || bs.ValueKind != JsonValueKind.Number || !bs.TryGetInt32(out blocksize))
                throw Bad(stateKey, "blocksize missing or not an integer");
            try { Quant4Bit.ValidateBlocksize(blocksize); }
            catch (ArgumentException e) { throw Bad(stateKey, e.Message); }
            string dtypeName = GetString(root, "dtype") ?? throw Bad(stateKey, "dtype missing or not a string");
            if (!DTypes.TryParseTorchName(dtypeName, out dtype) || dtype is not (DType.F32 or DType.BF16 or DType.F16))
                throw Bad(stateKey, $"dtype \"{dtypeName}\" is not bfloat16, float16 or float32");
            if (!root.TryGetProperty("shape", out JsonElement sh) || sh.ValueKind != JsonValueKind.Array)
                throw Bad(stateKey, "shape missing or not a list");
            shape = new long[sh.GetArrayLength()];
            int k = 0;
            foreach (JsonElement d in sh.EnumerateArray())
            {
                if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0)
                    throw Bad(stateKey, $"shape entry {d} is not a non-negative integer");
                shape[k++] = v;
            }
            hasNestedKeys = root.TryGetProperty("nested_offset", out JsonElement off);
            if (hasNestedKeys)
            {
                if (off.ValueKind != JsonValueKind.Number)
                    throw Bad(stateKey, "nested_offset is not a number");
                nestedOffset = (float)off.GetDouble();
                if (!root.TryGetProperty("nested_blocksize", out JsonElement nbs) || nbs.ValueKind != JsonValueKind.Number || !nbs.TryGetInt32(out int nb) || nb <= 0)
                    throw Bad(stateKey, "nested_blocksize missing or not a positive integer");
                nestedBlocksize = nb;
                string? nd = GetString(root, "nested_dtype");
                if (nd is not ("float32" or null))
                    throw Bad(stateKey, $"nested_dtype \"{nd}\" is not float32");
            }
        }
        catch (JsonException e)
        {
            throw new SafetensorsException(file.Path, stateKey, $"invalid quant state JSON: {e.Message}", e);
        }

        long n;
        try { n = DTypes.ElementCount(shape); }
        catch (Exception e) when (e is OverflowException or ArgumentException) { throw Bad(stateKey, $"shape is invalid: {e.Message}"); }
        if (n > int.MaxValue)
            throw Bad(stateKey, $"shape has {n} elements; at most {int.MaxValue} are supported");
        long blocks = Quant4Bit.BlockCount(n, blocksize);

        // --- the tensors
        SafetensorsTensorInfo packedInfo = Require(file, w, DType.U8);
        if (packedInfo.ElementCount != Quant4Bit.PackedLength(n))
            throw Bad(w, $"has {packedInfo.ElementCount} bytes but shape [{string.Join(", ", shape)}] needs {Quant4Bit.PackedLength(n)} packed bytes");
        byte[] packed = file.ReadArray<byte>(w);
        float[] quantMap = ReadF32(file, w + ".quant_map", 16);

        QuantState4Bit state;
        bool nestedTensors = file.Contains(w + ".nested_absmax");
        if (hasNestedKeys != nestedTensors)
            throw Bad(w + ".nested_absmax", hasNestedKeys ? "missing although the quant state has nested_offset" : "present although the quant state has no nested_offset");
        if (hasNestedKeys)
        {
            SafetensorsTensorInfo a = Require(file, w + ".absmax", DType.U8);
            if (a.ElementCount != blocks)
                throw Bad(w + ".absmax", $"has {a.ElementCount} entries, expected {blocks} (ceil({n} / {blocksize}))");
            int nb = nestedBlocksize!.Value;
            var nested = new DoubleQuantState
            {
                QuantizedAbsmax = file.ReadArray<byte>(w + ".absmax"),
                NestedAbsmax = ReadF32(file, w + ".nested_absmax", (blocks + nb - 1) / nb),
                NestedQuantMap = ReadF32(file, w + ".nested_quant_map", 256),
                Offset = nestedOffset!.Value,
                NestedBlockSize = nb,
            };
            state = new QuantState4Bit { QuantType = quantType, Blocksize = blocksize, Dtype = dtype, Shape = shape, Nested = nested, QuantMap = quantMap };
        }
        else
        {
            float[] absmax = ReadF32(file, w + ".absmax", blocks);
            state = new QuantState4Bit { QuantType = quantType, Blocksize = blocksize, Dtype = dtype, Shape = shape, Absmax = absmax, QuantMap = quantMap };
        }
        try { state.Validate(); }
        catch (ArgumentException e) { throw new SafetensorsException(file.Path, w, e.Message, e); }
        return new Quantized4BitTensor { Packed = packed, State = state };
    }

    private static string? GetString(JsonElement obj, string name)
        => obj.TryGetProperty(name, out JsonElement v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static SafetensorsTensorInfo Require(SafetensorsFile file, string name, DType dtype)
    {
        if (!file.Contains(name))
            throw new SafetensorsException(file.Path, name, "missing");
        SafetensorsTensorInfo t = file.GetInfo(name);
        if (t.DType != dtype)
            throw new SafetensorsException(file.Path, name, $"is {t.DType.SafetensorsName()}, expected {dtype.SafetensorsName()}");
        return t;
    }

    private static float[] ReadF32(SafetensorsFile file, string name, long count)
    {
        SafetensorsTensorInfo t = Require(file, name, DType.F32);
        if (t.ElementCount != count)
            throw new SafetensorsException(file.Path, name, $"has {t.ElementCount} values, expected {count}");
        float[] values = file.ReadArray<float>(name);
        // A non-finite absmax or code map would dequantize to NaN weights: refused naming the key (Numerics.Finite).
        if (Finite.FirstBad(values) is long bad and >= 0)
            throw new SafetensorsException(file.Path, name, $"{Finite.Describe(bad, values[bad])}: the quantization state is not finite");
        return values;
    }
}
