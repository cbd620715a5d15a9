namespace NativePeft.Ops;

/// <summary>
/// One adapter of <see cref="IOps.LoraDown"/>: xa = dropout(x; <see cref="DropoutP"/>, <see cref="Seed"/>) · Aᵀ.
/// </summary>
/// <param name="A">lora_A in the compute dtype, [r, in] (on the GPU with BF16 activations: the bf16 working copy).</param>
/// <param name="DropoutP">lora_dropout in [0, 1); 0 (or dropout off) keeps x as it is.</param>
/// <param name="Seed">The dropout seed of this adapter at this step (the mask is Philox of (seed, element index of x),
/// the mask <see cref="IOps.Dropout"/> draws on x with that seed).</param>
/// <param name="Xa">The output [N, r] (overwritten), in the compute dtype.</param>
public sealed record LoraDownArgs(Tensor A, double DropoutP, ulong Seed, Tensor Xa);

/// <summary>
/// One adapter of <see cref="IOps.LoraBackwardInput"/>: the adapter's share of dx and its dA.
/// </summary>
/// <param name="A">lora_A in the compute dtype, [r, in] (as given to <see cref="LoraDownArgs.A"/>).</param>
/// <param name="DXa">d xa [N, r] in the compute dtype (scaling · dy · B).</param>
/// <param name="DropoutP">lora_dropout, as in the forward.</param>
/// <param name="Seed">The dropout seed, as in the forward (the same mask is redrawn, never stored).</param>
/// <param name="DA">The gradient of A [r, in], accumulated (+=): F32 on the GPU (the fp32 master's gradient), the
/// compute dtype on the CPU.</param>
public sealed record LoraBackwardArgs(Tensor A, Tensor DXa, double DropoutP, ulong Seed, Tensor DA);

/// <summary>The argument checks both implementations of the LoRA ops share (messages name the argument).</summary>
internal static class LoraChecks
{
    private static void CheckCommon(Tensor x, int count, string listName)
    {
        ArgumentNullException.ThrowIfNull(x);
        if (x.Rank != 2)
            throw new ArgumentException($"x: expected a matrix [N, in], got [{x.ShapeText}]", nameof(x));
        if (count == 0)
            throw new ArgumentException($"{listName}: at least one adapter expected", listName);
    }

    private static int CheckAdapter(Tensor x, Tensor? a, double p, string name)
    {
        if (a is null) throw new ArgumentNullException(name + ".A");
        if (a.Rank != 2 || a.Rows < 1 || a.Columns != x.Columns)
            throw new ArgumentException($"{name}.A: expected [r, {x.Columns}] with r ≥ 1 (in = x's columns), got [{a.ShapeText}]", name);
        if (!(p >= 0 && p < 1))
            throw new ArgumentOutOfRangeException(name, p, $"{name}.DropoutP: must be in [0, 1), got {p}");
        return a.Rows;
    }

    /// <summary>Shapes of a <see cref="IOps.LoraDown"/> call: x [N, in], each A [r, in], each Xa [N, r].</summary>
    public static void Down(Tensor x, IReadOnlyList<LoraDownArgs> adapters)
    {
        ArgumentNullException.ThrowIfNull(adapters);
        CheckCommon(x, adapters.Count, nameof(adapters));
        for (int g = 0; g < adapters.Count; g++)
        {
            string name = $"{nameof(adapters)}[{g}]";
            var d = adapters[g] ?? throw new ArgumentNullException(name);
            int r = CheckAdapter(x, d.A, d.DropoutP, name);
            if (d.Xa is null) throw new ArgumentNullException(name + ".Xa");
            d.Xa.Expect(name + ".Xa", x.Rows, r);
        }
    }

    /// <summary>Shapes of a <see cref="IOps.LoraBackwardInput"/> call: x, dx [N, in], each A, DA [r, in], each DXa [N, r].</summary>
    public static void Backward(Tensor x, IReadOnlyList<LoraBackwardArgs> adapters, Tensor dx)
    {
        ArgumentNullException.ThrowIfNull(adapters);
        CheckCommon(x, adapters.Count, nameof(adapters));
        ArgumentNullException.ThrowIfNull(dx);
        dx.Expect(nameof(dx), x.Rows, x.Columns);
        for (int g = 0; g < adapters.Count; g++)
        {
            string name = $"{nameof(adapters)}[{g}]";
            var d = adapters[g] ?? throw new ArgumentNullException(name);
            int r = CheckAdapter(x, d.A, d.DropoutP, name);
            if (d.DXa is null) throw new ArgumentNullException(name + ".DXa");
            if (d.DA is null) throw new ArgumentNullException(name + ".DA");
            d.DXa.Expect(name + ".DXa", x.Rows, r);
            d.DA.Expect(name + ".DA", r, x.Columns);
        }
    }
}
