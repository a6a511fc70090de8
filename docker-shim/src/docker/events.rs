//! `GET /events`: the `filters` query, and `berth.v1.Event` → Docker's
//! event message.

use std::collections::BTreeMap;

use berth_proto::api::Event;
use serde_json::{Value, json};

/// What a client asked to see; empty lists match everything.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventFilters {
    /// `container`, `network`.
    pub types: Vec<String>,
    /// Actions (`die`, `start`, …; `health_status` matches every health event).
    pub events: Vec<String>,
    /// Container IDs (or prefixes) or names.
    pub containers: Vec<String>,
    /// Network IDs (or prefixes) or names.
    pub networks: Vec<String>,
    /// `key` or `key=value`; all must match.
    pub labels: Vec<String>,
    /// Image references.
    pub images: Vec<String>,
}

/// Parses the `filters` query value.
pub fn parse_filters(raw: &str) -> Result<EventFilters, String> {
    let mut f = EventFilters::default();
    for (key, values) in super::filters::entries(raw)? {
        let into = match key.as_str() {
            "type" => &mut f.types,
            "event" => &mut f.events,
            "container" => &mut f.containers,
            "network" => &mut f.networks,
            "label" => &mut f.labels,
            "image" => &mut f.images,
            "volume" | "plugin" | "daemon" | "service" | "node" | "secret" | "config" | "scope" => {
                return Err(format!(
                    "Berth does not support the '{key}' filter of events yet"
                ));
            }
            _ => return Err(format!("invalid filter '{key}'")),
        };
        into.extend(values);
    }
    Ok(f)
}

fn names_it(wanted: &[String], e: &Event) -> bool {
    let name = e.attributes.get("name").map(String::as_str).unwrap_or("");
    wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w == name || (!w.is_empty() && e.id.starts_with(w.as_str())))
}

/// Whether the event passes the filters.
pub fn matches(f: &EventFilters, e: &Event) -> bool {
    let type_ok = f.types.is_empty() || f.types.contains(&e.r#type);
    let event_ok = f.events.is_empty()
        || f.events
            .iter()
            .any(|want| e.action == *want || e.action.split(':').next() == Some(want.as_str()));
    let object_ok = match e.r#type.as_str() {
        "container" => names_it(&f.containers, e) && (f.networks.is_empty()),
        "network" => names_it(&f.networks, e) && f.containers.is_empty(),
        _ => true,
    };
    let labels_ok = f
        .labels
        .iter()
        .all(|l| super::filters::label_holds(l, |k| e.attributes.get(k)));
    let image_ok = f.images.is_empty()
        || e.attributes
            .get("image")
            .is_some_and(|i| f.images.contains(i));
    type_ok && event_ok && object_ok && labels_ok && image_ok
}

/// Docker's JSON for one event.
pub fn to_docker(e: &Event) -> Value {
    let attributes: BTreeMap<&String, &String> = e.attributes.iter().collect();
    let mut v = json!({
        "Type": e.r#type,
        "Action": e.action,
        "Actor": {"ID": e.id, "Attributes": attributes},
        "scope": "local",
        "time": e.time_unix_nanos / 1_000_000_000,
        "timeNano": e.time_unix_nanos,
    });
    if e.r#type == "container" {
        // The fields API clients before 1.22 read.
        v["status"] = json!(e.action);
        v["id"] = json!(e.id);
        v["from"] = json!(e.attributes.get("image").cloned().unwrap_or_default());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn die(code: &str) -> Event {
        Event {
            r#type: "container".into(),
            action: "die".into(),
            id: "abcdef0123".into(),
            attributes: [
                ("name".to_string(), "web".to_string()),
                ("image".to_string(), "busybox".to_string()),
                ("exitCode".to_string(), code.to_string()),
                ("suite".to_string(), "e2e".to_string()),
            ]
            .into(),
            time_unix_nanos: 1_700_000_000_500_000_000,
        }
    }

    #[test]
    fn a_die_event_reads_as_dockers_with_its_exit_code() {
        let v = to_docker(&die("3"));
        assert_eq!(v["Action"], "die");
        assert_eq!(v["Actor"]["Attributes"]["exitCode"], "3");
        assert_eq!(
            (v["time"].as_i64(), v["status"].as_str()),
            (Some(1_700_000_000), Some("die"))
        );
        assert_eq!(v["from"], "busybox");
    }

    #[test]
    fn filters_select_by_type_event_object_and_label() {
        let e = die("0");
        let f = |raw: &str| parse_filters(raw).unwrap();
        assert!(matches(&f(""), &e));
        assert!(matches(
            &f(r#"{"event":["die"],"container":["web"],"label":["suite=e2e"]}"#),
            &e
        ));
        assert!(matches(&f(r#"{"container":{"abcdef":true}}"#), &e));
        assert!(!matches(&f(r#"{"event":["start"]}"#), &e));
        assert!(!matches(&f(r#"{"type":["network"]}"#), &e));
        assert!(!matches(&f(r#"{"label":["suite=unit"]}"#), &e));
        let mut h = e.clone();
        h.action = "health_status: healthy".into();
        assert!(matches(&f(r#"{"event":["health_status"]}"#), &h));
        assert!(
            parse_filters(r#"{"volume":["v"]}"#)
                .unwrap_err()
                .contains("does not support")
        );
        assert!(parse_filters("{").is_err());
    }
}
