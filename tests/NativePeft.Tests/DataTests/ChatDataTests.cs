using System.Text;
using System.Text.Json;
using NativePeft.Data;
using NativePeft.Data.Jinja;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

/// <summary>
/// Chat JSONL: detection, the default template on the byte tokenizer (ids = UTF-8 bytes, so the expected ids and
/// labels are written from the text by hand), a model folder's chat_template, and errors naming file:line.
/// </summary>
public class ChatDataTests
{
    private const int M = TrainingExample.IgnoreIndex;
    private static readonly ByteTokenizer Bt = ByteTokenizer.Instance;

    private static string Write(string content, string ext = ".jsonl")
    {
        string p = Path.Combine(Path.GetTempPath(), "np-chat-" + Guid.NewGuid().ToString("N") + ext);
        File.WriteAllText(p, content);
        return p;
    }

    private static int[] Bytes(string s) => Encoding.UTF8.GetBytes(s).Select(b => (int)b).ToArray();
    private static int[] Masked(int n) => Enumerable.Repeat(M, n).ToArray();

    private const string TwoTurns =
        """{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Héllo"}, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes"}]}""";

    [Test]
    public void DefaultTemplate_ByteTokenizer_LabelsExactlyOnTheAssistantTurns()
    {
        string p = Write(TwoTurns + "\n");
        Assert.That(DatasetLoader.DetectFormat(p), Is.EqualTo(DataFormat.Chat));
        var d = DatasetLoader.Load(p, DataFormat.Auto, Bt, 512);
        Assert.That(d.Count, Is.EqualTo(1));
        // <s> → bos; then ChatML; each assistant span is its content and "<|im_end|>\n" (the header is prompt).
        string p1 = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", a1 = "Héllo<|im_end|>\n";
        string p2 = "<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n", a2 = "Yes<|im_end|>\n";
        int[] ids = [ByteTokenizer.Bos, .. Bytes(p1), .. Bytes(a1), .. Bytes(p2), .. Bytes(a2)];
        int[] labels = [M, .. Masked(Bytes(p1).Length), .. Bytes(a1), .. Masked(Bytes(p2).Length), .. Bytes(a2)];
        Assert.That(d[0].InputIds, Is.EqualTo(ids));
        Assert.That(d[0].Labels, Is.EqualTo(labels));
        Assert.That(Encoding.UTF8.GetString(d[0].InputIds.Where(i => i < 256).Select(i => (byte)i).ToArray()), Is.EqualTo(p1 + a1 + p2 + a2));
        Assert.That(d.LabelledTokens, Is.EqualTo(6 + 11 + 3 + 11), "Héllo is 6 bytes, <|im_end|>\\n 11");
    }

    private static string ModelFolder(string chatTemplateJson)
    {
        string dir = Path.Combine(Path.GetTempPath(), "np-chat-model-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"),
            $"{{\"tokenizer_class\": \"{TokenizerLoader.ByteTokenizerClass}\", \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"chat_template\": {chatTemplateJson}}}");
        return dir;
    }

    /// <summary>A template of our own: "ROLE: content", eos after an assistant turn, "|" between turns.</summary>
    private const string Template =
        "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}|{% endfor %}" +
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}";

    [Test]
    public void ModelFolderChatTemplate_IsUsed_StringOrDefaultEntryOfAList()
    {
        string json = JsonSerializer.Serialize(Template);
        foreach (string dir in new[] { ModelFolder(json), ModelFolder($"[{{\"name\": \"tool_use\", \"template\": \"x\"}}, {{\"name\": \"default\", \"template\": {json}}}]") })
        {
            var tok = TokenizerLoader.FromFolder(dir);
            var t = ChatTemplate.ForModel(dir);
            Assert.That(t.IsDefault, Is.False);
            Assert.That(t.Name, Does.Contain(Path.Combine(dir, "tokenizer_config.json")));
            string p = Write("""{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}""" + "\n");
            var d = DatasetLoader.Load(p, DataFormat.Auto, tok, 512, chatTemplate: t);
            string prompt = "SYSTEM: Be brief.|USER: 2+2?|ASSISTANT: ";
            Assert.That(d[0].InputIds, Is.EqualTo(new[] { ByteTokenizer.Bos }.Concat(Bytes(prompt)).Concat([(int)'4', ByteTokenizer.Eos, (int)'|'])));
            Assert.That(d[0].Labels, Is.EqualTo(Masked(1 + prompt.Length).Concat([(int)'4', ByteTokenizer.Eos, (int)'|'])));
        }
    }

    [Test]
    public void Llama3Template_BpeTokenizer_AssistantSpanIsContentAndEotId()
    {
        string dir = Path.Combine(Path.GetTempPath(), "np-chat-llama3-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "tokenizers", "bpe", "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), JsonSerializer.Serialize(new Dictionary<string, string>
        {
            ["bos_token"] = "<|begin_of_text|>", ["eos_token"] = "<|end_of_text|>", ["chat_template"] = JinjaTests.Llama3Template,
        }));
        var tok = (HfBpeTokenizer)TokenizerLoader.FromFolder(dir);
        string p = Write("""{"messages": [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": " Hello"}]}""" + "\n");
        var d = DatasetLoader.Load(p, DataFormat.Auto, tok, 512, chatTemplate: ChatTemplate.ForModel(dir));
        // Written from the template by hand: the content is trimmed; the generation prompt is the assistant header.
        string prompt = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        int[] a = tok.Encode(prompt, addBos: false), b = tok.Encode("Hello<|eot_id|>", addBos: false);
        Assert.That(a[0], Is.EqualTo(tok.BosId), "bos once, from the template's bos_token");
        Assert.That(b[^1], Is.EqualTo(tok.TokenToId("<|eot_id|>")));
        Assert.That(d[0].InputIds, Is.EqualTo(a.Concat(b)));
        Assert.That(d[0].Labels, Is.EqualTo(Masked(a.Length).Concat(b)));
    }

    [Test]
    public void MistralTemplate_NoGenerationPrompt_SpanIsContentAndEos()
    {
        // Mistral's template writes bos_token / eos_token as text: they become the byte tokenizer's ids 256 / 257.
        var t = new ChatTemplate(JinjaTests.MistralTemplate, "mistral", "<s>", "</s>");
        string p = Write("""{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Ok"}]}""" + "\n");
        var d = DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, chatTemplate: t);
        int[] ids = [ByteTokenizer.Bos, .. Bytes("[INST] Hi [/INST]"), .. Bytes("Yo"), ByteTokenizer.Eos, .. Bytes("[INST] Again [/INST]"), .. Bytes("Ok"), ByteTokenizer.Eos];
        int[] labels = [M, .. Masked(17), .. Bytes("Yo"), ByteTokenizer.Eos, .. Masked(20), .. Bytes("Ok"), ByteTokenizer.Eos];
        Assert.That(d[0].InputIds, Is.EqualTo(ids));
        Assert.That(d[0].Labels, Is.EqualTo(labels));
    }

    [Test]
    public void AssistantFirst_WithATemplateThatFailsOnNoMessages_WholeTurnIsTheSpan()
    {
        // messages[0] of an empty conversation is undefined and ['role'] of it an error: the first turn has no prefix.
        var t = new ChatTemplate("{{ messages[0]['role'] }}:{% for m in messages %}{{ m.content }};{% endfor %}", "first-role template");
        string p = Write("""{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}]}""" + "\n");
        var d = DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, chatTemplate: t);
        Assert.That(d[0].InputIds, Is.EqualTo(Bytes("assistant:A;U;")));
        Assert.That(d[0].Labels, Is.EqualTo(Bytes("assistant:A;").Concat(Masked(2))));
    }

    [Test]
    public void ModelFolderWithoutChatTemplate_GetsTheDefaultWithItsTokenNames()
    {
        Assert.That(ChatTemplate.ForModel(null), Is.SameAs(ChatTemplate.Default));
        string dir = Path.Combine(Path.GetTempPath(), "np-chat-model-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{\"bos_token\": {\"content\": \"<|begin_of_text|>\"}, \"eos_token\": \"<|eot|>\"}");
        var t = ChatTemplate.ForModel(dir);
        Assert.That((t.IsDefault, t.Source, t.BosToken, t.EosToken), Is.EqualTo((true, ChatTemplate.DefaultSource, "<|begin_of_text|>", "<|eot|>")));
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{\"chat_template\": 3}");
        Assert.That(Assert.Throws<InvalidDataException>(() => ChatTemplate.ForModel(dir))!.Message, Does.Contain("chat_template is neither a string nor a list"));
    }

    [TestCase("{\"text\": \"x\"}", "missing \"messages\"")]
    [TestCase("{\"messages\": {}}", "\"messages\" is not an array")]
    [TestCase("{\"messages\": []}", "\"messages\" is empty")]
    [TestCase("{\"messages\": [{\"content\": \"x\"}]}", "messages[0].role is missing")]
    [TestCase("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\"}]}", "messages[1].content is missing")]
    [TestCase("{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}", "messages[0].content is not a string")]
    [TestCase("{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}", "messages[0].role \"tool\" is not one of system, user, assistant")]
    [TestCase("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", "no assistant message")]
    [TestCase("{\"messages\": [1]}", "messages[0] is not an object")]
    [TestCase("{\"messages\": [", "invalid JSON")]
    public void Errors_NameFileAndLine_AndSkipLeavesTheLineOut(string bad, string what)
    {
        string p = Write(TwoTurns + "\n\n" + bad + "\n" + TwoTurns + "\n");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(p, DataFormat.Chat, Bt, 512));
        Assert.That(e!.Message, Does.StartWith($"{p}:3: ").And.Contains(what));
        var d = DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, BadLinePolicy.Skip);
        Assert.That((d.Count, d.SkippedLines), Is.EqualTo((2, 1)));
        Assert.That(d.SkippedMessages[0], Does.StartWith($"{p}:3: "));
    }

    [Test]
    public void TemplateErrors_RaiseExceptionNamesTheLine_UnsupportedConstructStopsBeforeReading()
    {
        string p = Write(TwoTurns + "\n" + """{"messages": [{"role": "assistant", "content": "first"}]}""" + "\n");
        var strict = new ChatTemplate(
            "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with the user') }}{% endif %}" +
            "{% for m in messages %}{{ m.content }}{% endfor %}", "strict template");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, chatTemplate: strict));
        Assert.That(e!.Message, Is.EqualTo($"{p}:2: strict template line 1: raise_exception: Conversation must start with the user"));

        var macro = new ChatTemplate("{% macro f() %}{% endmacro %}", "macro template");
        var j = Assert.Throws<JinjaException>(() => DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, chatTemplate: macro));
        Assert.That(j!.Message, Does.StartWith("macro template line 1: unsupported construct: {% macro %}"));
    }

    [Test]
    public void TemplateThatIsNotIncremental_IsAnErrorNamingTheLine()
    {
        // Renders the last message first: messages[:k] is not the start of the whole conversation.
        var reversed = new ChatTemplate("{% for m in messages[::-1] %}{{ m.content }};{% endfor %}", "reversed template");
        string p = Write(TwoTurns + "\n");
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.Load(p, DataFormat.Chat, Bt, 512, chatTemplate: reversed));
        Assert.That(e!.Message, Does.StartWith($"{p}:1: reversed template does not render messages[0..1]"));
    }
}

/// <summary>docs/data-formats.md shows the templates the code uses, character for character.</summary>
public class DataFormatsDocTests
{
    private static string Doc()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln")))
                return File.ReadAllText(Path.Combine(dir.FullName, "docs", "data-formats.md")).Replace("\r\n", "\n");
        throw new IgnoreException("not in a source checkout (no NativePeft.sln above the tests)");
    }

    [Test]
    public void AlpacaTemplatesAndTheDefaultChatTemplate_AreInTheDoc()
    {
        string doc = Doc();
        Assert.That(doc, Does.Contain("```\n" + AlpacaFormat.Prompt("{instruction}", "{input}") + "\n```"));
        Assert.That(doc, Does.Contain("```\n" + AlpacaFormat.Prompt("{instruction}", null) + "\n```"));
        Assert.That(doc, Does.Contain("```jinja\n" + ChatTemplate.DefaultSource + "\n```"));
    }
}
