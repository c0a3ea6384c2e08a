//! Queue and gRPC messages from arbitrary bytes: decoding never panics, and what decodes encodes back to a
//! message that decodes and encodes to the same bytes (compared as bytes: a NaN float is not equal to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot_proto::{
    Message,
    dialogue::v1::ChatRequest,
    inference::v1::{CancelJob, GenerateEvent, InferenceJob},
};

fn round_trip<M: Message + Default>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        let encoded = message.encode_to_vec();
        let again = M::decode(encoded.as_slice()).expect("what was encoded decodes");
        assert_eq!(again.encode_to_vec(), encoded);
    }
}

fuzz_target!(|bytes: &[u8]| {
    round_trip::<InferenceJob>(bytes);
    round_trip::<GenerateEvent>(bytes);
    round_trip::<CancelJob>(bytes);
    round_trip::<ChatRequest>(bytes);
});
