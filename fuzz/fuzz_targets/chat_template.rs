//! Chat-template rendering with arbitrary messages: it never panics, and the pieces the tokenizer gets put back
//! together are exactly the rendered prompt, each message's text in its place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot_engine::{ChatMessage, ChatTemplate, OwnedPiece};

fuzz_target!(|input: &str| {
    let template = ChatTemplate::new(None, "<s>", "</s>").unwrap();
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<ChatMessage> =
        input.split('\u{1e}').enumerate().map(|(i, text)| ChatMessage::new(roles[i % 4], text)).collect();
    let (Ok(rendered), Ok(pieces)) = (template.render(&messages), template.render_pieces(&messages, None)) else {
        return;
    };
    let joined: String = pieces
        .iter()
        .map(|p| match p {
            OwnedPiece::Template(text) => text.as_str(),
            OwnedPiece::Content(text) => text,
        })
        .collect();
    assert_eq!(joined, rendered);
});
