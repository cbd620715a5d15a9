using System.Text.Json;
using NativePeft.Data.Jinja;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

/// <summary>
/// The chat-template interpreter: public templates rendered against outputs written by hand, the expression and
/// statement subset, whitespace control as transformers sets it (trim_blocks, lstrip_blocks), the limits and the
/// errors for unsupported constructs.
/// </summary>
public class JinjaTests
{
    /// <summary>meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.</summary>
    public const string Llama3Template =
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + " +
        "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}" +
        "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// <summary>HuggingFaceH4/zephyr-7b-beta's chat_template (one statement per line: trim_blocks matters).</summary>
    public const string ZephyrTemplate =
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n" +
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n" +
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n" +
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    /// <summary>A ChatML template (as Qwen and many fine-tunes use).</summary>
    public const string ChatMlTemplate =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    private static List<object?> Messages(params (string Role, string Content)[] m) =>
        m.Select(x => (object?)new Dictionary<string, object?> { ["role"] = x.Role, ["content"] = x.Content }).ToList();

    private static string Render(string template, Dictionary<string, object?>? vars = null, JinjaLimits? limits = null) =>
        JinjaTemplate.Parse(template, "test template", limits).Render(vars ?? new Dictionary<string, object?>());

    [Test]
    public void Llama3_Conversation()
    {
        var vars = new Dictionary<string, object?>
        {
            ["messages"] = Messages(("system", "You are kind."), ("user", "  Hi there \n"), ("assistant", "Hello!")),
            ["bos_token"] = "<|begin_of_text|>", ["eos_token"] = "<|end_of_text|>", ["add_generation_prompt"] = false,
        };
        Assert.That(Render(Llama3Template, vars), Is.EqualTo(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are kind.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>" +
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"));
        vars["messages"] = Messages(("user", "Q"));
        vars["add_generation_prompt"] = true;
        Assert.That(Render(Llama3Template, vars), Is.EqualTo(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    /// <summary>Qwen/Qwen2.5-7B-Instruct's chat_template (tools, tool calls, namespace-free but tojson, loop.first, is defined, set in a loop).</summary>
    public const string Qwen25Template = """
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""" + "\n";

    /// <summary>mistralai/Mistral-7B-Instruct-v0.1's chat_template: bos/eos in the text, raise_exception on roles out of turn.</summary>
    public const string MistralTemplate =
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}" +
        "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    [Test]
    public void Qwen25_PlainToolsAndToolCalls()
    {
        var vars = new Dictionary<string, object?> { ["messages"] = Messages(("system", "S"), ("user", "Hi"), ("assistant", "Yo")), ["add_generation_prompt"] = false };
        Assert.That(Render(Qwen25Template, vars), Is.EqualTo("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"));
        vars["messages"] = Messages(("user", "Hi"));
        vars["add_generation_prompt"] = true;
        Assert.That(Render(Qwen25Template, vars), Is.EqualTo(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
        using var doc = JsonDocument.Parse("""
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
             "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]}
            """);
        vars = new Dictionary<string, object?>
        {
            ["tools"] = doc.RootElement.GetProperty("tools"), ["messages"] = doc.RootElement.GetProperty("messages"), ["add_generation_prompt"] = false,
        };
        Assert.That(Render(Qwen25Template, vars), Is.EqualTo(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n" +
            "You may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" +
            "{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {}}}\n</tools>\n\n" +
            "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n" +
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" +
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>\n"));
    }

    [Test]
    public void Mistral_AlternationAndRaiseException()
    {
        var vars = new Dictionary<string, object?>
        {
            ["messages"] = Messages(("user", "Hi"), ("assistant", "Yo"), ("user", "Again")), ["bos_token"] = "<s>", ["eos_token"] = "</s>",
        };
        Assert.That(Render(MistralTemplate, vars), Is.EqualTo("<s>[INST] Hi [/INST]Yo</s>[INST] Again [/INST]"));
        vars["messages"] = Messages(("assistant", "Yo"));
        Assert.That(Assert.Throws<JinjaException>(() => Render(MistralTemplate, vars))!.Message,
            Is.EqualTo("test template line 1: raise_exception: Conversation roles must alternate user/assistant/user/assistant/..."));
    }

    [Test]
    public void Zephyr_TrimBlocksKeepsOnlyTheOutputsNewlines()
    {
        var vars = new Dictionary<string, object?>
        {
            ["messages"] = Messages(("system", "S"), ("user", "Hi"), ("assistant", "Yo")), ["eos_token"] = "</s>", ["add_generation_prompt"] = false,
        };
        Assert.That(Render(ZephyrTemplate, vars), Is.EqualTo("<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"));
        vars["messages"] = Messages(("user", "Hi"));
        vars["add_generation_prompt"] = true;
        Assert.That(Render(ZephyrTemplate, vars), Is.EqualTo("<|user|>\nHi</s>\n<|assistant|>\n"));
    }

    [Test]
    public void ChatMl_FromJsonMessages()
    {
        using var doc = JsonDocument.Parse("""[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]""");
        var vars = new Dictionary<string, object?> { ["messages"] = doc.RootElement, ["add_generation_prompt"] = false };
        Assert.That(Render(ChatMlTemplate, vars), Is.EqualTo("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"));
    }

    [TestCase("{{ 'a' ~ 1 ~ none ~ true }}", "a1NoneTrue")]
    [TestCase("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 + 2 * 3 }}", "3 -4 1 2 3.5 1024 7")]
    [TestCase("{{ [1, 2, 3, 4][1:] }}|{{ [1, 2, 3][-1] }}|{{ 'hello'[1:3] }}|{{ [1, 2, 3][::-1] }}|{{ [1, 2][5] }}", "[2, 3, 4]|3|el|[3, 2, 1]|")]
    [TestCase("{{ 'b' in 'abc' }} {{ 2 not in [1, 3] }} {{ 'k' in {'k': 1} }} {{ not 1 == 1 }} {{ 1 < 2 and 'a' < 'b' }}", "True True True False True")]
    [TestCase("{{ x is defined }} {{ x is not defined }} {{ none is none }} {{ 'a' is string }} {{ 3 is string }} {{ {} is mapping }}", "False True True True False True")]
    [TestCase("{{ 'yes' if 0 else 'no' }}|{{ 'yes' if [1] }}|{{ 0 or 'alt' }}|{{ 1 and 'both' }}", "no|yes|alt|both")]
    [TestCase("{{ '  x ' | trim | upper }}{{ 'AB' | lower }}{{ [1, 2] | length }}{{ 'abc' | length }}{{ x | default('d') }}{{ none | default('d') }}", "Xab23dNone")]
    [TestCase("{{ ['a', 'b'] | join(', ') }}|{{ [1, 2] | join }}|{{ [3, 4] | first }}{{ [3, 4] | last }}", "a, b|12|34")]
    [TestCase("{{ {'a': 'x\"y\n', 'b': [1, 2.5, true, none]} | tojson }}", "{\"a\": \"x\\\"y\\n\", \"b\": [1, 2.5, true, null]}")]
    [TestCase("{{ {'a': 1} | tojson(indent=2) }}", "{\n  \"a\": 1\n}")]
    [TestCase("{% for x in [5, 6, 7] %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}",
        "10TrueFalse3;21FalseFalse3;32FalseTrue3;")]
    [TestCase("{% for x in [1, 2, 3, 4] if x % 2 == 0 %}{{ x }}/{{ loop.length }} {% endfor %}", "2/2 4/2 ")]
    [TestCase("{% for x in [] %}no{% else %}empty{% endfor %}", "empty")]
    [TestCase("{% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", "13")]
    [TestCase("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;")]
    [TestCase("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}", "21")]
    [TestCase("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", "6")]
    [TestCase("{% if 1 > 2 %}a{% elif 2 > 1 %}b{% else %}c{% endif %}", "b")]
    [TestCase("{{ ' a '.strip() }}{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith('x') }}{{ 'a,b'.split(',') }}{{ {'k': 'v'}.get('k') }}", "aTrueFalse['a', 'b']v")]
    [TestCase("{% set d = {'role': 'user'} %}{{ d.role }}{{ d['role'] }}{{ d.missing is defined }}", "useruserFalse")]
    [TestCase("a  {%- if true -%}  b  {%- endif %}  c", "ab  c")]
    [TestCase("x\n    {% if true %}\n    y\n    {% endif %}\nz\n", "x\n    y\nz")]
    [TestCase("{{- ' a ' -}}\n{# comment #}\nb", " a b")]
    [TestCase("{% generation %}{{ 'g' }}{% endgeneration %}", "g")]
    public void Expressions_AndStatements(string template, string expected) => Assert.That(Render(template), Is.EqualTo(expected));

    [TestCase("{% for i in range(10000000) %}{% endfor %}", "step limit")]
    [TestCase("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "step limit")]
    [TestCase("{% for i in range(100000) %}{{ '0123456789abcdefghij' }}{% endfor %}", "output limit")]
    [TestCase("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "output limit")]
    [TestCase("{{ 'x' * 100000000 }}", "output limit")]
    [TestCase("{{ 'x' * 9000000000000000000 }}", "output limit")]
    [TestCase("{{ ['x' * 999999] * 999999 }}", "output limit")]
    [TestCase("{{ ('x' * 999999).replace('x', 'xx') }}", "output limit")]
    [TestCase("{{ ('x' * 999999) | replace('x', 'xx') }}", "output limit")]
    public void Limits_NameTheLimit(string template, string limit)
    {
        var e = Assert.Throws<JinjaException>(() => Render(template));
        Assert.That(e!.Message, Does.StartWith("test template line 1: ").And.Contains(limit));
    }

    [Test]
    public void Limits_DeepNestingAndTime()
    {
        string parens = new string('(', 100) + "1" + new string(')', 100);
        Assert.That(Assert.Throws<JinjaException>(() => Render("{{ " + parens + " }}"))!.Message, Does.Contain("nesting deeper than the limit of 64"));
        string ifs = string.Concat(Enumerable.Repeat("{% if true %}", 70)) + "x" + string.Concat(Enumerable.Repeat("{% endif %}", 70));
        Assert.That(Assert.Throws<JinjaException>(() => Render(ifs))!.Message, Does.Contain("nesting deeper than the limit of 64"));
        string ten = string.Concat(Enumerable.Repeat("{% if true %}", 10)) + "x" + string.Concat(Enumerable.Repeat("{% endif %}", 10));
        Assert.That(Render(ten), Is.EqualTo("x"));
        var quick = new JinjaLimits { MaxSteps = long.MaxValue, MaxTime = TimeSpan.FromMilliseconds(50) };
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<JinjaException>(() => Render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", limits: quick));
        Assert.That(e!.Message, Does.Contain("time limit (0.05 s)"));
        Assert.That(sw.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)));
    }

    [TestCase("a\nb\n{% macro f() %}x{% endmacro %}", 3, "{% macro %}")]
    [TestCase("{% include 'other.jinja' %}", 1, "{% include %}")]
    [TestCase("{% extends 'base.jinja' %}", 1, "{% extends %}")]
    [TestCase("{% import 'm.jinja' as m %}", 1, "{% import %}")]
    [TestCase("\n{% call f() %}x{% endcall %}", 2, "{% call %}")]
    [TestCase("{{ 'a' | wordcount }}", 1, "the filter |wordcount")]
    [TestCase("{{ 'a'.format(1) }}", 1, "the method .format()")]
    [TestCase("{{ ''.__class__ }}", 1, "")]
    [TestCase("{{ cycler() }}", 1, "the function cycler()")]
    [TestCase("{{ 'a %s' % 1 }}", 1, "% string formatting")]
    [TestCase("{{ 1 is divisibleby(2) }}", 1, "the test 'divisibleby'")]
    public void Unsupported_NamesTheConstructAndLine(string template, int line, string construct)
    {
        if (construct.Length == 0)
        {
            // No host objects: an attribute that is not a key of a dict is undefined, never a .NET or Python member.
            Assert.That(Render(template), Is.EqualTo(""));
            return;
        }
        var e = Assert.Throws<JinjaException>(() => Render(template));
        Assert.That(e!.Message, Does.StartWith($"test template line {line}: ").And.Contains(construct));
    }

    [Test]
    public void RaiseException_NamesTheTemplateAndMessage()
    {
        var e = Assert.Throws<JinjaException>(() => Render("\n{{ raise_exception('Conversation roles must alternate') }}"));
        Assert.That(e!.Message, Is.EqualTo("test template line 2: raise_exception: Conversation roles must alternate"));
    }

    [Test]
    public void SyntaxErrors_AndHostObjects()
    {
        Assert.That(Assert.Throws<JinjaException>(() => Render("{% if true %}x"))!.Message, Does.Contain("ended before {% elif %} or {% else %} or {% endif %}"));
        Assert.That(Assert.Throws<JinjaException>(() => Render("{{ 'abc }}"))!.Message, Does.Contain("not closed"));
        Assert.That(Assert.Throws<JinjaException>(() => Render("{{ x.y }}"))!.Message, Does.Contain("of an undefined value"));
        Assert.Throws<ArgumentException>(() => Render("{{ x }}", new Dictionary<string, object?> { ["x"] = new Uri("http://example.com") }));
    }
}
