//! MoltBot's contracts: gRPC services and the messages carried over the NATS queue, generated from `proto/`.

pub mod common {
    /// A message's `content` as OpenAI writes it: its text, or with images the content parts (the text, then each
    /// image as an `image_url` part).
    pub fn content_json(m: &v1::ChatMessage) -> serde_json::Value {
        if m.images.is_empty() {
            return m.content.clone().into();
        }
        let text = (!m.content.is_empty()).then(|| serde_json::json!({ "type": "text", "text": m.content }));
        let images = m.images.iter().map(|i| {
            let mut url = serde_json::json!({ "url": i.url });
            if !i.detail.is_empty() {
                url["detail"] = i.detail.clone().into();
            }
            serde_json::json!({ "type": "image_url", "image_url": url })
        });
        text.into_iter().chain(images).collect()
    }

    pub mod v1 {
        tonic::include_proto!("moltbot.common.v1");
    }
}

pub mod session {
    pub mod v1 {
        tonic::include_proto!("moltbot.session.v1");
    }
}

pub mod inference {
    pub mod v1 {
        tonic::include_proto!("moltbot.inference.v1");
    }
}

pub mod dialogue {
    pub mod v1 {
        tonic::include_proto!("moltbot.dialogue.v1");
    }
}

pub mod plugin {
    pub mod v1 {
        tonic::include_proto!("moltbot.plugin.v1");
    }
}

/// The encoded `FileDescriptorSet` of every MoltBot proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moltbot_descriptor.bin"));

pub use credential::Credential;
pub use error::ErrorCode;

/// Client text (a name, an id) as an error message echoes it: at most 64 characters.
pub fn shown(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The largest gRPC message MoltBot's clients and servers take (tonic's default is 4 MiB): a page of stored
/// messages, or a session's whole history, may be larger.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
pub use prost::{DecodeError, Message};

mod credential;
mod error;
pub mod grpc_timeout;
pub mod replicas;
pub mod server;

pub use replicas::{Replicas, chain as error_chain};
