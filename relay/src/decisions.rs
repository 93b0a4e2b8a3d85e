//! Before-stage decisions: what a handler's reply (HTTP body or script stdout) means.
//!
//! - empty reply, the envelope echoed unchanged, `{"allow": true}` or any JSON object without
//!   `data`/`allow`: **allow**;
//! - the envelope (or `{"data": {...}}`) with `data` that differs from what was sent: **modify**;
//! - `{"allow": false, "reason": "..."}`: **forbid**.
//!
//! A reply that is not JSON (or is truncated) is not a decision: the attempt fails and is retried
//! on the handler's schedule. It is never taken as "allow".

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow,
    /// The data after this handler: what was sent, with the handler's changes applied.
    Modify(Value),
    Forbid(String),
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Modify(_) => "modify",
            Decision::Forbid(_) => "forbid",
        }
    }
}

/// Interpret `reply` to an envelope whose data was `sent`.
pub fn parse(reply: &str, sent: &Value) -> Result<Decision, String> {
    let trimmed = reply.trim();
    if trimmed.is_empty() {
        return Ok(Decision::Allow);
    }
    let value: Value = serde_json::from_str(trimmed).map_err(|e| {
        format!("the reply is not a decision (expected empty, the envelope, {{\"data\": ...}} or {{\"allow\": false}}): invalid JSON: {e}")
    })?;
    let Value::Object(obj) = value else {
        return Err("the reply is not a decision: expected a JSON object".into());
    };
    match obj.get("allow") {
        None | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let reason = match obj.get("reason") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => {
                    "forbidden by the handler (no reason given)".to_string()
                }
                Some(other) => other.to_string(),
            };
            return Ok(Decision::Forbid(reason));
        }
        Some(other) => {
            return Err(format!(
                "the reply's \"allow\" must be true or false, got {other}"
            ))
        }
    }
    match obj.get("data") {
        None | Some(Value::Null) => Ok(Decision::Allow),
        Some(Value::Object(data)) => {
            let sent_obj = sent.as_object().cloned().unwrap_or_default();
            let mut merged: Map<String, Value> = sent_obj.clone();
            let mut changed = false;
            for (k, v) in data {
                if sent_obj.get(k) != Some(v) {
                    changed = true;
                    merged.insert(k.clone(), v.clone());
                }
            }
            Ok(if changed {
                Decision::Modify(Value::Object(merged))
            } else {
                Decision::Allow
            })
        }
        Some(other) => Err(format!(
            "the reply's \"data\" must be a JSON object, got {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sent() -> Value {
        json!({"id": 12, "name": "Customer B"})
    }

    #[test]
    fn empty_and_echo_allow() {
        assert_eq!(parse("", &sent()), Ok(Decision::Allow));
        assert_eq!(parse("  \n", &sent()), Ok(Decision::Allow));
        let echo = r#"{"event":{"dt":"x","events_id":"clients.update","object_id":12},"data":{"id":12,"name":"Customer B"}}"#;
        assert_eq!(parse(echo, &sent()), Ok(Decision::Allow));
        assert_eq!(parse(r#"{"allow": true}"#, &sent()), Ok(Decision::Allow));
        assert_eq!(parse(r#"{"ok": 1}"#, &sent()), Ok(Decision::Allow));
    }

    #[test]
    fn changed_data_modifies_and_keeps_unmentioned_fields() {
        let d = parse(r#"{"data": {"name": "Customer Btestprefix"}}"#, &sent()).unwrap();
        assert_eq!(
            d,
            Decision::Modify(json!({"id": 12, "name": "Customer Btestprefix"}))
        );
        let echo = r#"{"event":{},"data":{"id":12,"name":"Customer B","email":"a@b"}}"#;
        assert_eq!(
            parse(echo, &sent()).unwrap(),
            Decision::Modify(json!({"id": 12, "name": "Customer B", "email": "a@b"}))
        );
    }

    #[test]
    fn allow_false_forbids_with_reason() {
        assert_eq!(
            parse(
                r#"{"allow": false, "reason": "credit check failed"}"#,
                &sent()
            ),
            Ok(Decision::Forbid("credit check failed".into()))
        );
        assert!(matches!(
            parse(r#"{"allow": false}"#, &sent()),
            Ok(Decision::Forbid(_))
        ));
    }

    #[test]
    fn garbage_is_not_a_decision() {
        assert!(parse("OK", &sent()).is_err());
        assert!(parse("[1,2]", &sent()).is_err());
        assert!(parse(r#"{"allow": "no"}"#, &sent()).is_err());
        assert!(parse(r#"{"data": [1]}"#, &sent()).is_err());
        assert!(parse(
            "{\"data\": {\"name\": \"x\"}\n…[truncated: 99999 bytes in all]",
            &sent()
        )
        .is_err());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn random_json(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
        match rng.gen_range(0..if depth > 2 { 4 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.gen()),
            2 => json!(rng.gen::<i32>()),
            3 => Value::String(
                (0..rng.gen_range(0..8))
                    .map(|_| rng.gen_range('a'..='z'))
                    .collect(),
            ),
            4 => Value::Array(
                (0..rng.gen_range(0..4))
                    .map(|_| random_json(rng, depth + 1))
                    .collect(),
            ),
            _ => {
                let keys = ["allow", "data", "reason", "event", "name", "id", "x"];
                Value::Object(
                    (0..rng.gen_range(0..5))
                        .map(|_| {
                            (
                                keys[rng.gen_range(0..keys.len())].to_string(),
                                random_json(rng, depth + 1),
                            )
                        })
                        .collect(),
                )
            }
        }
    }

    /// Any bytes at all: never a panic, and never "allow" for something that is not JSON.
    #[test]
    fn any_bytes_never_panic_and_garbage_is_never_allow() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let sent = json!({"id": 1, "name": "A"});
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let text = String::from_utf8_lossy(&bytes);
            let r = parse(&text, &sent);
            if !text.trim().is_empty() && serde_json::from_str::<Value>(text.trim()).is_err() {
                assert!(r.is_err(), "garbage {text:?} taken as {r:?}");
            }
        }
    }

    /// Structured replies: forbid exactly when allow is false; modify only when data differs.
    #[test]
    fn structured_replies_follow_the_protocol() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let sent = json!({"id": 1, "name": "A"});
        for _ in 0..20_000 {
            let v = random_json(&mut rng, 0);
            let text = v.to_string();
            let r = parse(&text, &sent);
            match (&v, &r) {
                (Value::Object(o), Ok(Decision::Forbid(_))) => {
                    assert_eq!(o.get("allow"), Some(&Value::Bool(false)))
                }
                (Value::Object(o), Ok(Decision::Modify(d))) => {
                    let data = o["data"].as_object().unwrap();
                    assert!(data.iter().any(|(k, v)| sent.get(k) != Some(v)));
                    for (k, v) in data {
                        assert_eq!(d.get(k), Some(v));
                    }
                }
                (Value::Object(o), Ok(Decision::Allow)) => {
                    assert_ne!(o.get("allow"), Some(&Value::Bool(false)));
                }
                (Value::Object(o), Err(_)) => {
                    let bad_allow = o.get("allow").map(|a| !a.is_boolean()).unwrap_or(false);
                    let bad_data = o
                        .get("data")
                        .map(|d| !d.is_object() && !d.is_null())
                        .unwrap_or(false);
                    assert!(bad_allow || bad_data, "{text} refused");
                }
                (_, r) => assert!(r.is_err(), "non-object {text} taken as {r:?}"),
            }
        }
    }
}
