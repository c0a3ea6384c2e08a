//! Stop-string matching over arbitrarily cut streamed text: what comes out is the text up to the first stop
//! string (all of it when none occurs), however the text was cut into pieces.
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
    let first_stop = stops.iter().filter_map(|s| whole.find(s.as_str())).min();
    match first_stop {
        Some(at) => assert!(hit && out == whole[..at], "{out:?} for {whole:?} with {stops:?}"),
        None => assert!(!hit && out == whole, "{out:?} for {whole:?}"),
    }
});
