using System.Text.Json;
using NativePeft.Data.Jinja;
using NativePeft.IO;

namespace NativePeft.Data;

/// <summary>
/// A chat template: the model's (tokenizer_config.json's <c>chat_template</c>: a string, or a list of
/// <c>{"name", "template"}</c> of which "default" is taken) or <see cref="DefaultSource"/>, with the bos/eos token
/// strings it is rendered with. The template is parsed on first use, so a model whose template we cannot read still
/// trains on the other formats.
/// </summary>
public sealed class ChatTemplate
{
    /// <summary>
    /// The default template (ChatML, after a bos token): <c>&lt;|im_start|&gt;role\ncontent&lt;|im_end|&gt;\n</c> per
    /// message; with add_generation_prompt the header <c>&lt;|im_start|&gt;assistant\n</c>.
    /// </summary>
    public const string DefaultSource =
        "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// <summary>bos / eos token names used when tokenizer_config.json names none (they become the tokenizer's bos / eos ids).</summary>
    public const string DefaultBosToken = "<s>", DefaultEosToken = "</s>";

    private JinjaTemplate? _parsed;

    /// <summary>The Jinja source.</summary>
    public string Source { get; }
    /// <summary>What messages call it: "the default chat template" or "the chat template of DIR/tokenizer_config.json".</summary>
    public string Name { get; }
    /// <summary>The bos_token variable (and the text that becomes the tokenizer's bos id).</summary>
    public string BosToken { get; }
    /// <summary>The eos_token variable (and the text that becomes the tokenizer's eos id).</summary>
    public string EosToken { get; }
    /// <summary>True for <see cref="DefaultSource"/>.</summary>
    public bool IsDefault { get; }

    public ChatTemplate(string source, string name, string bosToken = DefaultBosToken, string eosToken = DefaultEosToken, bool isDefault = false)
    {
        Source = source ?? throw new ArgumentNullException(nameof(source));
        Name = name; BosToken = bosToken; EosToken = eosToken; IsDefault = isDefault;
    }

    /// <summary>The default template with bos "&lt;s&gt;" and eos "&lt;/s&gt;".</summary>
    public static ChatTemplate Default { get; } = new(DefaultSource, "the default chat template", isDefault: true);

    /// <summary>The parsed template; a construct we do not support throws <see cref="JinjaException"/> naming it and its line.</summary>
    public JinjaTemplate Template => _parsed ??= JinjaTemplate.Parse(Source, Name);

    /// <summary>
    /// The chat template of a model folder: tokenizer_config.json's chat_template (bos_token / eos_token from the same
    /// file), else the default template with that file's bos/eos names (or &lt;s&gt; / &lt;/s&gt;). A folder without the
    /// file, or null, gives <see cref="Default"/>.
    /// </summary>
    public static ChatTemplate ForModel(string? dir)
    {
        if (dir is null) return Default;
        string file = Path.Combine(dir, "tokenizer_config.json");
        if (!File.Exists(file)) return Default;
        JsonDocument doc = TextInput.ReadJsonFile(file, (problem, inner) => new InvalidDataException($"{file}: {problem}", inner));
        using (doc)
        {
            var r = doc.RootElement;
            if (r.ValueKind != JsonValueKind.Object) return Default;
            string bos = TokenName(r, "bos_token") ?? DefaultBosToken, eos = TokenName(r, "eos_token") ?? DefaultEosToken;
            if (!r.TryGetProperty("chat_template", out var ct) || ct.ValueKind == JsonValueKind.Null)
                return new ChatTemplate(DefaultSource, Default.Name, bos, eos, isDefault: true);
            string name = $"the chat template of {file}";
            if (ct.ValueKind == JsonValueKind.String) return new ChatTemplate(ct.GetString()!, name, bos, eos);
            if (ct.ValueKind == JsonValueKind.Array)
            {
                foreach (var t in ct.EnumerateArray())
                    if (t.ValueKind == JsonValueKind.Object && t.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String && n.GetString() == "default"
                        && t.TryGetProperty("template", out var src) && src.ValueKind == JsonValueKind.String)
                        return new ChatTemplate(src.GetString()!, $"the chat template \"default\" of {file}", bos, eos);
                throw new InvalidDataException($"{file}: chat_template is a list without a {{\"name\": \"default\", \"template\": ...}} entry");
            }
            throw new InvalidDataException($"{file}: chat_template is neither a string nor a list of {{\"name\", \"template\"}}");
        }
    }

    private static string? TokenName(JsonElement r, string key)
    {
        if (!r.TryGetProperty(key, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.String => v.GetString(),
            JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
            _ => null,
        };
    }

    /// <summary>The template rendered for <paramref name="messages"/> (JSON objects), bos_token, eos_token and add_generation_prompt.</summary>
    public string Render(IReadOnlyList<JsonElement> messages, bool addGenerationPrompt) =>
        Template.Render(new Dictionary<string, object?>
        {
            ["messages"] = messages.Select(m => (object?)m).ToList(),
            ["bos_token"] = BosToken,
            ["eos_token"] = EosToken,
            ["add_generation_prompt"] = addGenerationPrompt,
        });
}

/// <summary>
/// Chat conversations (<c>{"messages": [{"role", "content"}, ...]}</c>) as training examples with the loss on the
/// assistant turns only. The conversation is rendered with the <see cref="ChatTemplate"/>; the text each assistant
/// message k adds is found by rendering prefixes: it starts where render(messages[:k], add_generation_prompt=true)
/// ends (so the assistant header is not learned; when that is not a prefix of the conversation, where
/// render(messages[:k]) ends) and ends where render(messages[:k+1]) ends, so it holds the content and the turn's end
/// marker (ChatML: "content&lt;|im_end|&gt;\n"; Llama 3: "content&lt;|eot_id|&gt;"). The text is tokenized in segments:
/// each stretch between assistant spans and each assistant span separately (bos/eos token names become the
/// tokenizer's ids), the ids concatenated; labels are the ids on the assistant segments and -100 elsewhere. Cutting
/// at the boundaries means BPE never merges across a prompt/answer boundary, so the ids can differ from tokenizing the
/// whole text at a boundary (mostly a space or newline), in exchange for labels that cover exactly the assistant text.
/// </summary>
public static class ChatFormat
{
    /// <summary>The roles a message may have.</summary>
    public static readonly IReadOnlyList<string> Roles = ["system", "user", "assistant"];

    /// <summary>
    /// The example for one conversation. Problems with the conversation or the template's output throw
    /// <see cref="InvalidDataException"/>; the template's own errors (raise_exception, a limit) <see cref="JinjaException"/>.
    /// </summary>
    public static TrainingExample Build(ITokenizer tokenizer, ChatTemplate template, IReadOnlyList<JsonElement> messages)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(template);
        var spans = AssistantSpans(template, messages, out string full);
        var ids = new List<int>();
        var labels = new List<int>();
        int at = 0;
        void Add(int from, int to, bool learn)
        {
            if (to <= from) return;
            foreach (int id in EncodeSegment(tokenizer, template, full[from..to]))
            {
                ids.Add(id);
                labels.Add(learn ? id : TrainingExample.IgnoreIndex);
            }
        }
        foreach (var (start, end) in spans)
        {
            Add(at, start, false);
            Add(start, end, true);
            at = end;
        }
        Add(at, full.Length, false);
        if (ids.Count == 0) throw new InvalidDataException("the chat template rendered nothing");
        return new TrainingExample(ids.ToArray(), labels.ToArray());
    }

    /// <summary>The rendered conversation and the character span [start, end) of each assistant message in it.</summary>
    public static List<(int Start, int End)> AssistantSpans(ChatTemplate template, IReadOnlyList<JsonElement> messages, out string full)
    {
        full = template.Render(messages, addGenerationPrompt: false);
        var spans = new List<(int, int)>();
        int last = 0;
        for (int k = 0; k < messages.Count; k++)
        {
            if (messages[k].GetProperty("role").GetString() != "assistant") continue;
            var before = messages.Take(k).ToList();
            string upTo = template.Render(messages.Take(k + 1).ToList(), addGenerationPrompt: false);
            if (!full.StartsWith(upTo, StringComparison.Ordinal))
                throw new InvalidDataException($"{template.Name} does not render messages[0..{k}] as the start of the whole conversation, " +
                    "so the assistant turn cannot be found (its output depends on later messages)");
            // A template may fail on an empty conversation (messages[0]['role']): an assistant message first has no prefix.
            string? prefix = TryRender(template, before, true, k);
            if (prefix is null || !upTo.StartsWith(prefix, StringComparison.Ordinal))
            {
                prefix = TryRender(template, before, false, k) ?? "";
                if (!upTo.StartsWith(prefix, StringComparison.Ordinal))
                    throw new InvalidDataException($"{template.Name} does not render messages[0..{k - 1}] as the start of messages[0..{k}], " +
                        "so the assistant turn cannot be found");
            }
            int start = Math.Max(prefix.Length, last);
            spans.Add((start, upTo.Length));
            last = upTo.Length;
        }
        return spans;
    }

    private static string? TryRender(ChatTemplate template, List<JsonElement> before, bool addGenerationPrompt, int k)
    {
        if (k > 0) return template.Render(before, addGenerationPrompt);
        try { return template.Render(before, addGenerationPrompt); }
        catch (JinjaException) { return null; }
    }

    /// <summary>
    /// Token ids of one segment: the template's bos / eos token names become the tokenizer's bos / eos ids (whatever
    /// the tokenizer does with them in text), the text between them is encoded without bos.
    /// </summary>
    public static List<int> EncodeSegment(ITokenizer tokenizer, ChatTemplate template, string text)
    {
        var specials = new List<(string Text, int Id)>();
        if (tokenizer.BosId is int bos && template.BosToken.Length > 0) specials.Add((template.BosToken, bos));
        if (tokenizer.EosId is int eos && template.EosToken.Length > 0) specials.Add((template.EosToken, eos));
        var ids = new List<int>();
        int at = 0;
        while (at < text.Length)
        {
            int next = -1, which = -1;
            for (int s = 0; s < specials.Count; s++)
            {
                int i = text.IndexOf(specials[s].Text, at, StringComparison.Ordinal);
                if (i >= 0 && (next < 0 || i < next || (i == next && specials[s].Text.Length > specials[which].Text.Length))) { next = i; which = s; }
            }
            int stop = next < 0 ? text.Length : next;
            if (stop > at) ids.AddRange(tokenizer.Encode(text[at..stop], addBos: false));
            if (next < 0) break;
            ids.Add(specials[which].Id);
            at = next + specials[which].Text.Length;
        }
        return ids;
    }
}
