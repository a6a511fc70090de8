//! Container image references: parsing, validation and normalisation.
//!
//! Implements the grammar of the distribution project's `reference` package
//! (`[domain[:port]/]path[:tag][@algorithm:hex]`) by hand, and normalises the
//! way containerd and the kubelet do: a missing domain means `docker.io`, a
//! single path component on Docker Hub gets `library/`, and a reference with
//! neither tag nor digest means `:latest`.

use std::fmt;

/// Registry assumed when a reference names none.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Longest repository name (domain + path) the grammar allows.
const NAME_MAX: usize = 255;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `docker.io` or `10.0.0.1:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/busybox`.
    pub path: String,
    /// Tag; `latest` when the reference had neither tag nor digest.
    pub tag: Option<String>,
    /// Digest such as `sha256:0123…`.
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The string that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason| ReferenceError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err("reference is empty"));
        }
        if input.chars().any(|c| c.is_whitespace()) {
            return Err(err("reference contains whitespace"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(err)?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag follows the last ':' only if no '/' comes after it (else it is a port).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(err)?;
        }
        if name.is_empty() {
            return Err(err("repository name is empty"));
        }
        if name.len() > NAME_MAX {
            return Err(err("repository name is longer than 255 characters"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                check_domain(first).map_err(err)?;
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        };
        if path.is_empty() {
            return Err(err("repository path is empty"));
        }
        for component in path.split('/') {
            check_path_component(component).map_err(err)?;
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`, the repository without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_path_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("repository path has an empty component");
    }
    if c.chars().any(|ch| ch.is_ascii_uppercase()) {
        return Err("repository name must be lowercase");
    }
    let bytes = c.as_bytes();
    let mut i = 0;
    let alnum_run = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && is_lower_alnum(bytes[*i] as char) {
            *i += 1;
        }
        *i > start
    };
    if !alnum_run(&mut i) {
        return Err("repository path components must start with a letter or digit");
    }
    while i < bytes.len() {
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err("repository path may hold only [a-z0-9], '.', '_', '__' and '-'"),
        }
        if !alnum_run(&mut i) {
            return Err("a separator in the repository path must be followed by a letter or digit");
        }
    }
    Ok(())
}

/// Host name labels or an IPv6 literal in brackets, with an optional port.
fn check_domain(d: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("unterminated IPv6 address")?;
        if v6.is_empty() || !v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err("invalid IPv6 address in registry host");
        }
        (None, after.strip_prefix(':').map(Some).unwrap_or(None))
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(host) = host {
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err("invalid registry host name");
            }
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return Err("registry port must be a number");
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn check_tag(t: &str) -> Result<(), &'static str> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = t.chars();
    match chars.next() {
        None => Err("tag is empty"),
        Some(c) if !word(c) => Err("tag must start with a letter, digit or '_'"),
        _ if t.len() > 128 => Err("tag is longer than 128 characters"),
        _ if !chars.all(|c| word(c) || c == '.' || c == '-') => {
            Err("tag may hold only letters, digits, '_', '.' and '-'")
        }
        _ => Ok(()),
    }
}

/// `algorithm:hex`, with the length checked for the algorithms we know.
fn check_digest(d: &str) -> Result<(), &'static str> {
    let (alg, hex) = d.split_once(':').ok_or("digest must be algorithm:hex")?;
    if alg.is_empty()
        || !alg.starts_with(|c: char| c.is_ascii_alphabetic())
        || !alg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c))
    {
        return Err("digest algorithm is invalid");
    }
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) || hex.len() < 32 {
        return Err("digest must have at least 32 hex digits");
    }
    match alg {
        "sha256" if hex.len() != 64 => Err("a sha256 digest has 64 hex digits"),
        "sha512" if hex.len() != 128 => Err("a sha512 digest has 128 hex digits"),
        _ if hex.chars().any(|c| c.is_ascii_uppercase()) => Err("digest hex must be lowercase"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_names_normalise_like_containerd() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn registry_hosts_with_ports_are_not_tags() {
        let r = Reference::parse("172.31.250.1:5000/pause:3.10").unwrap();
        assert_eq!(r.domain, "172.31.250.1:5000");
        assert_eq!(r.path, "pause");
        assert_eq!(r.tag.as_deref(), Some("3.10"));
        assert_eq!(norm("localhost:5000/a/b"), "localhost:5000/a/b:latest");
        assert_eq!(norm("localhost/a"), "localhost/a:latest");
        assert_eq!(norm("[::1]:5000/a:t"), "[::1]:5000/a:t");
    }

    #[test]
    fn digests_are_kept_and_suppress_the_default_tag() {
        assert_eq!(
            norm(&format!("busybox@{D}")),
            format!("docker.io/library/busybox@{D}")
        );
        assert_eq!(norm(&format!("r.io/a:1@{D}")), format!("r.io/a:1@{D}"));
    }

    #[test]
    fn malformed_references_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("busy box", "whitespace"),
            ("busybox:", "tag is empty"),
            ("busybox:-x", "tag must start"),
            ("busybox@sha256:abc", "32 hex"),
            ("busybox@sha256:0123456789abcdef0123456789abcdef", "64 hex"),
            ("a//b", "empty component"),
            ("a/-b", "start with a letter"),
            ("a/b-", "followed by a letter"),
            ("host.io:port/x", "port must be a number"),
            ("bad_host.io/x", "host name"),
            ("-h.io/x", "host name"),
            (":tag", "repository name is empty"),
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
        let long = format!("a/{}", "b".repeat(300));
        assert!(Reference::parse(&long).is_err());
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse(&long_tag).is_err());
    }
}
