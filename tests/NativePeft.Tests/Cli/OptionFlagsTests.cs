using System.Collections;
using System.CommandLine;
using System.Globalization;
using System.Reflection;
using NativePeft.Cli.Commands;
using NativePeft.Inference;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// Options live once (issue 11 item 2): every flag <see cref="OptionFlags"/> binds to a library option record takes
/// its default from that record, and the library's refusal of a value reaches the user under the flag that set it.
/// </summary>
public class OptionFlagsTests
{
    private static Command CommandOf(string name) => name switch
    {
        "train" => TrainCommand.Create(TextWriter.Null),
        "generate" => GenerateCommand.Create(TextWriter.Null),
        "pretrain" => PretrainCommand.Create(TextWriter.Null),
        _ => throw new ArgumentException(name),
    };

    /// <summary>What the command line holds for a library value: enums by lower-case name, lists comma-joined, a null
    /// compute dtype as --precision auto (written here from the flags' documented meaning, not from the CLI's code).</summary>
    private static object? AsCli(OptionFlags.Binding b, object? value) => (b.Flag, value) switch
    {
        ("--precision", null) => "auto",
        (_, Enum e) => e.ToString().ToLowerInvariant(),
        (_, IEnumerable list) when value is not string => string.Join(',', list.Cast<object>()),
        _ => value,
    };

    private static object? LibraryDefault(OptionFlags.Binding b)
    {
        object? value = b.Record == typeof(TrainerOptions) ? null : Activator.CreateInstance(b.Record);
        foreach (var name in b.Property.Split('.'))
        {
            var property = value!.GetType().GetProperty(name, BindingFlags.Public | BindingFlags.Instance)
                ?? throw new AssertionException($"{b.Record.Name} has no property {b.Property} ({b.Flag})");
            value = property.GetValue(value);
        }
        return value;
    }

    private static object? CliDefault(Command command, string flag)
    {
        var option = command.Options.SingleOrDefault(o => o.Name == flag) ?? throw new AssertionException($"{command.Name} has no {flag}");
        // Parsed with no value given: the option's default, whatever its type.
        var parse = command.Parse(command.Options.Where(o => o.Required && o.Name != flag)
            .SelectMany(o => new[] { o.Name, o.Name == "--model" ? "builtin" : "x" }).ToArray());
        var result = parse.GetResult(option);
        Assert.That(result?.Implicit ?? true, Is.True, $"{command.Name} {flag} was not left at its default");
        var getValue = typeof(ParseResult).GetMethods().Single(m => m.Name == "GetValue" && m.IsGenericMethod
            && m.GetParameters()[0].ParameterType.IsGenericType && m.GetParameters()[0].ParameterType.GetGenericTypeDefinition() == typeof(Option<>));
        var valueType = option.GetType().GetGenericArguments()[0];
        return getValue.MakeGenericMethod(valueType).Invoke(parse, [option]);
    }

    [Test]
    public void EveryBoundFlagsDefaultIsTheLibraryDefault()
    {
        Assert.That(OptionFlags.Bindings, Has.Count.GreaterThan(40));
        foreach (var group in OptionFlags.Bindings.GroupBy(b => b.Command))
        {
            var command = CommandOf(group.Key);
            foreach (var b in group)
            {
                if (command.Options.Single(o => o.Name == b.Flag).Required) continue; // no default: the user gives it
                object? cli = CliDefault(command, b.Flag);
                object? library = AsCli(b, LibraryDefault(b));
                if (cli is FileSystemInfo or null && library is null) continue; // an optional path: unset on both sides
                Assert.That(Convert.ToString(cli, CultureInfo.InvariantCulture), Is.EqualTo(Convert.ToString(library, CultureInfo.InvariantCulture)),
                    $"{group.Key} {b.Flag} vs {b.Record.Name}.{b.Property}");
            }
        }
    }

    [Test]
    public void TheBatchSizeDefaultIsOneNumberEverywhere()
    {
        // The example: train's --batch and the two library records said 4 and 8.
        var fine = new FineTuneOptions();
        var trainer = new TrainerOptions { OutputDir = "x" };
        Assert.That(trainer.BatchSize, Is.EqualTo(fine.BatchSize));
        Assert.That(CliDefault(TrainCommand.Create(TextWriter.Null), "--batch"), Is.EqualTo(fine.BatchSize));
        // Every other setting the two records share starts equal too (they are the embedding API and the trainer's view of it).
        foreach (var p in typeof(TrainerOptions).GetProperties())
        {
            var q = typeof(FineTuneOptions).GetProperty(p.Name);
            if (q is null || q.PropertyType != p.PropertyType || p.Name is nameof(TrainerOptions.OutputDir)) continue;
            Assert.That(p.GetValue(trainer), Is.EqualTo(q.GetValue(fine)), p.Name);
        }
    }

    [Test]
    public void EveryBindingNamesARealFlagAndProperty()
    {
        foreach (var b in OptionFlags.Bindings)
        {
            Assert.That(CommandOf(b.Command).Options.Any(o => o.Name == b.Flag), $"{b.Command} has {b.Flag}");
            Assert.DoesNotThrow(() => LibraryDefault(b), $"{b.Record.Name}.{b.Property}");
        }
    }

    [TestCase(nameof(FineTuneOptions.BatchSize), "--batch")]
    [TestCase(nameof(FineTuneOptions.SeqLen), "--seq")]
    [TestCase(nameof(FineTuneOptions.OutputDir), "--out")]
    [TestCase(nameof(FineTuneOptions.ResumeFrom), "--resume")]
    [TestCase(nameof(FineTuneOptions.ComputeDType), "--precision")]
    [TestCase("Rank", "--rank")]
    [TestCase("TargetModules", "--targets")]
    [TestCase("UseRsLora", "--rslora")]
    [TestCase(nameof(GenerationOptions.MaxNewTokens), "--max-tokens")]
    [TestCase(nameof(GenerationOptions.TopP), "--top-p")]
    [TestCase(nameof(PretrainOptions.KvHeads), "--kv-heads")]
    [TestCase(nameof(PretrainOptions.CorpusLines), "--corpus-lines")]
    [TestCase("Adapter", "--adapter")]
    [TestCase("DeviceMemory", "--device-memory")]
    public void APropertyMapsToItsFlag(string property, string flag) => Assert.That(OptionFlags.Flag(property), Is.EqualTo(flag));

    [Test]
    public void ALibraryRefusalIsShownUnderItsFlag()
    {
        // The library throws for the property; the message the CLI builds names the flag and the value, from Option and Detail.
        var e = Assert.Throws<FineTuneException>(() => FineTune.ValidateOptions(new FineTuneOptions { GradAccum = 0 }))!;
        Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.GradAccum)));
        Assert.That(OptionFlags.Message(e), Is.EqualTo("--grad-accum 0: must be positive"));
        var rank = Assert.Throws<FineTuneException>(() => FineTune.ValidateOptions(new FineTuneOptions { Lora = new() { Rank = -3 } }))!;
        Assert.That(OptionFlags.Message(rank), Is.EqualTo("--rank -3: the LoRA rank must be positive"));
        var targets = Assert.Throws<FineTuneException>(() => FineTune.ValidateOptions(new FineTuneOptions { Lora = new() { TargetModules = ["nope"] } }))!;
        Assert.That(OptionFlags.Message(targets), Does.StartWith("--targets: unknown module \"nope\""));
        var decay = Assert.Throws<FineTuneException>(() => FineTune.ValidateOptions(new FineTuneOptions { WeightDecay = -1 }))!;
        Assert.That(OptionFlags.Message(decay), Is.EqualTo("--weight-decay -1: must be a finite number >= 0 (0 = off)"));
        var topP = Assert.Throws<OptionException>(() => new GenerationOptions { TopP = 1.5 }.Validate())!;
        Assert.That(OptionFlags.Message(topP), Is.EqualTo("--top-p 1.5: must be in (0, 1] (1 = off)"));
        var heads = Assert.Throws<OptionException>(() => new PretrainOptions { KvHeads = 3 }.Validate())!;
        Assert.That(OptionFlags.Message(heads), Does.StartWith("--kv-heads 3: "));
    }

    [Test]
    public void WeightDecayReachesTheTrainer()
    {
        // The worked example of design.md's "Adding a training option": record → use → binding.
        using var run = FineTune.Create(new FineTuneOptions { WeightDecay = 0.25, Steps = 1 });
        Assert.That(run.TrainerOptions.WeightDecay, Is.EqualTo(0.25));
    }

    [Test]
    public void TheCliShowsTheLibrarysRefusalUnderTheFlag()
    {
        var stderr = new StringWriter();
        int code = NativePeft.Cli.Program.Run(["train", "--model", "builtin", "--data", "builtin", "--out", Path.Combine(Path.GetTempPath(), "never-" + Guid.NewGuid()),
            "--grad-accum", "0"], TextWriter.Null, stderr);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr.ToString(), Does.StartWith("error: --grad-accum 0: must be positive"));
        stderr = new StringWriter();
        code = NativePeft.Cli.Program.Run(["pretrain", "--out", Path.Combine(Path.GetTempPath(), "never-" + Guid.NewGuid()), "--kv-heads", "3"], TextWriter.Null, stderr);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr.ToString(), Does.StartWith("error: --kv-heads 3: does not divide the attention heads"));
    }
}
