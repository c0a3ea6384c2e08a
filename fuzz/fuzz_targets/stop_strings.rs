//! Stop-string matching over arbitrarily cut streamed text. Streaming cannot wait for the future: generation
//! stops after the first piece that completes a stop string, and what comes out is the text before the earliest
//! stop string found in the text so far (all of it when none occurs). Nothing held back is lost, nothing is
//! emitted twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot_engine::StopMatcher;

fuzz_target!(|input: &str| {
    // `stop1|stop2\u{1f}piece\u{1f}piece…`
    let (stops, text) = input.split_once('\u{1f}').unwrap_or(("", input));
    let stops: Vec<String> = stops.split('|').filter(|s| !s.is_empty()).map(str::to_owned).take(4).collect();
    let pieces: Vec<&str> = text.split('\u{1f}').collect();
    let whole: String = pieces.concat();
    let mut matcher = StopMatcher::new(stops.clone());
    let (mut out, mut hit) = (String::new(), false);
    for piece in &pieces {
        let (emitted, stopped) = matcher.push(piece);
        out.push_str(&emitted);
        if stopped {
            hit = true;
            break;
        }
    }
    if !hit {
        out.push_str(&matcher.flush());
    }
    // The reference: the shortest prefix, at a piece boundary, holding a stop string.
    let mut seen = String::new();
    let mut first_stop = None;
    for piece in &pieces {
        seen.push_str(piece);
        if let Some(at) = stops.iter().filter_map(|s| seen.find(s.as_str())).min() {
            first_stop = Some(at);
            break;
        }
    }
    match first_stop {
        Some(at) => assert!(hit && out == seen[..at], "{out:?} for {whole:?} with {stops:?}"),
        None => assert!(!hit && out == whole, "{out:?} for {whole:?}"),
    }
});
