using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Kernels;

/// <summary>
/// The kernel ABI as kernels/common.cuh defines it (docs/design.md, "Kernel ABI"): every entry point is declared and
/// registered with the emulator by NP_KERNEL / NP_KERNEL_BOUNDED, and every parameter struct has a C# mirror of the
/// same size and field offsets (the emulator library's np_layout_&lt;struct&gt;, the C declaration's field names).
/// </summary>
public class KernelSourceTests
{
    private static readonly Regex EntryMacro = new(@"\bNP_KERNEL(?:_BOUNDED)?\(\s*([A-Za-z_][A-Za-z0-9_#]*)\s*,", RegexOptions.Compiled);

    /// <summary>kernels/*.cu and kernels/*.cuh but common.cuh (where the macros are defined), comments removed.</summary>
    private static Dictionary<string, string> KernelSources()
    {
        string dir = KernelBuildTests.RepoKernelsDir();
        if (!Directory.Exists(dir))
            Assert.Ignore("not run from a source checkout (kernels/*.cu not found)");
        return Directory.GetFiles(dir, "*.cu").Concat(Directory.GetFiles(dir, "*.cuh"))
            .Where(f => Path.GetFileName(f) != "common.cuh")
            .ToDictionary(f => Path.GetFileName(f)!, f => StripComments(File.ReadAllText(f)));
    }

    internal static string StripComments(string source) =>
        Regex.Replace(source, @"//[^\n]*|/\*.*?\*/", "", RegexOptions.Singleline);

    /// <summary>
    /// The offenders in <paramref name="sources"/>: a <c>__global__</c> or an EMU_REGISTER written outside the macro
    /// (an entry point the emulator may not know, or a registration of a name that has no entry).
    /// </summary>
    internal static List<string> EntryPointsOutsideMacro(IReadOnlyDictionary<string, string> sources)
    {
        var offenders = new List<string>();
        foreach (var (file, text) in sources)
            foreach (Match m in Regex.Matches(text, @"\b__global__\b|\bEMU_REGISTER\s*\("))
                offenders.Add($"{file}:{text[..m.Index].Count(c => c == '\n') + 1}: {m.Value}");
        return offenders;
    }

    /// <summary>
    /// The entry names NP_KERNEL declares, as patterns: a name pasted inside a macro (attention_fwd_tc_d##DIM##_bf16)
    /// matches any value of its upper-case macro parameters.
    /// </summary>
    internal static List<(string File, string Name, Regex Pattern)> MacroEntries(IReadOnlyDictionary<string, string> sources)
    {
        var entries = new List<(string, string, Regex)>();
        foreach (var (file, text) in sources)
            foreach (Match m in EntryMacro.Matches(text))
            {
                string name = m.Groups[1].Value;
                var parts = name.Split("##").Select(p => Regex.IsMatch(p, "^[A-Z][A-Z0-9_]*$") ? "[A-Za-z0-9_]+" : Regex.Escape(p));
                entries.Add((file, name, new Regex("^" + string.Concat(parts) + "$")));
            }
        return entries;
    }

    [Test]
    public void NoEntryPointOrRegistrationOutsideTheMacro()
    {
        var sources = KernelSources();
        Assert.That(EntryPointsOutsideMacro(sources), Is.Empty,
            "write entry points as NP_KERNEL(name, (params)) { ... } (kernels/common.cuh), not extern \"C\" __global__ + EMU_REGISTER");
        Assert.That(MacroEntries(sources), Has.Count.GreaterThan(50), "the NP_KERNEL entries of kernels/*.cu");
    }

    [Test]
    public void TheCheckFindsAHandWrittenEntryPoint()
    {
        // Control: the check above fails on the pattern it forbids, and passes the macro form.
        var bad = new Dictionary<string, string>
        {
            ["bad.cu"] = StripComments("#include \"common.cuh\"\n// extern \"C\" __global__ in a comment is fine\n"
                                       + "extern \"C\" __global__ void k(int n) { }\nEMU_REGISTER(k)\n"),
            ["good.cu"] = StripComments("NP_KERNEL(k2, (int n)) { }\n"),
        };
        Assert.That(EntryPointsOutsideMacro(bad), Is.EqualTo(new[] { "bad.cu:3: __global__", "bad.cu:4: EMU_REGISTER(" }));
        Assert.That(MacroEntries(bad).Select(e => e.Name), Is.EqualTo(new[] { "k2" }));
    }

    [Test]
    public void EveryMacroEntryIsRegisteredAndEveryRegisteredKernelHasOne()
    {
        var entries = MacroEntries(KernelSources());
        using var emu = EmulatedGpu.Create();
        var registered = emu.KernelNames.ToList();
        Assert.Multiple(() =>
        {
            foreach (var (file, name, pattern) in entries)
                Assert.That(registered.Any(pattern.IsMatch), Is.True, $"{file}: NP_KERNEL({name}, ...) has no kernel in the emulator registry");
            foreach (var kernel in registered)
                Assert.That(entries.Any(e => e.Pattern.IsMatch(kernel)), Is.True, $"{kernel} is registered but no NP_KERNEL in kernels/ declares it");
        });
    }

    private static IEnumerable<TestCaseData> ParamStructs()
    {
        // (mirror, C struct, file, sizeof, kernels taking it with the struct's parameter index and their parameter count)
        yield return new TestCaseData(typeof(AttnTcParams), "AttnTcParams", "attention_tc.cuh", AttnTcParams.NativeSize,
            new[] { "attention_fwd_tc_d64_bf16", "attention_fwd_tc_packed_d128_bf16", "attention_bwd_dkdv_tc_d64_bf16", "attention_bwd_dq_tc_d128_bf16" }, 0, 1)
            .SetArgDisplayNames("AttnTcParams");
        yield return new TestCaseData(typeof(AttnParams), "AttnParams", "attention.cu", AttnParams.NativeSize,
            new[]
            {
                "attention_forward_f32", "attention_forward_bf16", "attention_forward_cached_f32", "attention_forward_cached_bf16",
                "attention_backward_preprocess_f32", "attention_backward_preprocess_bf16", "attention_backward_dkdv_f32",
                "attention_backward_dkdv_bf16", "attention_backward_dq_f32", "attention_backward_dq_bf16",
            }, 0, 1)
            .SetArgDisplayNames("AttnParams");
        yield return new TestCaseData(typeof(AttnDecodeParams), "AttnDecodeParams", "attention_decode.cu", AttnDecodeParams.NativeSize,
            new[] { "attention_decode_tc_d64_bf16", "attention_decode_tc_d128_bf16", "attention_decode_combine_bf16" }, 0, 1)
            .SetArgDisplayNames("AttnDecodeParams");
        yield return new TestCaseData(typeof(LoraTcParams), "LoraTcParams", "lora.cu", LoraTcParams.NativeSize,
            new[] { "lora_down_tc_bf16", "lora_bwd_input_tc_bf16" }, 0, 1)
            .SetArgDisplayNames("LoraTcParams");
        yield return new TestCaseData(typeof(LoraReduceParams), "LoraReduceParams", "lora.cu", LoraReduceParams.NativeSize,
            new[] { "lora_down_reduce_bf16", "lora_da_reduce_f32" }, 0, 1)
            .SetArgDisplayNames("LoraReduceParams");
        yield return new TestCaseData(typeof(NativePeft.Optim.AdamWStepScalars), "AdamWScalars", "optim.cu",
            NativePeft.Optim.AdamWStepScalars.NativeSize, new[] { "adamw_f32" }, 5, 6)
            .SetArgDisplayNames("AdamWScalars(adamw_f32)");
        yield return new TestCaseData(typeof(NativePeft.Optim.AdamWStepScalars), "AdamWScalars", "optim.cu",
            NativePeft.Optim.AdamWStepScalars.NativeSize, new[] { "adamw8bit_blockwise" }, 9, 10)
            .SetArgDisplayNames("AdamWScalars(adamw8bit_blockwise)");
    }

    /// <summary>The field names of <c>struct name { ... };</c> in <paramref name="source"/>, in declaration order.</summary>
    internal static List<string> CStructFields(string source, string name)
    {
        var m = Regex.Match(StripComments(source), @"\bstruct\s+" + name + @"\s*\{(.*?)\};", RegexOptions.Singleline);
        Assert.That(m.Success, Is.True, $"struct {name} not found");
        var fields = new List<string>();
        foreach (var declaration in m.Groups[1].Value.Split(';').Select(d => d.Trim()).Where(d => d.Length > 0))
            foreach (var declarator in declaration.Split(','))
                fields.Add(Regex.Match(declarator, @"([A-Za-z_][A-Za-z0-9_]*)\s*$").Groups[1].Value);
        return fields;
    }

    private static FieldInfo[] MirrorFields(Type type) =>
        type.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic).OrderBy(f => f.MetadataToken).ToArray();

    /// <summary>A field name for comparison: a record's backing field by its property name, no underscores, lower case.</summary>
    internal static string Comparable(string name) =>
        Regex.Replace(name, @"^<(.+)>k__BackingField$", "$1").Replace("_", "").ToLowerInvariant();

    [TestCaseSource(nameof(ParamStructs))]
    public unsafe void ParamStructMirrorMatchesTheC(Type mirror, string cName, string file, int nativeSize, string[] kernels,
        int parameterIndex, int parameterCount)
    {
        var fields = MirrorFields(mirror);
        int managedSize = (int)typeof(Unsafe).GetMethod(nameof(Unsafe.SizeOf))!.MakeGenericMethod(mirror).Invoke(null, null)!;
        Assert.Multiple(() =>
        {
            Assert.That(managedSize, Is.EqualTo(nativeSize), "Unsafe.SizeOf of the C# mirror vs the static_assert'ed C sizeof");
            Assert.That(Marshal.SizeOf(mirror), Is.EqualTo(nativeSize), "Marshal.SizeOf of the C# mirror");
        });

        // The field names, in order, against the C declaration (C# spells them in PascalCase, C in snake_case).
        var cFields = CStructFields(File.ReadAllText(Path.Combine(KernelBuildTests.RepoKernelsDir(), file)), cName);
        Assert.That(fields.Select(f => Comparable(f.Name)), Is.EqualTo(cFields.Select(Comparable)),
            $"the fields of {mirror.Name} vs struct {cName} in kernels/{file}");

        // Size and every offset against what the host compiler laid out (the emulator library's np_layout_<struct>).
        using var emu = EmulatedGpu.Create();
        IntPtr lib = NativeLibrary.Load(emu.LibraryPath);
        var layout = (delegate* unmanaged<long*, int, int>)NativeLibrary.GetExport(lib, "np_layout_" + cName);
        var values = new long[64];
        int n;
        fixed (long* p = values) n = layout(p, values.Length);
        Assert.That(n, Is.EqualTo(1 + fields.Length), $"np_layout_{cName}: sizeof and one offset per field");
        Assert.Multiple(() =>
        {
            Assert.That(values[0], Is.EqualTo(nativeSize), $"sizeof({cName}) in the emulator library");
            for (int i = 0; i < fields.Length; i++)
                Assert.That(values[1 + i], Is.EqualTo((long)Marshal.OffsetOf(mirror, fields[i].Name)), $"offset of {cName}.{cFields[i]}");
            // The kernels that take it: a parameter of that size where the launcher puts it (the emulator's
            // KernelTraits of the C signature).
            foreach (var kernel in kernels)
            {
                var sizes = emu.ParameterSizes(kernel);
                Assert.That(sizes, Has.Length.EqualTo(parameterCount), $"{kernel}'s parameter count");
                Assert.That(sizes![parameterIndex], Is.EqualTo(nativeSize), $"{kernel}'s parameter {parameterIndex}");
            }
        });
    }

    [Test]
    public unsafe void AStructArgumentOfTheWrongSizeIsRejected()
    {
        using var emu = EmulatedGpu.Create();
        long tooSmall = 0;
        string? error = null;
        try
        {
            emu.Launch("attention_fwd_tc_d64_bf16", 1, 128, 0, KernelArg.Struct(&tooSmall));
        }
        catch (EmulatorException e)
        {
            error = e.Message;
        }
        Assert.That(error, Does.Contain($"parameter 0 is {AttnTcParams.NativeSize} bytes, the argument is 8 bytes"));
    }
}
