//! The request body. The default `jerasoft` format is byte-compatible with JeraSoft's Provisioning
//! API; `full` adds the event id, entity, operation and the complete old and new rows.
//!
//! The body is a pure function of the stored event (and the data as modified by before-stage
//! handlers), so it is identical on every attempt.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

/// The stored event as the relay reads it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub name: String,
    pub entity: String,
    pub object_id: Value,
    pub operation: String,
    pub data: Value,
    /// The row images: read from the database only for handlers whose format sends them.
    pub old_row: Option<Value>,
    pub new_row: Option<Value>,
    pub changed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jerasoft,
    Full,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jerasoft" => Some(Format::Jerasoft),
            "full" => Some(Format::Full),
            _ => None,
        }
    }
}

/// `2026-11-27T08:48:29.123456+00:00`, as JeraSoft prints it.
pub fn format_dt(dt: &DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Micros, false)
}

#[derive(Serialize)]
struct Header<'a> {
    dt: String,
    events_id: &'a str,
    object_id: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    operation: Option<&'a str>,
}

#[derive(Serialize)]
struct Body<'a> {
    event: Header<'a>,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a Option<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<&'a Option<Value>>,
}

/// Serialise the envelope. `data` overrides the event's data (before-stage modifications).
pub fn render(event: &Event, data: Option<&Value>, format: Format) -> String {
    let full = format == Format::Full;
    let body = Body {
        event: Header {
            dt: format_dt(&event.changed_at),
            events_id: &event.name,
            object_id: &event.object_id,
            id: full.then_some(event.id),
            entity: full.then_some(event.entity.as_str()),
            operation: full.then_some(event.operation.as_str()),
        },
        data: data.unwrap_or(&event.data),
        old: full.then_some(&event.old_row),
        new: full.then_some(&event.new_row),
    };
    serde_json::to_string(&body).expect("serialising JSON values cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event {
            id: 42,
            name: "clients.update".into(),
            entity: "clients".into(),
            object_id: json!(12),
            operation: "update".into(),
            data: json!({"id": 12, "name": "Customer B"}),
            old_row: Some(json!({"id": 12, "name": "Customer A"})),
            new_row: Some(json!({"id": 12, "name": "Customer B"})),
            changed_at: DateTime::parse_from_rfc3339("2026-11-27T08:48:29.123456Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn jerasoft_envelope_is_byte_exact() {
        assert_eq!(
            render(&event(), None, Format::Jerasoft),
            r#"{"event":{"dt":"2026-11-27T08:48:29.123456+00:00","events_id":"clients.update","object_id":12},"data":{"id":12,"name":"Customer B"}}"#
        );
    }

    #[test]
    fn full_envelope_adds_id_entity_and_images() {
        assert_eq!(
            render(&event(), None, Format::Full),
            r#"{"event":{"dt":"2026-11-27T08:48:29.123456+00:00","events_id":"clients.update","object_id":12,"id":42,"entity":"clients","operation":"update"},"data":{"id":12,"name":"Customer B"},"old":{"id":12,"name":"Customer A"},"new":{"id":12,"name":"Customer B"}}"#
        );
    }

    #[test]
    fn modified_data_replaces_the_event_data() {
        let data = json!({"id": 12, "name": "X"});
        assert!(render(&event(), Some(&data), Format::Jerasoft)
            .ends_with(r#""data":{"id":12,"name":"X"}}"#));
    }
}
