//! The `filters` query of `GET /containers/json`: JSON of the form
//! `{"label": {"a=b": true}}` (or the older `{"label": ["a=b"]}`), turned
//! into the fields of a `ListContainersRequest`. `exited=N` is applied by the
//! shim to the answer; other Docker filters are refused with a 400 that says
//! so, since ignoring a filter would list containers the client excluded.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The status words Docker accepts in a `status` filter.
pub const STATUSES: &[&str] = &[
    "created",
    "restarting",
    "running",
    "removing",
    "paused",
    "exited",
    "dead",
];

/// The filters of one list call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListFilters {
    /// `key` or `key=value`; all must match.
    pub labels: Vec<String>,
    /// Status words; any may match.
    pub statuses: Vec<String>,
    /// Name substrings (without a leading `/`); any may match.
    pub names: Vec<String>,
    /// ID prefixes; any may match.
    pub ids: Vec<String>,
    /// Exit codes; any may match (only exited containers then).
    pub exited: Vec<i32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Values {
    Map(BTreeMap<String, bool>),
    List(Vec<String>),
}

/// The entries of any `filters` query value, in either of Docker's forms
/// (empty: none): each key with the values it names.
pub fn entries(raw: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: BTreeMap<String, Values> =
        serde_json::from_str(raw).map_err(|e| format!("invalid filters {raw:?}: {e}"))?;
    Ok(map
        .into_iter()
        .map(|(key, values)| {
            let values = match values {
                Values::Map(m) => m
                    .into_iter()
                    .filter(|(_, on)| *on)
                    .map(|(v, _)| v)
                    .collect(),
                Values::List(l) => l,
            };
            (key, values)
        })
        .collect())
}

/// Whether a `label` filter (`key` present, or `key=value`) holds for the
/// labels `get` reads.
pub fn label_holds<'a>(filter: &str, get: impl Fn(&str) -> Option<&'a String>) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => get(k).is_some_and(|have| have == v),
        None => get(filter).is_some(),
    }
}

/// Parses the `filters` query value (empty: no filters).
pub fn parse(raw: &str) -> Result<ListFilters, String> {
    let mut out = ListFilters::default();
    for (key, values) in entries(raw)? {
        match key.as_str() {
            "label" => out.labels.extend(values),
            "status" => {
                for v in values {
                    if !STATUSES.contains(&v.as_str()) {
                        return Err(format!(
                            "invalid filter 'status={v}': want one of {}",
                            STATUSES.join(", ")
                        ));
                    }
                    out.statuses.push(v);
                }
            }
            "name" => out.names.extend(
                values
                    .into_iter()
                    .map(|v| v.strip_prefix('/').map(str::to_string).unwrap_or(v)),
            ),
            "id" => out.ids.extend(values),
            "exited" => {
                for v in values {
                    let code = v
                        .parse::<i32>()
                        .map_err(|_| format!("invalid filter 'exited={v}': want an exit code"))?;
                    out.exited.push(code);
                }
            }
            "ancestor" | "before" | "since" | "volume" | "network" | "publish" | "expose"
            | "health" | "isolation" | "is-task" => {
                return Err(format!(
                    "Berth does not support the '{key}' filter of the container list yet"
                ));
            }
            _ => return Err(format!("invalid filter '{key}'")),
        }
    }
    Ok(out)
}

/// Whether a container the shim itself serves (Ryuk) matches a list call;
/// the coordinator applies the same filters to its containers.
pub fn matches(f: &ListFilters, all: bool, c: &berth_proto::api::ContainerInfo) -> bool {
    let state = c.state.clone().unwrap_or_default();
    let labels = c.spec.as_ref().map(|s| &s.labels);
    let label_ok = f
        .labels
        .iter()
        .all(|l| label_holds(l, |k| labels.and_then(|m| m.get(k))));
    let status_ok = if f.statuses.is_empty() {
        all || state.running
    } else {
        f.statuses.contains(&state.status)
    };
    let name_ok = f.names.is_empty() || f.names.iter().any(|n| c.name.contains(n.as_str()));
    let id_ok = f.ids.is_empty() || f.ids.iter().any(|p| c.id.starts_with(p.as_str()));
    let exited_ok =
        f.exited.is_empty() || (state.status == "exited" && f.exited.contains(&state.exit_code));
    label_ok && status_ok && name_ok && id_ok && exited_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testcontainers_label_filters_become_label_selectors() {
        let f = parse(
            r#"{"label":{"org.testcontainers.sessionId=abc":true,"org.testcontainers":true}}"#,
        )
        .unwrap();
        assert_eq!(
            f.labels,
            ["org.testcontainers", "org.testcontainers.sessionId=abc"]
        );
    }

    #[test]
    fn a_shim_served_container_is_matched_like_the_coordinators() {
        let c = berth_proto::api::ContainerInfo {
            id: "abcdef".repeat(10) + "abcd",
            name: "testcontainers-ryuk-1".into(),
            spec: Some(berth_proto::api::ContainerSpec {
                labels: [("org.testcontainers".to_string(), "true".to_string())].into(),
                ..Default::default()
            }),
            state: Some(berth_proto::api::ContainerState {
                status: "running".into(),
                running: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = |raw: &str| parse(raw).unwrap();
        assert!(matches(&f(r#"{"id":["abcdef"]}"#), true, &c));
        assert!(matches(
            &f(r#"{"label":["org.testcontainers=true"]}"#),
            false,
            &c
        ));
        assert!(!matches(
            &f(r#"{"label":["org.testcontainers=false"]}"#),
            false,
            &c
        ));
        assert!(!matches(&f(r#"{"status":["exited"]}"#), true, &c));
        assert!(!matches(&f(r#"{"name":["web"]}"#), true, &c));
    }

    #[test]
    fn the_older_list_form_is_read_too() {
        let f = parse(r#"{"status":["exited","created"],"name":["/web"],"id":["abc"]}"#).unwrap();
        assert_eq!(f.statuses, ["exited", "created"]);
        assert_eq!(f.names, ["web"]);
        assert_eq!(f.ids, ["abc"]);
    }

    #[test]
    fn exited_codes_are_kept_for_the_shim_to_apply() {
        assert_eq!(parse(r#"{"exited":{"3":true}}"#).unwrap().exited, [3]);
        assert!(parse(r#"{"exited":{"x":true}}"#).is_err());
    }

    #[test]
    fn bad_or_unsupported_filters_are_refused() {
        assert!(
            parse(r#"{"status":{"sleeping":true}}"#)
                .unwrap_err()
                .contains("status=sleeping")
        );
        assert!(
            parse(r#"{"ancestor":{"busybox":true}}"#)
                .unwrap_err()
                .contains("does not support")
        );
        assert_eq!(
            parse(r#"{"colour":["red"]}"#).unwrap_err(),
            "invalid filter 'colour'"
        );
        assert!(parse("{").unwrap_err().starts_with("invalid filters"));
        assert_eq!(parse("").unwrap(), ListFilters::default());
    }
}
