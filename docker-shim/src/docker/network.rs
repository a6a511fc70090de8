//! Docker's network JSON: the body of `POST /networks/create` and
//! `…/connect`, the `filters` of `GET /networks`, and `NetworkInfo` →
//! Docker's network answer. Docker's default `bridge` network is shown as
//! it is in Docker, with no containers listed on it (every container has its
//! own pod network).

use std::collections::{BTreeMap, HashMap};

use berth_proto::api::{ListNetworksRequest, NetworkInfo};
use serde::Deserialize;
use serde_json::{Value, json};

use super::null_as_default;

/// The body of `POST /networks/create`, as far as Berth reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateBody {
    /// The network's name.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// `bridge` (or empty) only.
    #[serde(deserialize_with = "null_as_default")]
    pub driver: String,
    /// Labels.
    #[serde(deserialize_with = "null_as_default")]
    pub labels: HashMap<String, String>,
    /// No way out of the network: not something Berth can enforce.
    #[serde(deserialize_with = "null_as_default")]
    pub internal: bool,
    /// IPv6: not something Berth can give.
    #[serde(rename = "EnableIPv6", deserialize_with = "null_as_default")]
    pub enable_ipv6: bool,
    /// Address management; a subnet cannot be honoured.
    #[serde(rename = "IPAM", deserialize_with = "null_as_default")]
    pub ipam: Option<Ipam>,
    /// Driver options: accepted and ignored only when empty.
    #[serde(deserialize_with = "null_as_default")]
    pub options: HashMap<String, String>,
}

/// `IPAM` of a create body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Ipam {
    /// Subnets asked for.
    #[serde(deserialize_with = "null_as_default")]
    pub config: Vec<Value>,
}

/// The body of `POST /networks/{id}/connect` and `…/disconnect`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ConnectBody {
    /// The container, by ID or name.
    #[serde(deserialize_with = "null_as_default")]
    pub container: String,
    /// Connect: the endpoint's settings.
    #[serde(deserialize_with = "null_as_default")]
    pub endpoint_config: Option<Endpoint>,
    /// Disconnect: Docker's flag.
    #[serde(deserialize_with = "null_as_default")]
    pub force: bool,
}

/// An endpoint's settings in a connect body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Endpoint {
    /// Extra names on the network.
    #[serde(deserialize_with = "null_as_default")]
    pub aliases: Vec<String>,
}

/// Reads and checks a create body.
pub fn parse_create(body: &[u8]) -> Result<CreateBody, String> {
    let b: CreateBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid network create body: {e}"))?;
    if b.name.is_empty() {
        return Err("network name is required".into());
    }
    if !matches!(b.driver.as_str(), "" | "bridge") {
        return Err(format!(
            "Berth has only bridge-like networks (every container has its own pod network); driver {:?} is not supported",
            b.driver
        ));
    }
    let refused = [
        (b.internal, "Internal"),
        (b.enable_ipv6, "EnableIPv6"),
        (
            b.ipam.as_ref().is_some_and(|i| !i.config.is_empty()),
            "IPAM.Config",
        ),
        (!b.options.is_empty(), "Options"),
    ];
    if let Some((_, field)) = refused.iter().find(|(on, _)| *on) {
        return Err(format!(
            "Berth cannot honour {field}: pods get their addresses and routes from the cluster"
        ));
    }
    Ok(b)
}

/// Reads a connect or disconnect body.
pub fn parse_connect(body: &[u8]) -> Result<ConnectBody, String> {
    let b: ConnectBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid network connect body: {e}"))?;
    if b.container.is_empty() {
        return Err("Container is required".into());
    }
    Ok(b)
}

/// What a `GET /networks` asks for.
#[derive(Debug, Default)]
pub struct NetworkFilters {
    /// The coordinator's part.
    pub req: ListNetworksRequest,
    /// Whether Berth's networks may show at all.
    pub custom: bool,
    /// Whether the default `bridge` network may show.
    pub bridge: bool,
}

/// The `filters` of `GET /networks` → what to list.
pub fn parse_filters(raw: &str, namespace: &str) -> Result<NetworkFilters, String> {
    let mut req = ListNetworksRequest {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    let (mut bridge, mut custom) = (true, true);
    for (key, values) in super::filters::entries(raw)? {
        match key.as_str() {
            "label" => {
                bridge = false;
                req.label_filters.extend(values);
            }
            "name" => {
                bridge &= values.iter().any(|v| "bridge".contains(v.as_str()));
                req.name_filters.extend(values);
            }
            "id" => {
                bridge &= values.iter().any(|v| BRIDGE_ID.starts_with(v.as_str()));
                req.id_filters.extend(values);
            }
            "driver" | "scope" => {
                let want = if key == "driver" { "bridge" } else { "local" };
                if !values.iter().any(|v| v == want) {
                    (bridge, custom) = (false, false);
                }
            }
            "type" => {
                custom &= values.iter().any(|v| v == "custom");
                bridge &= values.iter().any(|v| v == "builtin");
            }
            "dangling" => {
                return Err(
                    "Berth does not support the 'dangling' filter of the network list yet".into(),
                );
            }
            _ => return Err(format!("invalid filter '{key}'")),
        }
    }
    Ok(NetworkFilters {
        req,
        custom,
        bridge,
    })
}

/// The ID Berth shows for Docker's default `bridge` network.
pub const BRIDGE_ID: &str = "b5e7c0de0000000000000000000000000000000000000000000000000000b71d";

/// Whether `key` names the default `bridge` network.
pub fn is_bridge(key: &str) -> bool {
    key == "bridge" || (key.len() >= 12 && BRIDGE_ID.starts_with(key))
}

fn answer(
    name: &str,
    id: &str,
    created: &str,
    driver: &str,
    labels: Value,
    containers: Value,
) -> Value {
    json!({
        "Name": name, "Id": id, "Created": super::time::or_zero(created),
        "Scope": "local", "Driver": driver, "EnableIPv4": true, "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Options": null, "Config": []},
        "Internal": false, "Attachable": false, "Ingress": false,
        "ConfigFrom": {"Network": ""}, "ConfigOnly": false,
        "Containers": containers, "Options": {}, "Labels": labels, "Peers": null,
    })
}

/// Docker's answer for the default `bridge` network.
pub fn bridge() -> Value {
    answer("bridge", BRIDGE_ID, "", "bridge", json!({}), json!({}))
}

/// Docker's answer for a Berth network.
pub fn to_docker(n: &NetworkInfo) -> Value {
    let containers: serde_json::Map<String, Value> = n
        .members
        .iter()
        .map(|m| {
            let ip = if m.ip.is_empty() {
                String::new()
            } else {
                format!("{}/32", m.ip)
            };
            (
                m.id.clone(),
                json!({"Name": m.name, "EndpointID": "", "MacAddress": "",
                       "IPv4Address": ip, "IPv6Address": ""}),
            )
        })
        .collect();
    let labels: BTreeMap<&String, &String> = n.labels.iter().collect();
    answer(
        &n.name,
        &n.id,
        &n.created,
        &n.driver,
        json!(labels),
        Value::Object(containers),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testcontainers_java_create_body_with_nulls_is_read() {
        let b = parse_create(
            br#"{"Name":"n1","CheckDuplicate":true,"Options":{},"Labels":{"org.testcontainers":"true"},
                 "Driver":null,"IPAM":null,"Internal":null,"EnableIPv6":null,"Attachable":null}"#,
        )
        .unwrap();
        assert_eq!(b.name, "n1");
        assert_eq!(b.labels["org.testcontainers"], "true");
    }

    #[test]
    fn what_berth_cannot_honour_is_refused_by_name() {
        for (body, word) in [
            (r#"{"Name":"n","Driver":"overlay"}"#, "overlay"),
            (r#"{"Name":"n","Internal":true}"#, "Internal"),
            (
                r#"{"Name":"n","IPAM":{"Config":[{"Subnet":"10.9.0.0/16"}]}}"#,
                "IPAM.Config",
            ),
            (
                r#"{"Name":"n","Options":{"com.docker.network.bridge.name":"x"}}"#,
                "Options",
            ),
            (r#"{"Driver":"bridge"}"#, "name is required"),
            (r#"{"Name":3}"#, "invalid network create body"),
        ] {
            let e = parse_create(body.as_bytes()).unwrap_err();
            assert!(e.contains(word), "{body}: {e}");
        }
        assert!(parse_connect(br#"{"EndpointConfig":{}}"#).is_err());
        let c =
            parse_connect(br#"{"Container":"web","EndpointConfig":{"Aliases":["db"]}}"#).unwrap();
        assert_eq!(c.endpoint_config.unwrap().aliases, ["db"]);
    }

    #[test]
    fn filters_narrow_the_list_and_the_default_bridge() {
        let f = parse_filters(r#"{"label":{"a=b":true}}"#, "ci").unwrap();
        assert_eq!(f.req.label_filters, ["a=b"]);
        assert!(f.custom && !f.bridge);
        let f = parse_filters(r#"{"type":["custom"]}"#, "ci").unwrap();
        assert!(f.custom && !f.bridge);
        let f = parse_filters(r#"{"driver":["overlay"]}"#, "ci").unwrap();
        assert!(!f.custom && !f.bridge);
        assert!(parse_filters(r#"{"name":["bri"]}"#, "ci").unwrap().bridge);
        assert!(parse_filters(r#"{"colour":["red"]}"#, "ci").is_err());
        let f = parse_filters("", "ci").unwrap();
        assert!(f.custom && f.bridge && f.req.namespace == "ci");
    }

    #[test]
    fn a_network_answer_lists_its_members_with_addresses() {
        let n = NetworkInfo {
            id: "ab".repeat(32),
            name: "backend".into(),
            driver: "bridge".into(),
            created: "2026-11-25T00:00:00Z".into(),
            members: vec![berth_proto::api::NetworkMember {
                id: "cd".repeat(32),
                name: "db".into(),
                dns_names: vec!["db".into()],
                ip: "10.244.1.7".into(),
            }],
            ..Default::default()
        };
        let v = to_docker(&n);
        assert_eq!(v["Name"], "backend");
        assert_eq!(
            v["Containers"]["cd".repeat(32)]["IPv4Address"],
            "10.244.1.7/32"
        );
        assert_eq!(bridge()["Name"], "bridge");
        assert!(is_bridge("bridge") && is_bridge(&BRIDGE_ID[..12]) && !is_bridge("backend"));
    }
}
