//! The default model's tokenizer on arbitrary text: message text decodes back to itself when each of its
//! characters does (SmolLM2's GGUF vocabulary lacks the byte tokens of a few bytes, 0x13 among them, which any
//! tokenizer of it drops), and special tokens typed in it stay text. Needs the model (`cargo xtask model`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moltbot_engine::{ModelMetadata, Piece, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = moltbot_config::default_model_path();
        let mut file = std::fs::File::open(&path).expect("the model: run `cargo xtask model`");
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        Tokenizer::from_metadata(&ModelMetadata::from_gguf(&content).unwrap()).unwrap()
    })
}

fuzz_target!(|text: &str| {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode_text(text).unwrap();
    let round_trips = |c: char| {
        let one = c.to_string();
        tokenizer.decode(&tokenizer.encode_text(&one).unwrap(), false).unwrap() == one
    };
    if text.chars().all(round_trips) {
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    let start = tokenizer.token_id("<|im_start|>").unwrap();
    let pieces = [Piece::Template("<|im_start|>user\n"), Piece::Content(text), Piece::Template("<|im_end|>\n")];
    let ids = tokenizer.encode_pieces(&pieces).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == start).count(), 1, "a control token came out of message text");
});
