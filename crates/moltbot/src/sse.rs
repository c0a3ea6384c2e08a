//! A server-sent events reader for the CLI: bytes in as they arrive, whole events out. Events are cut at blank
//! lines on the bytes themselves, so a character split across two network chunks arrives whole.

/// One event: its `event:` name (empty when unnamed) and its `data:` lines joined with newlines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Collects bytes until they complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds `bytes`; returns the events they completed, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = vec![];
        while let Some((end, separator)) = blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + separator).collect();
            let event = parse(&String::from_utf8_lossy(&block[..end]));
            if event != SseEvent::default() {
                events.push(event);
            }
        }
        events
    }
}

/// Where the first event ends, and the length of the blank line that ends it (`\n\n` or `\r\n\r\n`).
fn blank_line(bytes: &[u8]) -> Option<(usize, usize)> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|at| (at, 2));
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|at| (at, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse(block: &str) -> SseEvent {
    let mut event = SseEvent::default();
    let mut data: Vec<&str> = vec![];
    for line in block.lines() {
        // `field: value`, one optional space after the colon; a line starting with `:` is a comment.
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.event = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    event.data = data.join("\n");
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        chunks.iter().flat_map(|c| parser.push(c)).collect()
    }

    #[test]
    fn events_come_whole_however_the_bytes_are_cut() {
        let stream = "event: delta\ndata: {\"text\":\"h\u{e9}\u{1f600}\"}\n\n: keep-alive\n\nevent: done\r\ndata: a\r\ndata: b\r\n\r\n";
        let whole = all(&mut SseParser::default(), &[stream.as_bytes()]);
        assert_eq!(
            whole,
            [
                SseEvent { event: "delta".into(), data: "{\"text\":\"h\u{e9}\u{1f600}\"}".into() },
                SseEvent { event: "done".into(), data: "a\nb".into() },
            ]
        );
        for cut in 1..stream.len() {
            let (a, b) = stream.as_bytes().split_at(cut);
            assert_eq!(all(&mut SseParser::default(), &[a, b]), whole, "cut at byte {cut}");
        }
    }
}
