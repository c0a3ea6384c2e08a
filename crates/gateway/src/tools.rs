//! Tool calling on the wire: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, MoltBot's `plugins` (the
//! plugins the model may call, run by the server), and calls in OpenAI's shape.

use moltbot_proto::common::v1::{Tool, ToolCall, ToolChoice, Tools, tool_choice::Mode};
use serde_json::{Value, json};

use crate::ApiError;

/// OpenAI's limit on tools in one request.
const MAX_TOOLS: usize = 128;

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ToolFields {
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// Plugins the model may call; the server runs the calls within the turn.
    plugins: Option<Vec<String>>,
    // OpenAI's deprecated forms of `tools` and `tool_choice`: refused by name rather than ignored.
    functions: Option<Value>,
    function_call: Option<Value>,
}

/// A 400 naming `param`, in the message too (where it does not already).
fn bad(message: impl Into<String>, param: &str) -> ApiError {
    let message = message.into();
    let message = if message.contains(param) { message } else { format!("{param}: {message}") };
    ApiError::bad_request(message, Some(param))
}

/// A function name as OpenAI allows it (the engine writes it into a grammar, so nothing else may pass).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolFields {
    /// The client's tools and the plugins it offers the model, checked.
    pub(crate) fn to_proto(&self) -> Result<(Option<Tools>, Vec<String>), ApiError> {
        for (given, param) in [(&self.functions, "functions"), (&self.function_call, "function_call")] {
            if given.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad(format!("{param} is not supported; use tools and tool_choice"), param));
            }
        }
        let list = self.tools.as_deref().unwrap_or_default();
        if list.len() > MAX_TOOLS {
            return Err(bad(format!("tools takes at most {MAX_TOOLS} functions"), "tools"));
        }
        let mut tools: Vec<Tool> = vec![];
        for (i, tool) in list.iter().enumerate() {
            if tool["type"] != "function" {
                return Err(bad("a tool's type must be `function`", &format!("tools[{i}].type")));
            }
            let function = &tool["function"];
            let name = function["name"].as_str().unwrap_or_default();
            if !valid_name(name) {
                let why = "a function's name must be 1 to 64 letters, digits, `_` or `-`";
                return Err(bad(why, &format!("tools[{i}].function.name")));
            }
            if tools.iter().any(|t| t.name == name) {
                return Err(bad(format!("two tools are called `{name}`"), &format!("tools[{i}].function.name")));
            }
            let description = match &function["description"] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                _ => return Err(bad("must be a string", &format!("tools[{i}].function.description"))),
            };
            let parameters_json = match &function["parameters"] {
                Value::Null => String::new(),
                p @ Value::Object(_) => p.to_string(),
                _ => {
                    let why = "a function's parameters must be a JSON Schema object";
                    return Err(bad(why, &format!("tools[{i}].function.parameters")));
                }
            };
            tools.push(Tool { name: name.to_owned(), description, parameters_json });
        }
        let plugins = self.plugins.clone().unwrap_or_default();
        if let Some((i, _)) = plugins.iter().enumerate().find(|(_, p)| !valid_name(p)) {
            return Err(bad("a plugin's name is 1 to 64 letters, digits, `_` or `-`", &format!("plugins[{i}]")));
        }
        if let Some(i) = (1..plugins.len()).find(|&i| plugins[..i].contains(&plugins[i])) {
            return Err(bad(format!("`{}` is named twice", plugins[i]), &format!("plugins[{i}]")));
        }
        let offered = |name: &str| tools.iter().any(|t| t.name == name) || plugins.iter().any(|p| p == name);
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => ToolChoice::default(),
            Some(Value::String(mode)) => match mode.as_str() {
                "auto" => ToolChoice { mode: Mode::Auto.into(), function: String::new() },
                "none" => ToolChoice { mode: Mode::None.into(), function: String::new() },
                "required" if !tools.is_empty() || !plugins.is_empty() => {
                    ToolChoice { mode: Mode::Required.into(), function: String::new() }
                }
                "required" => return Err(bad("tool_choice `required` needs tools", "tool_choice")),
                _ => return Err(bad("tool_choice must be `none`, `auto`, `required` or a function", "tool_choice")),
            },
            Some(named) => {
                let name = named["function"]["name"].as_str().unwrap_or_default();
                if named["type"] != "function" || name.is_empty() {
                    let why = "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}";
                    return Err(bad(why, "tool_choice"));
                }
                if !offered(name) {
                    return Err(bad(format!("tool_choice names `{name}`, which is not in tools"), "tool_choice"));
                }
                ToolChoice { mode: Mode::Function.into(), function: name.to_owned() }
            }
        };
        let single_call = self.parallel_tool_calls == Some(false);
        let given = !tools.is_empty()
            || !plugins.is_empty()
            || self.tool_choice.is_some()
            || self.parallel_tool_calls.is_some();
        Ok((given.then_some(Tools { tools, choice: Some(choice), single_call }), plugins))
    }
}

/// An assistant message's `tool_calls` as a client sends them back.
pub(crate) fn calls_from_json(calls: &[Value], param: &str) -> Result<Vec<ToolCall>, ApiError> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let function = &call["function"];
            let name = function["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                return Err(bad("a tool call names its function", &format!("{param}[{i}].function.name")));
            }
            let arguments_json = match &function["arguments"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let id = call["id"].as_str().unwrap_or_default().to_owned();
            Ok(ToolCall { id, name: name.to_owned(), arguments_json })
        })
        .collect()
}

/// Calls in OpenAI's shape (the arguments stay a JSON string), with `index` for stream chunks.
pub(crate) fn calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments_json },
            });
            if indexed {
                call["index"] = i.into();
            }
            call
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: Value) -> Result<(Option<Tools>, Vec<String>), ApiError> {
        serde_json::from_value::<ToolFields>(body).unwrap().to_proto()
    }

    fn weather() -> Value {
        json!({ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } })
    }

    #[test]
    fn tools_and_choices_become_the_contract() {
        let (tools, plugins) =
            fields(json!({ "tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false })).unwrap();
        let tools = tools.unwrap();
        assert_eq!(
            (tools.tools[0].name.as_str(), tools.tools[0].parameters_json.as_str()),
            ("get_weather", r#"{"type":"object"}"#)
        );
        assert_eq!(tools.choice.unwrap().mode(), Mode::Required);
        assert!(tools.single_call && plugins.is_empty());
        let named = json!({ "type": "function", "function": { "name": "weather" } });
        let (tools, plugins) = fields(json!({ "plugins": ["weather"], "tool_choice": named })).unwrap();
        assert_eq!(tools.unwrap().choice.unwrap().function, "weather");
        assert_eq!(plugins, ["weather"]);
        assert!(fields(json!({})).unwrap().0.is_none());
    }

    #[test]
    fn bad_tools_are_refused_naming_the_parameter() {
        let param = |body| fields(body).unwrap_err().body()["error"]["param"].as_str().unwrap_or_default().to_owned();
        assert_eq!(param(json!({ "tools": [{ "type": "retrieval" }] })), "tools[0].type");
        assert_eq!(
            param(json!({ "tools": [{ "type": "function", "function": { "name": "a b" } }] })),
            "tools[0].function.name"
        );
        assert_eq!(param(json!({ "tools": [weather(), weather()] })), "tools[1].function.name");
        let bad_parameters = json!({ "type": "function", "function": { "name": "f", "parameters": [1] } });
        assert_eq!(param(json!({ "tools": [bad_parameters] })), "tools[0].function.parameters");
        assert_eq!(param(json!({ "tools": [weather()], "tool_choice": "sometimes" })), "tool_choice");
        assert_eq!(param(json!({ "tool_choice": "required" })), "tool_choice");
        let other = json!({ "type": "function", "function": { "name": "other" } });
        assert_eq!(param(json!({ "tools": [weather()], "tool_choice": other })), "tool_choice");
        assert_eq!(param(json!({ "plugins": ["no spaces please"] })), "plugins[0]");
        assert_eq!(param(json!({ "plugins": ["a", "b", "a"] })), "plugins[2]");
        assert_eq!(param(json!({ "functions": [{ "name": "f" }] })), "functions");
    }
}
