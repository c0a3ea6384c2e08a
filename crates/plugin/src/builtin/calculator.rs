//! `calculator`: arithmetic a small model gets wrong, evaluated by `exmex`.

use serde_json::{Value, json};

use crate::{Context, Plugin, PluginError, PluginInfo, async_trait};

pub struct Calculator;

#[async_trait]
impl Plugin for Calculator {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "calculator".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Evaluates an arithmetic expression: + - * / ^, parentheses, sqrt, exp, ln, log10, sin, \
                          cos, tan, abs, PI and E."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": { "expression": { "type": "string", "description": "e.g. (2 + 3) * 4 ^ 0.5" } },
                "required": ["expression"],
                "additionalProperties": false,
            }),
        }
    }

    async fn execute(&self, ctx: &Context) -> Result<Value, PluginError> {
        let expression: String = ctx.get_param("expression")?;
        if expression.len() > 1000 {
            return Err(PluginError::InvalidArguments("the expression is over 1000 characters".into()));
        }
        let result = exmex::eval_str::<f64>(&expression)
            .map_err(|e| PluginError::InvalidArguments(format!("`{expression}` is not an expression: {e}")))?;
        if !result.is_finite() {
            return Err(PluginError::Failed(format!("`{expression}` has no finite value")));
        }
        Ok(json!({ "expression": expression, "result": result }))
    }
}
