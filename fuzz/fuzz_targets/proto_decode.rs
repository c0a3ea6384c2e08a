//! Queue and gRPC messages from arbitrary bytes: decoding never panics, and what decodes encodes back to a
//! message that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moltbot_proto::{
    Message,
    dialogue::v1::ChatRequest,
    inference::v1::{CancelJob, GenerateEvent, InferenceJob},
};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        let again = M::decode(message.encode_to_vec().as_slice()).expect("what was encoded decodes");
        assert_eq!(again, message);
    }
}

fuzz_target!(|bytes: &[u8]| {
    round_trip::<InferenceJob>(bytes);
    round_trip::<GenerateEvent>(bytes);
    round_trip::<CancelJob>(bytes);
    round_trip::<ChatRequest>(bytes);
});
