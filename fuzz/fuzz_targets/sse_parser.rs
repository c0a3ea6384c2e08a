//! The CLI's server-sent events reader: however a stream is cut into network chunks, the same events come out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot::sse::SseParser;

fuzz_target!(|input: &[u8]| {
    let Some((&cut, stream)) = input.split_first() else { return };
    let whole = SseParser::default().push(stream);
    let cut = (cut as usize * stream.len() / 255).min(stream.len());
    let mut parser = SseParser::default();
    let mut pieces = parser.push(&stream[..cut]);
    pieces.extend(parser.push(&stream[cut..]));
    assert_eq!(pieces, whole);
});
