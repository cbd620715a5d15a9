namespace NativePeft.Quantization;

/// <summary>The 4-bit data types of bitsandbytes.</summary>
public enum QuantType
{
    /// <summary>NormalFloat4 ("nf4").</summary>
    Nf4,
    /// <summary>FP4 E2M1 ("fp4").</summary>
    Fp4,
}

public static class QuantTypes
{
    /// <summary>"nf4" / "fp4", as bitsandbytes names them (quant_type, and the key suffix bitsandbytes__nf4).</summary>
    public static string Name(this QuantType quantType) => quantType switch
    {
        QuantType.Nf4 => "nf4",
        QuantType.Fp4 => "fp4",
        _ => throw new ArgumentOutOfRangeException(nameof(quantType), quantType, "unknown quant_type"),
    };

    public static bool TryParse(string name, out QuantType quantType)
    {
        switch (name)
        {
            case "nf4": quantType = QuantType.Nf4; return true;
            case "fp4": quantType = QuantType.Fp4; return true;
            default: quantType = default; return false;
        }
    }
}
