//! `datetime`: the current date and time (or a given instant) in a time zone, from the IANA database.

use serde_json::{Value, json};

use crate::{Context, Plugin, PluginError, PluginInfo, async_trait};

pub struct DateTime;

#[async_trait]
impl Plugin for DateTime {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "datetime".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "The current date and time in a time zone, or a given instant expressed in it.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "timezone": { "type": "string", "description": "IANA name, e.g. Europe/Paris; UTC by default" },
                    "at": { "type": "string", "description": "an RFC 3339 instant, e.g. 2026-03-01T12:00:00Z; now by default" },
                },
                "additionalProperties": false,
            }),
        }
    }

    async fn execute(&self, ctx: &Context) -> Result<Value, PluginError> {
        let zone: String =
            ctx.param("timezone").map(|_| ctx.get_param("timezone")).transpose()?.unwrap_or("UTC".into());
        let instant = match ctx.param("at") {
            None => jiff::Timestamp::now(),
            Some(_) => {
                let at: String = ctx.get_param("at")?;
                at.parse()
                    .map_err(|e| PluginError::InvalidArguments(format!("`at` is not an RFC 3339 instant: {e}")))?
            }
        };
        let zoned = instant
            .in_tz(&zone)
            .map_err(|e| PluginError::InvalidArguments(format!("`{zone}` is not a known time zone: {e}")))?;
        Ok(json!({
            "timezone": zone,
            "datetime": zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            "date": zoned.strftime("%Y-%m-%d").to_string(),
            "time": zoned.strftime("%H:%M:%S").to_string(),
            "weekday": zoned.strftime("%A").to_string(),
            "utc_offset": zoned.offset().to_string(),
            "unix_seconds": instant.as_second(),
        }))
    }
}
