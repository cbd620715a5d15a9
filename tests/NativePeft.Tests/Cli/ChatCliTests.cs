using System.Text.Json;
using NativePeft.Data;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`train` and `eval` read chat JSONL; eval with a model folder whose tokenizer_config.json has a chat_template uses it.</summary>
[Parallelizable(ParallelScope.None)]
public class ChatCliTests
{
    private static readonly string[] Lines =
    [
        """{"messages": [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "CAT"}]}""",
        """{"messages": [{"role": "system", "content": "Shout."}, {"role": "user", "content": "dog"}, {"role": "assistant", "content": "DOG"}]}""",
    ];

    [Test]
    public void TrainOnChatJsonl_Runs()
    {
        using var dir = CliProcess.TempDir();
        File.WriteAllLines(dir["chat.jsonl"], Lines);
        var r = CliProcess.Run("train", "--model", "builtin", "--data", dir["chat.jsonl"], "--steps", "2", "--batch", "2", "--seq", "128", "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), r.ToString());
    }

    private static long Tokens(string model, string data)
    {
        var r = CliProcess.Run("eval", "--model", model, "--data", data, "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        return doc.RootElement.GetProperty("tokens").GetInt64();
    }

    [Test]
    public void Eval_DefaultTemplate_ThenTheModelsChatTemplate()
    {
        using var dir = CliProcess.TempDir();
        File.WriteAllLines(dir["chat.jsonl"], Lines);
        // Default template: each assistant span is "CAT<|im_end|>\n" (3 + 11 bytes) and is predicted from the position before.
        Assert.That(Tokens("builtin", dir["chat.jsonl"]), Is.EqualTo(2 * 14));

        // A copy of the built-in model whose tokenizer_config.json has a chat template: the span is "CAT" + eos (4 targets;
        // the header "assistant> " is the generation prompt, so it is not learned).
        string model = dir["model"];
        Directory.CreateDirectory(model);
        foreach (var f in Directory.GetFiles(BuiltinModel.Directory)) File.Copy(f, Path.Combine(model, Path.GetFileName(f)));
        File.WriteAllText(Path.Combine(model, "tokenizer_config.json"),
            $"{{\"tokenizer_class\": \"{TokenizerLoader.ByteTokenizerClass}\", \"bos_token_id\": 256, \"eos_token_id\": 257, \"pad_token_id\": 258, " +
            "\"chat_template\": \"{{ bos_token }}{% for m in messages %}{{ m.role }}> {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}" +
            "{% if add_generation_prompt %}assistant> {% endif %}\"}");
        Assert.That(Tokens(model, dir["chat.jsonl"]), Is.EqualTo(2 * 4));

        File.WriteAllText(Path.Combine(model, "tokenizer_config.json"),
            $"{{\"tokenizer_class\": \"{TokenizerLoader.ByteTokenizerClass}\", \"chat_template\": \"{{% include 'x' %}}\"}}");
        var r = CliProcess.Run("eval", "--model", model, "--data", dir["chat.jsonl"]);
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.Contain("unsupported construct: {% include %}").And.Contain("tokenizer_config.json line 1"), r.ToString());
        r = CliProcess.Run("train", "--model", model, "--data", dir["chat.jsonl"], "--steps", "1", "--out", dir["out2"]);
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.Contain("unsupported construct: {% include %}"), r.ToString());
    }
}
