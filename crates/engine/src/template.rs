//! Renders a conversation into a prompt with the model's own chat template (Jinja, from GGUF metadata).

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Used when a GGUF file carries no `tokenizer.chat_template`.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
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
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_owned())
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned() })
    }

    /// The prompt for `messages` as pieces: what the template wrote, and each message's content where it goes.
    /// The template renders placeholders (private-use characters no template writes) instead of the contents,
    /// so no message text is ever mistaken for the template's own markers. A template that transforms a
    /// message's content (`| trim`) transforms the placeholder instead, so the engine uses this only for messages
    /// that hold special-token text.
    pub fn render_pieces<'a>(&self, messages: &'a [ChatMessage]) -> Result<Vec<OwnedPiece<'a>>> {
        let placeholders: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage { role: m.role.clone(), content: format!("{OPEN}{i}{CLOSE}") })
            .collect();
        let rendered = self.render(&placeholders)?;
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
        if messages.is_empty() {
            return Err(Error::InvalidRequest("messages must not be empty".into()));
        }
        let template = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
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
        let pieces = t.render_pieces(&messages).unwrap();
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
}
