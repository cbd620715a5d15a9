namespace NativePeft.Numerics;

/// <summary>Element types of tensors, as safetensors names them.</summary>
public enum DType
{
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    F8E4M3,
    F8E5M2,
}

/// <summary>Element sizes and the names safetensors and torch use for each <see cref="DType"/>.</summary>
public static class DTypes
{
    private static readonly DType[] All = Enum.GetValues<DType>();

    /// <summary>Bytes per element.</summary>
    public static int ElementSize(this DType dtype) => dtype switch
    {
        DType.Bool or DType.U8 or DType.I8 or DType.F8E4M3 or DType.F8E5M2 => 1,
        DType.I16 or DType.U16 or DType.F16 or DType.BF16 => 2,
        DType.I32 or DType.U32 or DType.F32 => 4,
        DType.I64 or DType.U64 or DType.F64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>The dtype string in a safetensors header ("F32", "BF16", "U8", …).</summary>
    public static string SafetensorsName(this DType dtype) => dtype switch
    {
        DType.Bool => "BOOL",
        DType.U8 => "U8",
        DType.I8 => "I8",
        DType.I16 => "I16",
        DType.U16 => "U16",
        DType.F16 => "F16",
        DType.BF16 => "BF16",
        DType.I32 => "I32",
        DType.U32 => "U32",
        DType.F32 => "F32",
        DType.F64 => "F64",
        DType.I64 => "I64",
        DType.U64 => "U64",
        DType.F8E4M3 => "F8_E4M3",
        DType.F8E5M2 => "F8_E5M2",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>The torch dtype name without "torch." ("float32", "bfloat16", "uint8", …), as bitsandbytes stores it.</summary>
    public static string TorchName(this DType dtype) => dtype switch
    {
        DType.Bool => "bool",
        DType.U8 => "uint8",
        DType.I8 => "int8",
        DType.I16 => "int16",
        DType.U16 => "uint16",
        DType.F16 => "float16",
        DType.BF16 => "bfloat16",
        DType.I32 => "int32",
        DType.U32 => "uint32",
        DType.F32 => "float32",
        DType.F64 => "float64",
        DType.I64 => "int64",
        DType.U64 => "uint64",
        DType.F8E4M3 => "float8_e4m3fn",
        DType.F8E5M2 => "float8_e5m2",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>Parses a safetensors dtype string (case-sensitive, as the format defines them).</summary>
    public static bool TryParseSafetensorsName(string name, out DType dtype)
    {
        foreach (DType d in All)
        {
            if (d.SafetensorsName() == name) { dtype = d; return true; }
        }
        dtype = default;
        return false;
    }

    /// <summary>Parses a torch dtype name ("float32", "bfloat16", …; a "torch." prefix is accepted).</summary>
    public static bool TryParseTorchName(string name, out DType dtype)
    {
        string n = name.StartsWith("torch.", StringComparison.Ordinal) ? name["torch.".Length..] : name;
        foreach (DType d in All)
        {
            if (d.TorchName() == n) { dtype = d; return true; }
        }
        dtype = default;
        return false;
    }

    /// <summary>The dtype whose elements a CLR type <typeparamref name="T"/> holds (float → F32, BFloat16 → BF16, Half → F16, …).</summary>
    public static DType Of<T>() where T : unmanaged
    {
        if (typeof(T) == typeof(float)) return DType.F32;
        if (typeof(T) == typeof(BFloat16)) return DType.BF16;
        if (typeof(T) == typeof(Half)) return DType.F16;
        if (typeof(T) == typeof(byte)) return DType.U8;
        if (typeof(T) == typeof(sbyte)) return DType.I8;
        if (typeof(T) == typeof(short)) return DType.I16;
        if (typeof(T) == typeof(ushort)) return DType.U16;
        if (typeof(T) == typeof(int)) return DType.I32;
        if (typeof(T) == typeof(uint)) return DType.U32;
        if (typeof(T) == typeof(long)) return DType.I64;
        if (typeof(T) == typeof(ulong)) return DType.U64;
        if (typeof(T) == typeof(double)) return DType.F64;
        if (typeof(T) == typeof(bool)) return DType.Bool;
        throw new NotSupportedException($"no DType for element type {typeof(T).Name}");
    }

    /// <summary>Product of a shape's dimensions (1 for a scalar shape []); throws on negative dims or overflow.</summary>
    public static long ElementCount(ReadOnlySpan<long> shape)
    {
        long n = 1;
        foreach (long d in shape)
        {
            if (d < 0) throw new ArgumentException($"negative dimension {d} in shape", nameof(shape));
            n = checked(n * d);
        }
        return n;
    }
}
