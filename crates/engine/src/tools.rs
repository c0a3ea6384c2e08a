//! Tool calling: how a request's tools reach the prompt, how a forced call is constrained, and how the model's
//! output is read back as calls.
//!
//! A chat template that knows tools (it names `tools`, as Qwen's and Llama 3.1's do) renders them itself. Any other
//! gets the **fallback prompt**: the tools as JSON lines in the system message, and the Hermes format, which many
//! small models were trained on:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"location": "Paris"}}
//! </tool_call>
//! ```
//!
//! An earlier call in the conversation is written back the same way, and a tool's answer goes in as a user message
//! `<tool_response>…</tool_response>`, which every template accepts. Whatever the template, the output is read
//! with [`ToolCallParser`]: tagged calls, or a bare JSON call (or list of calls) as the whole answer.

use serde_json::{Value, json};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments; `null` for a function without parameters.
    pub parameters: Value,
}

/// Whether and which tool the model must call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides between an answer and calls.
    #[default]
    Auto,
    /// No calls: the tools are not shown to the model.
    None,
    /// One call of any of the tools; the output is constrained to it.
    Required,
    /// One call of this tool; the output is constrained to it.
    Function(String),
}

/// The tools of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call in an answer (OpenAI's `parallel_tool_calls`, on by default there).
    pub parallel: bool,
}

impl Tools {
    /// Whether the model sees the tools and may call them.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// The tools a forced choice leaves, or none when the choice is not forced.
    fn forced(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::Auto | ToolChoice::None => vec![],
        }
    }

    /// Checks the request: names a forced choice can name, and usable names (the grammar writes them literally).
    pub fn validate(&self) -> crate::Result<()> {
        for tool in &self.tools {
            let ok = !tool.name.is_empty()
                && tool.name.len() <= 64
                && tool.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(crate::Error::InvalidRequest(format!(
                    "tool name `{}` must be 1 to 64 letters, digits, `_` or `-`",
                    tool.name
                )));
            }
        }
        if let ToolChoice::Function(name) = &self.choice
            && !self.tools.iter().any(|t| &t.name == name)
        {
            return Err(crate::Error::InvalidRequest(format!("tool_choice names `{name}`, which is not a tool")));
        }
        if self.choice == ToolChoice::Required && self.tools.is_empty() {
            return Err(crate::Error::InvalidRequest("tool_choice `required` needs at least one tool".into()));
        }
        Ok(())
    }

    /// The JSON Lark grammar (llguidance) of a forced call: exactly one tagged call of an allowed tool, its name
    /// written out and its arguments valid against the tool's schema. `None` when nothing is forced.
    pub(crate) fn forced_grammar(&self, whitespace: &str) -> Option<String> {
        let tools = self.forced();
        if tools.is_empty() {
            return None;
        }
        let mut grammar = String::from("start: ");
        grammar.push_str(&(0..tools.len()).map(|i| format!("call{i}")).collect::<Vec<_>>().join(" | "));
        grammar.push('\n');
        for (i, tool) in tools.iter().enumerate() {
            let mut schema = match &tool.parameters {
                Value::Object(o) if !o.is_empty() => tool.parameters.clone(),
                _ => json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            };
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance").or_insert_with(|| json!({ "whitespace_pattern": whitespace }));
                // Keys the schema does not name are allowed by JSON Schema, and a small model given them invents
                // keys until max_tokens: a call gives only the named ones unless the schema asks for more.
                if o.contains_key("properties") {
                    o.entry("additionalProperties").or_insert(Value::Bool(false));
                }
            }
            // The name is validated to letters, digits, `_` and `-`: nothing in it needs escaping.
            grammar.push_str(&format!(
                "call{i}: \"{OPEN_CALL}\\n{{\\\"name\\\": \\\"{}\\\", \\\"arguments\\\": \" args{i} \"}}\\n{CLOSE_CALL}\"\n",
                tool.name
            ));
            grammar.push_str(&format!("args{i}: %json {schema}\n"));
        }
        Some(grammar)
    }

    /// The fallback prompt's instructions and tool list, for the system message.
    pub(crate) fn instructions(&self) -> String {
        let mut text = String::from(
            "You can call tools. To call one, answer with only this, and nothing after it:\n<tool_call>\n\
             {\"name\": \"<the tool's name>\", \"arguments\": {<the arguments>}}\n</tool_call>\n\
             The result comes back in <tool_response></tool_response>. The tools:\n",
        );
        for tool in &self.tools {
            let line = json!({ "name": tool.name, "description": tool.description, "parameters": tool.parameters });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        match &self.choice {
            ToolChoice::Function(name) => text.push_str(&format!("Call the tool {name} now.")),
            ToolChoice::Required => text.push_str("Call one of the tools now."),
            ToolChoice::Auto | ToolChoice::None => {
                text.push_str("Call a tool when it helps to answer; otherwise answer directly.")
            }
        }
        text
    }

    /// The template context's `tools`, in the shape OpenAI-compatible chat templates read.
    pub(crate) fn for_template(&self) -> Value {
        self.tools
            .iter()
            .map(|t| {
                json!({ "type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                }})
            })
            .collect()
    }
}

/// One call the model made (or made earlier in the conversation).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// Given by whoever records the call; the engine leaves it empty.
    pub id: String,
    pub name: String,
    /// A JSON object, as JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// The call as the fallback prompt writes it.
    pub(crate) fn tagged(&self) -> String {
        let arguments = if self.arguments.trim().is_empty() { "{}" } else { self.arguments.trim() };
        format!("{OPEN_CALL}\n{{\"name\": {}, \"arguments\": {arguments}}}\n{CLOSE_CALL}", json!(self.name))
    }
}

pub(crate) const OPEN_CALL: &str = "<tool_call>";
pub(crate) const CLOSE_CALL: &str = "</tool_call>";
/// Where a model that made a call and goes on imagining its result is stopped.
pub(crate) const OPEN_RESPONSE: &str = "<tool_response>";

/// Reads a streamed answer: text is passed on as it comes, except what may be the start of a call, which is held
/// back; calls are parsed at the end. A call that does not parse, or names no tool, ends as text.
#[derive(Debug)]
pub struct ToolCallParser {
    names: Vec<String>,
    parallel: bool,
    /// Text not passed on yet: possibly the start of a call.
    held: String,
    /// Whether any text other than whitespace was passed on (a bare JSON call must be the whole answer).
    shown: bool,
    /// Set once a call began: everything from there is the calls' text.
    calls: Option<String>,
}

impl ToolCallParser {
    /// `None` when the request has no active tools.
    pub fn new(tools: &Tools) -> Option<Self> {
        tools.active().then(|| Self {
            names: tools.tools.iter().map(|t| t.name.clone()).collect(),
            parallel: tools.parallel,
            held: String::new(),
            shown: false,
            calls: None,
        })
    }

    /// Takes the next piece of the answer; returns the text that is surely not a call.
    pub fn push(&mut self, text: &str) -> String {
        if let Some(calls) = &mut self.calls {
            calls.push_str(text);
            return String::new();
        }
        self.held.push_str(text);
        if !self.shown {
            // A bare call is a JSON object, or a list of them, as the whole answer; `[` alone may still start a
            // Markdown link.
            let start = self.held.trim_start();
            let list = start.strip_prefix('[').map(str::trim_start);
            if start.starts_with('{') || list.is_some_and(|rest| rest.starts_with('{')) {
                self.calls = Some(std::mem::take(&mut self.held));
                return String::new();
            }
            if list.is_some_and(str::is_empty) {
                return String::new();
            }
        }
        if let Some(at) = self.held.find(OPEN_CALL) {
            self.calls = Some(self.held.split_off(at));
            return self.release(self.held.len());
        }
        // Hold back what could still become the opening tag, and leading whitespace that could precede a bare call.
        let keep = (1..OPEN_CALL.len().min(self.held.len() + 1))
            .rev()
            .find(|&n| self.held.is_char_boundary(self.held.len() - n) && self.held.ends_with(&OPEN_CALL[..n]))
            .unwrap_or(0);
        if !self.shown && self.held.trim().is_empty() {
            return String::new();
        }
        self.release(self.held.len() - keep)
    }

    fn release(&mut self, upto: usize) -> String {
        let rest = self.held.split_off(upto);
        let out = std::mem::replace(&mut self.held, rest);
        self.shown |= !out.trim().is_empty();
        out
    }

    /// The answer is over: the text still held back, and the calls (none when the answer was text).
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        let Some(text) = self.calls else { return (self.held, vec![]) };
        match parse_calls(&text, &self.names) {
            Some(mut calls) if !calls.is_empty() => {
                if !self.parallel {
                    calls.truncate(1);
                }
                (String::new(), calls)
            }
            _ => (self.held + &text, vec![]),
        }
    }
}

/// The calls in `text`: tagged calls (the last closing tag may be missing, as a stop string ends it; text between
/// and after them is dropped, as models write imagined results there), or one bare JSON call or a list of them.
/// `None` when anything does not parse or names an unknown tool.
fn parse_calls(text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    if !text.starts_with(OPEN_CALL) {
        return match serde_json::from_str::<Value>(text).ok()? {
            Value::Array(items) => items.iter().map(|v| call_of(v, names)).collect(),
            v => Some(vec![call_of(&v, names)?]),
        };
    }
    let mut calls = vec![];
    let mut rest = text;
    while let Some(start) = rest.find(OPEN_CALL) {
        let body = &rest[start + OPEN_CALL.len()..];
        let (inner, after) = match body.find(CLOSE_CALL) {
            Some(end) => (&body[..end], &body[end + CLOSE_CALL.len()..]),
            None => (body, ""),
        };
        calls.push(call_of(&serde_json::from_str(inner.trim()).ok()?, names)?);
        rest = after;
    }
    Some(calls)
}

/// `{"name": …, "arguments": {…}}`, also with `parameters` (Llama 3.1) or arguments encoded as a JSON string.
fn call_of(v: &Value, names: &[String]) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    if !names.iter().any(|n| n == name) {
        return None;
    }
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
    };
    arguments.is_object().then(|| ToolCall {
        id: String::new(),
        name: name.to_owned(),
        arguments: arguments.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: ToolChoice, parallel: bool) -> Tools {
        let weather = Tool {
            name: "get_weather".into(),
            description: "The weather at a place".into(),
            parameters: json!({ "type": "object", "properties": { "location": { "type": "string" } }, "required": ["location"] }),
        };
        let time = Tool { name: "now".into(), description: String::new(), parameters: Value::Null };
        Tools { tools: vec![weather, time], choice, parallel }
    }

    /// Streams `text` in pieces of `size` bytes (on character boundaries) and returns what was shown, and the calls.
    fn stream(text: &str, size: usize, t: &Tools) -> (String, Vec<ToolCall>) {
        let mut parser = ToolCallParser::new(t).unwrap();
        let mut shown = String::new();
        let mut piece = String::new();
        for c in text.chars() {
            piece.push(c);
            if piece.len() >= size {
                shown += &parser.push(&std::mem::take(&mut piece));
            }
        }
        shown += &parser.push(&piece);
        let (rest, calls) = parser.finish();
        (shown + &rest, calls)
    }

    #[test]
    fn tagged_calls_are_read_whatever_the_pieces() {
        let t = tools(ToolChoice::Auto, true);
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\"}}\n\
                    </tool_call>\n<tool_call>{\"name\": \"now\"}</tool_call>";
        for size in [1, 3, 7, 200] {
            let (shown, calls) = stream(text, size, &t);
            assert_eq!(shown, "Let me look.\n", "pieces of {size}");
            assert_eq!(calls.len(), 2);
            assert_eq!(
                (calls[0].name.as_str(), calls[0].arguments.as_str()),
                ("get_weather", r#"{"location":"Paris"}"#)
            );
            assert_eq!((calls[1].name.as_str(), calls[1].arguments.as_str()), ("now", "{}"));
        }
    }

    #[test]
    fn bare_json_calls_and_their_variants_are_read() {
        let t = tools(ToolChoice::Auto, true);
        let (_, calls) = stream(r#"  {"name": "get_weather", "parameters": {"location": "Oslo"}}"#, 4, &t);
        assert_eq!(calls[0].arguments, r#"{"location":"Oslo"}"#);
        let (_, calls) = stream(r#"[{"name": "now", "arguments": "{}"}, {"name": "now", "arguments": {}}]"#, 5, &t);
        assert_eq!(calls.len(), 2);
        // The closing tag is missing where a stop string ended the answer.
        let (_, calls) = stream("<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n", 2, &t);
        assert_eq!(calls.len(), 1);
        // One call only, when parallel calls are off.
        let (_, calls) = stream(
            "<tool_call>{\"name\": \"now\"}</tool_call><tool_call>{\"name\": \"now\"}</tool_call>",
            9,
            &tools(ToolChoice::Auto, false),
        );
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn text_and_malformed_calls_end_as_text() {
        let t = tools(ToolChoice::Auto, true);
        for text in [
            "Just an answer, with a < and a <tool in it.",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"loc",
            "<tool_call>{\"name\": \"launch_rockets\", \"arguments\": {}}</tool_call>",
            "{\"answer\": 42}",
            "[1, 2]",
            "[a link](https://example.com) first",
            "[{\"not\": \"a call\"}]",
            "",
        ] {
            for size in [1, 5, 100] {
                let (shown, calls) = stream(text, size, &t);
                assert_eq!((shown.as_str(), calls.len()), (text, 0), "pieces of {size}");
            }
        }
    }

    #[test]
    fn text_is_passed_on_as_soon_as_it_cannot_be_a_call() {
        let t = tools(ToolChoice::Auto, true);
        let mut parser = ToolCallParser::new(&t).unwrap();
        assert_eq!(parser.push("  "), "", "leading whitespace could precede a bare call");
        assert_eq!(parser.push("Hello <to"), "  Hello ");
        assert_eq!(parser.push("day"), "<today");
        assert_eq!(parser.push(" {x}"), " {x}", "a brace after text is text");
    }

    #[test]
    fn no_parser_without_active_tools() {
        assert!(ToolCallParser::new(&tools(ToolChoice::None, true)).is_none());
        assert!(ToolCallParser::new(&Tools { tools: vec![], choice: ToolChoice::Auto, parallel: true }).is_none());
    }

    #[test]
    fn a_forced_choice_compiles_to_a_grammar_of_its_tools() {
        let grammar = tools(ToolChoice::Function("get_weather".into()), true).forced_grammar(" ?").unwrap();
        assert!(grammar.starts_with("start: call0\n"), "{grammar}");
        assert!(grammar.contains(r#"\"name\": \"get_weather\""#), "{grammar}");
        assert!(!grammar.contains("now"), "{grammar}");
        let grammar = tools(ToolChoice::Required, true).forced_grammar(" ?").unwrap();
        assert!(grammar.starts_with("start: call0 | call1\n"), "{grammar}");
        assert!(tools(ToolChoice::Auto, true).forced_grammar(" ?").is_none());
    }

    #[test]
    fn requests_with_unusable_tools_are_refused() {
        assert!(tools(ToolChoice::Function("nope".into()), true).validate().is_err());
        let mut bad = tools(ToolChoice::Auto, true);
        bad.tools[0].name = "get weather\"".into();
        assert!(bad.validate().is_err());
        assert!(Tools { tools: vec![], choice: ToolChoice::Required, parallel: true }.validate().is_err());
        assert!(tools(ToolChoice::Required, false).validate().is_ok());
    }

    #[test]
    fn an_earlier_call_is_written_as_the_model_would_write_it() {
        let call = ToolCall { id: "call_1".into(), name: "now".into(), arguments: String::new() };
        assert_eq!(call.tagged(), "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>");
    }
}
