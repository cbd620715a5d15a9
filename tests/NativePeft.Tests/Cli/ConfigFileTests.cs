using System.CommandLine;
using System.Text.Json;
using NativePeft.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `--config FILE` (JSON or YAML): the expansion itself (in-process, exact tokens), and end to end through `estimate`
/// (cheap, and its --json output echoes the options) and `train` (the file's values reach its checks).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class ConfigFileTests
{
    private TempDir _dir = null!;

    [SetUp]
    public void SetUp() => _dir = CliProcess.TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private string Write(string name, string text)
    {
        File.WriteAllText(_dir[name], text);
        return _dir[name];
    }

    /// <summary>A root with one command "t": single-value, switch and multi-value options.</summary>
    private static RootCommand Root() => new("test")
    {
        new Command("t")
        {
            new Option<int>("--rank"), new Option<double>("--lr"), new Option<string>("--targets"), new Option<bool>("--rslora"),
            new Option<string>("--grad-accum"), new Option<string[]>("--names") { AllowMultipleArgumentsPerToken = false },
            new Option<string>("--path", "-p"),
        },
    };

    // ---------------------------------------------------------------- expansion, in-process

    [Test]
    public void YamlExpandsAfterTheCommandAndBeforeTheRealArguments()
    {
        string f = Write("c.yaml", "# comment\nlr: 2e-4\ntargets: [q_proj, v_proj]\nrslora: true\ngrad_accum: 4\nnames: [a, b]\nrank: ~\n");
        var args = ConfigFile.Expand(Root(), ["t", "--config", f, "--path", "x"]);
        Assert.That(args, Is.EqualTo(new[]
        {
            "t", "--lr", "2e-4", "--targets", "q_proj,v_proj", "--rslora", "true", "--grad-accum", "4", "--names", "a", "--names", "b", "--path", "x",
        }));
    }

    [Test]
    public void JsonExpandsTheSameWay()
    {
        string f = Write("c.json", "{\n  \"lr\": 2e-4,\n  \"targets\": \"q_proj,v_proj\",\n  \"rslora\": false,\n  \"--rank\": 8,\n  \"names\": [\"a\", 3, true]\n}");
        var args = ConfigFile.Expand(Root(), ["--config=" + f, "t"]);
        Assert.That(args, Is.EqualTo(new[] { "t", "--lr", "2e-4", "--targets", "q_proj,v_proj", "--rslora", "false", "--rank", "8", "--names", "a", "--names", "3", "--names", "true" }));
    }

    [Test]
    public void TheCommandLineOverridesTheFileIncludingAliasesAndSwitches()
    {
        string f = Write("c.yml", "lr: 1\nrank: 8\nrslora: false\npath: from-file\n");
        var args = ConfigFile.Expand(Root(), ["t", "--rank=4", "--config", f, "-p", "cli", "--rslora"]);
        Assert.That(args, Is.EqualTo(new[] { "t", "--lr", "1", "--rank=4", "-p", "cli", "--rslora" }));
        // and the result parses (a single-value option given twice would be an error)
        var parsed = Root().Parse(args);
        Assert.That(parsed.Errors, Is.Empty);
    }

    [Test]
    public void WithoutConfigTheArgumentsAreUnchanged()
    {
        string[] args = ["t", "--rank", "3"];
        Assert.That(ConfigFile.Expand(Root(), args), Is.SameAs(args));
    }

    private static string ExpandError(string[] args)
    {
        var e = Assert.Throws<CliException>(() => ConfigFile.Expand(Root(), args))!;
        Assert.That(e.ExitCode, Is.EqualTo(2));
        return e.Message;
    }

    [Test]
    public void BadFilesNameTheFileAndLine()
    {
        string unknown = Write("u.yaml", "lr: 1\nlearning_rate: 2\n");
        Assert.That(ExpandError(["t", "--config", unknown]), Does.StartWith(unknown + ":2: unrecognized option 'learning_rate' for 'nativepeft t'"));

        string yaml = Write("bad.yaml", "lr: 1\ntargets: [q_proj, v_proj\nrank: 2\n");
        Assert.That(ExpandError(["t", "--config", yaml]), Is.EqualTo(yaml + ":2: invalid YAML: a list or map ('[' or '{') that starts here is not closed"));

        string json = Write("bad.json", "{\n  \"lr\": 1,\n  \"rank\": 2\n  \"rslora\": true\n}");
        Assert.That(ExpandError(["t", "--config", json]), Does.StartWith(json + ":4: invalid JSON: "));

        string nested = Write("n.yaml", "lr: 1\nlora:\n  r: 8\n");
        Assert.That(ExpandError(["t", "--config", nested]), Does.StartWith(nested + ":2: 'lora': expected a value or a list, not a map"));

        string twice = Write("d.json", "{\"lr\": 1,\n\"grad-accum\": 2,\n\"grad_accum\": 3}");
        Assert.That(ExpandError(["t", "--config", twice]), Does.StartWith(twice + ":3: 'grad_accum' is given twice (also on line 2)"));

        string list = Write("l.json", "[\"lr\", 1]");
        Assert.That(ExpandError(["t", "--config", list]), Does.StartWith(list + ":1: expected a JSON object of options"));

        string listSwitch = Write("s.yaml", "rslora: [true, false]\n");
        Assert.That(ExpandError(["t", "--config", listSwitch]), Does.Contain("is a switch"));

        Assert.That(ExpandError(["t", "--config", _dir["missing.yaml"]]), Is.EqualTo($"--config {_dir["missing.yaml"]}: file not found"));
        Assert.That(ExpandError(["t", "--config", Write("c.toml", "lr = 1")]), Does.Contain("expected a .json, .yaml or .yml file"));
        Assert.That(ExpandError(["t", "--config"]), Does.StartWith("--config: expected a file"));
        Assert.That(ExpandError(["t", "--config", unknown, "--config", json]), Does.StartWith("--config given twice"));
    }

    [Test]
    public void EmptyYamlAddsNothing()
    {
        string f = Write("e.yaml", "# nothing yet\n");
        Assert.That(ConfigFile.Expand(Root(), ["t", "--config", f, "--rank", "1"]), Is.EqualTo(new[] { "t", "--rank", "1" }));
    }

    // ---------------------------------------------------------------- end to end, as a process

    private static JsonElement EstimateJson(params string[] args)
    {
        var r = CliProcess.Run(["estimate", .. args]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        return doc.RootElement.Clone();
    }

    private static string[] Targets(JsonElement e) => e.GetProperty("targets").EnumerateArray().Select(t => t.GetString()!).ToArray();

    /// <summary>The file's values reach estimate (its JSON echoes them; json: true itself comes from the file), and flags override them.</summary>
    [TestCase("yaml", "model: llama3-8b\nmethod: qlora\nrank: 8\ntargets: [q_proj, v_proj]\nrecompute: true\nseq: 1024\noptim: paged-adamw\njson: true\n")]
    [TestCase("json", "{\"model\": \"llama3-8b\", \"method\": \"qlora\", \"rank\": 8, \"targets\": \"q_proj,v_proj\", \"recompute\": true,\n \"seq\": 1024, \"optim\": \"paged-adamw\", \"json\": true}")]
    public void EstimateTakesTheFileAndTheCommandLineOverridesIt(string ext, string text)
    {
        string f = Write("run." + ext, text);
        var fromFile = EstimateJson("--config", f);
        Assert.That(fromFile.GetProperty("method").GetString(), Is.EqualTo("qlora"));
        Assert.That(fromFile.GetProperty("rank").GetInt32(), Is.EqualTo(8));
        Assert.That(Targets(fromFile), Is.EqualTo(new[] { "q_proj", "v_proj" }));
        Assert.That(fromFile.GetProperty("recompute").GetBoolean(), Is.True);
        Assert.That(fromFile.GetProperty("seq").GetInt32(), Is.EqualTo(1024));
        Assert.That(fromFile.GetProperty("optimizer").GetString(), Is.EqualTo("paged-adamw"));

        var overridden = EstimateJson("--config", f, "--rank", "32", "--recompute", "false", "--targets", "o_proj");
        Assert.That(overridden.GetProperty("rank").GetInt32(), Is.EqualTo(32));
        Assert.That(overridden.GetProperty("recompute").GetBoolean(), Is.False);
        Assert.That(Targets(overridden), Is.EqualTo(new[] { "o_proj" }));
        Assert.That(overridden.GetProperty("method").GetString(), Is.EqualTo("qlora"), "not overridden: still the file's");
        Assert.That(overridden.GetProperty("trainable_parameters").GetInt64(), Is.GreaterThan(fromFile.GetProperty("trainable_parameters").GetInt64()));

        // the same without a file gives the defaults (the file really did something)
        var plain = EstimateJson("--model", "llama3-8b", "--json");
        Assert.That(plain.GetProperty("method").GetString(), Is.EqualTo("lora"));
        Assert.That(plain.GetProperty("rank").GetInt32(), Is.EqualTo(16));
    }

    [Test]
    public void BadFilesFailAsAProcessWithOneMessage()
    {
        string unknown = Write("u.yaml", "model: llama3-8b\nlearning_rate: 2e-4\n");
        var r = CliProcess.Run("estimate", "--config", unknown);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stdout, Is.Empty);
        Assert.That(r.Stderr.Trim(), Does.StartWith($"error: {unknown}:2: unrecognized option 'learning_rate' for 'nativepeft estimate'"));
        Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1), r.ToString());

        string bad = Write("b.json", "{\"model\": \"llama3-8b\",\n\"rank\": 8,,\n}");
        r = CliProcess.Run("estimate", "--config", bad);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.StartWith($"error: {bad}:2: invalid JSON"));

        // a value the option cannot take is the parser's normal error
        string wrongType = Write("w.yaml", "model: llama3-8b\nrank: many\n");
        r = CliProcess.Run("estimate", "--config", wrongType);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("many").And.Contain("--rank"));
    }

    /// <summary>train reads its options from the file too: a bad --method from the file is reported by train's check, and the command line fixes it.</summary>
    [Test]
    public void TrainTakesItsOptionsFromTheFile()
    {
        string f = Write("train.yaml", $"model: '{_dir["no-such-model"]}'\ndata: builtin\nout: '{_dir["out"]}'\nmethod: dora\nlr: 2e-4\nrslora: true\ntargets: [q_proj, v_proj]\n");
        var r = CliProcess.Run("train", "--config", f);
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: --method dora: expected one of lora, qlora, full"));

        r = CliProcess.Run("train", "--config", f, "--method", "qlora");
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.StartWith($"error: --model {_dir["no-such-model"]}: folder not found"));
        Assert.That(Directory.Exists(_dir["out"]), Is.False);

        var json = Write("train.json", "{\"model\": \"x\", \"data\": \"builtin\", \"out\": \"y\", \"targets\": [\"q_proj\", \"nope_proj\"]}");
        r = CliProcess.Run("train", "--config", json);
        Assert.That(r.Stderr, Does.StartWith("error: --targets: unknown module \"nope_proj\""), r.ToString());
    }
}
