//! Docker's JSON, and its translation to and from `berth.v1`: plain data in,
//! plain data out, no IO.
//!
//! - [`create`]: the body of `POST /containers/create` → `ContainerSpec`,
//!   refusing what Berth cannot honour.
//! - [`container`]: `ContainerInfo` → Docker's inspect and list answers,
//!   status words ("Up 5 seconds").
//! - [`events`]: event filters; `Event` → Docker's event message.
//! - [`exec`]: `docker exec` bodies → an exec spec; exec inspect answers.
//! - [`filters`]: the `filters` query of `GET /containers/json` → the List request.
//! - [`image`]: `ImageInfo` → Docker's image inspect answer; pull references.
//! - [`network`]: network bodies and filters; `NetworkInfo` → Docker's answer.
//! - [`options`]: the shim's pod defaults and per-container labels → `PodOptions`.
//! - [`system`]: `/version` and `/info`.
//! - [`time`]: timestamps as Docker writes and reads them.

pub mod container;
pub mod create;
pub mod events;
pub mod exec;
pub mod filters;
pub mod image;
pub mod network;
pub mod options;
pub mod system;
pub mod time;

use serde::{Deserialize, Deserializer};

/// Reads `null` as the type's default (Docker clients send `"Env": null`).
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A Docker "string or list of strings" (`Cmd`, `Entrypoint`): a lone
/// string is one element, `null` is empty.
pub fn string_or_list<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(vec![s]),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

/// Docker's reading of a boolean query parameter: absent, empty, `0`, `no`,
/// `false` and `none` are false; anything else is true.
pub fn query_bool(value: Option<&str>) -> bool {
    match value {
        None => false,
        Some(v) => !matches!(
            v.to_ascii_lowercase().as_str(),
            "" | "0" | "no" | "false" | "none"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_booleans_read_as_docker_reads_them() {
        for v in ["1", "true", "True", "yes"] {
            assert!(query_bool(Some(v)), "{v}");
        }
        for v in ["", "0", "false", "FALSE", "no", "none"] {
            assert!(!query_bool(Some(v)), "{v}");
        }
        assert!(!query_bool(None));
    }
}
