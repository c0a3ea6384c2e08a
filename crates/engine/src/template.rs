//! Renders a conversation into a prompt with the model's own chat template (Jinja, from GGUF metadata).

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::{
    Error, Result,
    tools::{OPEN_RESPONSE, ToolCall, Tools},
};

/// Used when a GGUF file carries no `tokenizer.chat_template` and its vocabulary has no Gemma turn markers.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma's turns (its own template, without the tool and image parts): a system message opens the first user
/// turn, the assistant is `model`. Used when a GGUF file carries no template but its vocabulary has
/// `<start_of_turn>` (Gemma 3 GGUFs converted without one).
const GEMMA: &str = "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set rest = messages[1:] %}{% else %}{% set prefix = '' %}{% set rest = messages %}{% endif %}{% for message in rest %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// The template for a model whose GGUF file carries none: Gemma's turns where the vocabulary has Gemma's
/// markers, ChatML otherwise.
pub fn fallback_template(tokens: &[String]) -> &'static str {
    if tokens.iter().any(|t| t == "<start_of_turn>") { GEMMA } else { CHATML }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers, and the tool's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tool_call_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// Around a message's index where its content goes (Unicode private-use characters).
const OPEN: char = '\u{F8FF}';
const CLOSE: char = '\u{F8FE}';

/// A piece of a rendered prompt: the template's text, or a message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedPiece<'a> {
    Template(String),
    Content(&'a str),
}

impl OwnedPiece<'_> {
    pub fn as_piece(&self) -> crate::tokenizer::Piece<'_> {
        match self {
            Self::Template(text) => crate::tokenizer::Piece::Template(text),
            Self::Content(text) => crate::tokenizer::Piece::Content(text),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template renders `tools` and messages' `tool_calls` itself; otherwise the fallback prompt does
    /// (`crate::tools`).
    native_tools: bool,
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        let source = source.unwrap_or(CHATML);
        let native_tools = source.contains("tools");
        env.add_template_owned("chat", source.to_owned()).map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned(), native_tools })
    }

    /// The messages the template is given for `messages` and `tools`: as they are for a template that renders
    /// tools, otherwise with the fallback prompt's instructions in the system message, earlier calls written out
    /// as the model writes them, and tool answers as user messages.
    pub fn with_tools(&self, messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
        let active = tools.filter(|t| t.active());
        let plain = |m: &ChatMessage| m.tool_calls.is_empty() && m.role != "tool";
        if self.native_tools || (active.is_none() && messages.iter().all(plain)) {
            return messages.to_vec();
        }
        let mut shown: Vec<ChatMessage> = vec![];
        for (i, m) in messages.iter().enumerate() {
            if m.role == "tool" {
                let response = format!("{OPEN_RESPONSE}\n{}\n</tool_response>", m.content);
                // The results of one answer's calls go in one user message: templates that want roles to
                // alternate accept it.
                match shown.last_mut() {
                    Some(previous) if i > 0 && messages[i - 1].role == "tool" => {
                        previous.content = format!("{}\n{response}", previous.content);
                    }
                    _ => shown.push(ChatMessage::new("user", response)),
                }
                continue;
            }
            let mut content = m.content.clone();
            for call in &m.tool_calls {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&call.tagged());
            }
            shown.push(ChatMessage::new(m.role.clone(), content));
        }
        if let Some(tools) = active {
            let instructions = tools.instructions();
            match shown.first_mut() {
                Some(system) if system.role == "system" => {
                    system.content = format!("{}\n\n{instructions}", system.content);
                }
                _ => shown.insert(0, ChatMessage::new("system", instructions)),
            }
        }
        shown
    }

    /// The prompt for `messages` as pieces: what the template wrote, and each message's content where it goes.
    /// The template renders placeholders (private-use characters no template writes) instead of the contents,
    /// so no message text is ever mistaken for the template's own markers. A template that transforms a
    /// message's content (`| trim`) transforms the placeholder instead, so the engine uses this only for messages
    /// that hold special-token text.
    pub fn render_pieces<'a>(&self, messages: &'a [ChatMessage], tools: Option<&Tools>) -> Result<Vec<OwnedPiece<'a>>> {
        let placeholders: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage { content: format!("{OPEN}{i}{CLOSE}"), ..m.clone() })
            .collect();
        let rendered = self.render_with(&placeholders, tools)?;
        let mut pieces = vec![];
        let mut rest = rendered.as_str();
        while let Some(open) = rest.find(OPEN) {
            let after = &rest[open + OPEN.len_utf8()..];
            let index = after.find(CLOSE).and_then(|close| Some((after[..close].parse::<usize>().ok()?, close)));
            let Some((i, close)) = index.filter(|(i, _)| *i < messages.len()) else {
                // Not a placeholder after all: the template's own text.
                pieces.push(OwnedPiece::Template(rest[..open + OPEN.len_utf8()].to_owned()));
                rest = after;
                continue;
            };
            pieces.push(OwnedPiece::Template(rest[..open].to_owned()));
            pieces.push(OwnedPiece::Content(&messages[i].content));
            rest = &after[close + CLOSE.len_utf8()..];
        }
        pieces.push(OwnedPiece::Template(rest.to_owned()));
        pieces.retain(|p| !matches!(p, OwnedPiece::Template(t) if t.is_empty()));
        Ok(pieces)
    }

    /// The prompt for `messages`, ending with the opening of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_with(messages, None)
    }

    /// The prompt for `messages` given as they come from [`Self::with_tools`]: a template that renders tools gets
    /// them, and the calls in OpenAI's shape (`function.arguments` an object, as Qwen's and Llama's templates
    /// expect).
    pub fn render_with(&self, messages: &[ChatMessage], tools: Option<&Tools>) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::InvalidRequest("messages must not be empty".into()));
        }
        let template = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        let tools = tools.filter(|t| self.native_tools && t.active()).map(Tools::for_template);
        let messages: Vec<serde_json::Value> = messages.iter().map(for_template).collect();
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| match e.kind() {
                // The template refused this conversation (`raise_exception`): the request's fault.
                ErrorKind::InvalidOperation => Error::InvalidRequest(e.to_string()),
                _ => Error::Template(e.to_string()),
            })
    }
}

/// A message as a template reads it.
fn for_template(m: &ChatMessage) -> serde_json::Value {
    let mut value = serde_json::json!({ "role": m.role, "content": m.content });
    if !m.tool_calls.is_empty() {
        let calls: Vec<_> = m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments =
                    serde_json::from_str::<serde_json::Value>(&c.arguments).unwrap_or_else(|_| serde_json::json!({}));
                serde_json::json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": arguments } })
            })
            .collect();
        value["tool_calls"] = calls.into();
    }
    if !m.tool_call_id.is_empty() {
        value["tool_call_id"] = m.tool_call_id.clone().into();
    }
    if !m.name.is_empty() {
        value["name"] = m.name.clone().into();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_every_turn_and_opens_the_assistant() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let out = t.render(&[ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "hello")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn pieces_keep_message_text_apart_from_the_template() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let messages =
            [ChatMessage::new("user", "hi <|im_end|> \u{F8FF}0\u{F8FE}"), ChatMessage::new("assistant", "yo")];
        let pieces = t.render_pieces(&messages, None).unwrap();
        assert_eq!(
            pieces,
            [
                OwnedPiece::Template("<|im_start|>user\n".into()),
                OwnedPiece::Content("hi <|im_end|> \u{F8FF}0\u{F8FE}"),
                OwnedPiece::Template("<|im_end|>\n<|im_start|>assistant\n".into()),
                OwnedPiece::Content("yo"),
                OwnedPiece::Template("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
    }

    #[test]
    fn template_exceptions_become_errors() {
        let t = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), "", "").unwrap();
        let err = t.render(&[ChatMessage::new("user", "x")]).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    fn weather_tools() -> Tools {
        let tool = crate::Tool {
            name: "get_weather".into(),
            description: "The weather".into(),
            parameters: serde_json::json!({ "type": "object", "properties": { "location": { "type": "string" } } }),
        };
        Tools { tools: vec![tool], choice: crate::ToolChoice::Auto, parallel: true }
    }

    fn calling_conversation() -> Vec<ChatMessage> {
        let call =
            ToolCall { id: "call_1".into(), name: "get_weather".into(), arguments: r#"{"location":"Oslo"}"#.into() };
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Oslo?"),
            ChatMessage { tool_calls: vec![call], ..ChatMessage::new("assistant", "") },
            ChatMessage {
                tool_call_id: "call_1".into(),
                name: "get_weather".into(),
                ..ChatMessage::new("tool", "{\"c\":3}")
            },
        ]
    }

    #[test]
    fn a_template_without_tools_gets_the_fallback_prompt() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let tools = weather_tools();
        let mut conversation = calling_conversation();
        conversation.push(ChatMessage { tool_call_id: "call_2".into(), ..ChatMessage::new("tool", "{}") });
        let shown = t.with_tools(&conversation, Some(&tools));
        assert_eq!(shown.len(), 4, "the results of one answer's calls are one message");
        assert!(shown[3].content.ends_with("</tool_response>\n<tool_response>\n{}\n</tool_response>"), "{shown:?}");
        assert!(shown[0].content.starts_with("Be brief.\n\nYou can call tools."), "{}", shown[0].content);
        assert!(shown[0].content.contains(r#"{"name":"get_weather","#), "{}", shown[0].content);
        assert_eq!(
            shown[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\":\"Oslo\"}}\n</tool_call>"
        );
        assert!(
            shown[3].role == "user" && shown[3].content.starts_with("<tool_response>\n{\"c\":3}\n</tool_response>")
        );
        // Without tools, a conversation that holds calls is still written out, and no instructions are added.
        let shown = t.with_tools(&calling_conversation(), None);
        assert_eq!(shown[0].content, "Be brief.");
        assert!(shown[2].content.starts_with("<tool_call>"));
        let plain = [ChatMessage::new("user", "hi")];
        assert_eq!(t.with_tools(&plain, None), plain);
    }

    #[test]
    fn a_template_that_knows_tools_renders_them_itself() {
        let source = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}\
                      {% for m in messages %}{{ m.role }}:{{ m.content }}\
                      {% for c in m.tool_calls %}[{{ c.function.name }} {{ c.function.arguments.location }}]{% endfor %}\
                      {% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(Some(source), "", "").unwrap();
        let tools = weather_tools();
        let shown = t.with_tools(&calling_conversation(), Some(&tools));
        assert_eq!(shown, calling_conversation());
        let out = t.render_with(&shown, Some(&tools)).unwrap();
        assert_eq!(
            out,
            "TOOLS:get_weather;\nsystem:Be brief.\nuser:Weather in Oslo?\nassistant:[get_weather Oslo]\ntool:{\"c\":3}(call_1)\n"
        );
    }
}
