//! Images in chat requests (OpenAI's `image_url` content parts): the shapes accepted and the limits they keep.
//! A `data:` URL is checked for an image type and its decoded size; an http(s) URL only where the operator allows
//! them (the vision model's API fetches it, not MoltBot). Whether the model takes images at all is the
//! dialogue-manager's call: it knows what each model's workers announced.

use moltbot_config::GatewayConfig;
use moltbot_proto::common::v1::{ChatMessage, Image};

use crate::ApiError;

/// The media types a `data:` URL may carry: what OpenAI's vision models take.
const TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

#[derive(Clone, Debug)]
pub struct ImageLimits {
    max_images: usize,
    max_bytes: usize,
    allow_urls: bool,
}

impl ImageLimits {
    pub fn new(config: &GatewayConfig) -> Self {
        Self { max_images: config.max_images, max_bytes: config.max_image_bytes, allow_urls: config.allow_image_urls }
    }

    /// Checks every image of `messages`: how many, their kind and size.
    pub fn check(&self, messages: &[ChatMessage]) -> Result<(), ApiError> {
        let count: usize = messages.iter().map(|m| m.images.len()).sum();
        if count > self.max_images {
            return Err(ApiError::bad_request(
                format!("{count} images are more than this server takes in one request ({})", self.max_images),
                Some("messages"),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            for (j, image) in m.images.iter().enumerate() {
                let param = format!("messages[{i}].content.image_url[{j}]");
                self.check_one(image).map_err(|why| ApiError::bad_request(why, Some(&param)))?;
            }
        }
        Ok(())
    }

    fn check_one(&self, image: &Image) -> Result<(), String> {
        if !matches!(image.detail.as_str(), "" | "auto" | "low" | "high") {
            return Err(format!("detail `{}` is not one of auto, low, high", crate::error::shown(&image.detail)));
        }
        let url = image.url.as_str();
        if url.starts_with("https://") || url.starts_with("http://") {
            return if self.allow_urls {
                Ok(())
            } else {
                Err("image URLs are not fetched here (gateway.allow_image_urls); send the image as a data: URL".into())
            };
        }
        let Some(rest) = url.strip_prefix("data:") else {
            return Err("an image is a data: URL (data:image/png;base64,…) or an http(s) URL".into());
        };
        let Some((media, data)) = rest.split_once(";base64,") else {
            return Err("a data: URL's image must be base64 (data:image/png;base64,…)".into());
        };
        if !TYPES.contains(&media.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{}` is not an image type taken here ({})",
                crate::error::shown(media),
                TYPES.join(", ")
            ));
        }
        let data = data.trim_end_matches('=');
        if data.is_empty() || !data.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/') {
            return Err("the image's base64 is empty or not base64".into());
        }
        let bytes = data.len() * 3 / 4;
        if bytes > self.max_bytes {
            return Err(format!(
                "the image has {bytes} bytes, more than this server takes ({}, gateway.max_image_bytes)",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ImageLimits {
        ImageLimits { max_images: 2, max_bytes: 6, allow_urls: false }
    }

    fn with(urls: &[&str]) -> Vec<ChatMessage> {
        let images = urls.iter().map(|u| Image { url: (*u).into(), detail: String::new() }).collect();
        vec![ChatMessage { role: "user".into(), images, ..Default::default() }]
    }

    #[test]
    fn data_urls_of_images_within_the_caps_pass_and_the_rest_say_why() {
        assert!(limits().check(&with(&["data:image/png;base64,AAECAw=="])).is_ok());
        let refused = |urls: &[&str]| limits().check(&with(urls)).unwrap_err().message;
        assert!(refused(&["data:image/png;base64,AAAAAAAAAAAA"]).contains("gateway.max_image_bytes"));
        assert!(refused(&["data:text/plain;base64,AAAA"]).contains("not an image type"));
        assert!(refused(&["data:image/png,raw"]).contains("base64"));
        assert!(refused(&["data:image/png;base64,A A"]).contains("not base64"));
        assert!(refused(&["https://example.com/cat.png"]).contains("gateway.allow_image_urls"));
        assert!(refused(&["file:///etc/passwd"]).contains("data: URL"));
        assert!(refused(&["data:image/png;base64,AA"; 3]).contains("3 images"));
        let open = ImageLimits { allow_urls: true, ..limits() };
        assert!(open.check(&with(&["https://example.com/cat.png"])).is_ok());
        let param = limits().check(&with(&["data:image/png;base64,AA", "nope"])).unwrap_err().param;
        assert_eq!(param.as_deref(), Some("messages[0].content.image_url[1]"));
    }
}
