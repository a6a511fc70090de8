//! Container image references: parsing, validation and normalisation.
//!
//! This is Berth's one image-reference grammar. It follows the distribution
//! project's `reference` package (`[domain[:port]/]path[:tag][@algorithm:hex]`)
//! and normalises the way containerd and the kubelet do: a missing domain means
//! `docker.io`, a single path component on Docker Hub gets `library/`, and a
//! reference with neither tag nor digest means `:latest`.
//!
//! Where distribution is loose, Berth is strict, so that nothing it admits is
//! later refused by the runtime:
//! - the first component is a registry host only if it holds a `.` or a `:`
//!   or is `localhost` (distribution also takes an uppercase first component
//!   for a host, so `Team/app` would go to a registry called `Team`; here it is
//!   an invalid, uppercase repository);
//! - a port is 1 to 65535, without leading zeros;
//! - a digest is `sha256`, `sha384` or `sha512` with its exact number of
//!   lowercase hex digits (what containerd can verify);
//! - the normalised name (`domain/path`) is at most 255 characters.
//!
//! **Identity.** A reference with both a tag and a digest (`app:1@sha256:…`)
//! is the digest: containerd pulls by digest and drops the tag, and CRI then
//! reports only `repository@sha256:…` among the image's repo digests. So
//! [`Reference::parse`] drops the tag of such a reference, and the normal form
//! ([`Reference`]'s `Display`, also [`Reference::identity`]) is
//! `domain/path@digest`: the string the runtime reports once the image is there.
//!
//! [`PATTERN`] is the same grammar as one RE2-compatible regular expression;
//! the ImageCache CRD's admission rule is built from it, and [`examples`] is the
//! table of references every implementation is tested against.

use std::fmt;

/// Registry assumed when a reference names none.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Longest normalised repository name (`domain/path`) the grammar allows.
pub const NAME_MAX: usize = 255;
/// Longest reference the grammar allows: a name of [`NAME_MAX`], a 128
/// character tag and a sha512 digest.
pub const REFERENCE_MAX: usize = NAME_MAX + 1 + 128 + 1 + "sha512:".len() + 128;

/// A host name label: letters, digits and inner hyphens.
macro_rules! label {
    () => {
        "[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    };
}
/// A port from 1 to 65535 without leading zeros.
macro_rules! port {
    () => {
        "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    };
}
/// A path component: lowercase letters and digits, joined by `.`, `_`, `__` or `-`s.
macro_rules! component {
    () => {
        "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    };
}

/// A registry host: a dotted host name or a bracketed IPv6 address (each with
/// an optional port), one label with a port, or `localhost`.
macro_rules! domain {
    () => {
        concat!(
            "(?:(?:",
            label!(),
            r"(?:\.",
            label!(),
            r")+|\[[a-fA-F0-9:]+\])(?::",
            port!(),
            ")?|",
            label!(),
            ":",
            port!(),
            "|localhost)"
        )
    };
}
/// A repository name as written: a registry host or a dot-free first
/// component followed by more components, or one component alone.
macro_rules! name {
    () => {
        concat!(
            "(?:(?:",
            domain!(),
            "|[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*)(?:/",
            component!(),
            ")+|",
            component!(),
            ")"
        )
    };
}

/// [`PATTERN`]'s registry host, for rules that must tell whether a name
/// starts with one.
pub const DOMAIN_PATTERN: &str = domain!();
/// [`PATTERN`]'s repository name as written, for rules that measure it.
pub const NAME_PATTERN: &str = name!();
/// The whole grammar as one anchored, RE2-compatible regular expression
/// (except for [`NAME_MAX`], which a regular expression cannot count).
pub const PATTERN: &str = concat!(
    "^",
    name!(),
    "(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?",
    "(?:@(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}))?$"
);

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `docker.io` or `10.0.0.1:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/busybox`.
    pub path: String,
    /// Tag; `latest` when the reference had neither tag nor digest, `None`
    /// when it has a digest (a tag written beside a digest is dropped).
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
        let (domain, path) = match name.split_once('/') {
            Some((first, rest)) if is_domain_like(first) => {
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
        if domain.len() + 1 + path.len() > NAME_MAX {
            return Err(err(
                "repository name is longer than 255 characters once normalised",
            ));
        }
        let tag = match (tag, &digest) {
            (_, Some(_)) => None,
            (Some(t), None) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// The same repository under the tag `<tag><suffix>` (`redis:7` →
    /// `redis:7-baffs`, as baffs names its results); a reference by digest
    /// gets `sha256-<first 12 hex digits><suffix>`. Fails when the tag would
    /// be longer than a tag may be.
    pub fn with_tag_suffix(&self, suffix: &str) -> Result<Reference, String> {
        let tag = match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{t}{suffix}"),
            (None, Some(d)) => format!(
                "{}{suffix}",
                d.replace(':', "-").chars().take(19).collect::<String>()
            ),
            (None, None) => format!("latest{suffix}"),
        };
        if tag.len() > 128 {
            return Err(format!(
                "{self}: the tag {tag:?} would be longer than 128 characters"
            ));
        }
        Ok(Reference {
            tag: Some(tag),
            digest: None,
            ..self.clone()
        })
    }

    /// [`Reference::with_tag_suffix`], in `repository` (`host[:port]/path`)
    /// when one is given: where a debloated image goes.
    pub fn suffixed_in(&self, suffix: &str, repository: Option<&str>) -> Result<Reference, String> {
        let named = self.with_tag_suffix(suffix)?;
        match repository {
            None => Ok(named),
            Some(repo) => Reference::parse(&format!("{repo}:{}", named.tag.unwrap_or_default()))
                .map_err(|e| e.to_string()),
        }
    }

    /// `domain/path`, the repository without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The normal form, as the runtime reports the image once it holds it:
    /// `domain/path@digest` for a digest (in repo digests), else
    /// `domain/path:tag` (in repo tags). Same as `to_string()`.
    pub fn identity(&self) -> String {
        self.to_string()
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

/// Whether the first component of a name is a registry host rather than part
/// of the path.
fn is_domain_like(first: &str) -> bool {
    first.contains(['.', ':']) || first.starts_with('[') || first == "localhost"
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
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("an IPv6 registry host may be followed only by a port")?,
            ),
        };
        (None, port)
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
    if let Some(port) = port {
        let number = port.parse::<u16>().ok().filter(|p| *p > 0);
        if !port.chars().all(|c| c.is_ascii_digit()) || port.starts_with('0') || number.is_none() {
            return Err("registry port must be a number from 1 to 65535");
        }
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

/// `sha256:`, `sha384:` or `sha512:` and that many lowercase hex digits.
fn check_digest(d: &str) -> Result<(), &'static str> {
    let (alg, hex) = d.split_once(':').ok_or("digest must be algorithm:hex")?;
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("digest algorithm must be sha256, sha384 or sha512"),
    };
    if !hex
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        || !hex.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err("digest must be lowercase hex");
    }
    if hex.len() != len {
        return Err(match alg {
            "sha256" => "a sha256 digest has 64 hex digits",
            "sha384" => "a sha384 digest has 96 hex digits",
            _ => "a sha512 digest has 128 hex digits",
        });
    }
    Ok(())
}

/// One reference of [`examples`]: what is written, and either its normal form
/// or a fragment of the reason it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The reference as a user writes it.
    pub input: String,
    /// `Ok(normal form)`, or `Err(part of the refusal's reason)`.
    pub expected: Result<String, &'static str>,
}

/// The grammar by example: the one table the parser, the CRD's admission rule
/// and the registry client's reading of our normal form are all tested against.
/// Cases at the edges first (uppercase, lengths, ports, tag beside digest).
pub fn examples() -> Vec<Example> {
    let d256 = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let d384 = format!("sha384:{}", "0123456789abcdef".repeat(6));
    let d512 = format!("sha512:{}", "0123456789abcdef".repeat(8));
    let a = |n: usize| "a".repeat(n);
    let ok = |input: String, normal: String| Example {
        input,
        expected: Ok(normal),
    };
    let bad = |input: String, why: &'static str| Example {
        input,
        expected: Err(why),
    };
    let s = |x: &str| x.to_string();
    let too_long = "longer than 255 characters once normalised";
    vec![
        ok(s("busybox"), s("docker.io/library/busybox:latest")),
        ok(s("busybox:1.36"), s("docker.io/library/busybox:1.36")),
        ok(s("user/app"), s("docker.io/user/app:latest")),
        ok(
            s("docker.io/busybox"),
            s("docker.io/library/busybox:latest"),
        ),
        ok(
            s("docker.io/library/busybox:latest"),
            s("docker.io/library/busybox:latest"),
        ),
        ok(
            s("172.31.250.1:5000/pause:3.10"),
            s("172.31.250.1:5000/pause:3.10"),
        ),
        ok(s("localhost/a"), s("localhost/a:latest")),
        ok(s("localhost:5000/a/b"), s("localhost:5000/a/b:latest")),
        ok(s("localhost:5000"), s("docker.io/library/localhost:5000")),
        ok(s("r.io"), s("docker.io/library/r.io:latest")),
        ok(s("a.b:5000"), s("docker.io/library/a.b:5000")),
        ok(s("a.b/c"), s("a.b/c:latest")),
        ok(s("[::1]:5000/a:t"), s("[::1]:5000/a:t")),
        ok(s("[fe80::1]/a"), s("[fe80::1]/a:latest")),
        ok(
            s("Registry.Example/team/app:1"),
            s("Registry.Example/team/app:1"),
        ),
        ok(s("r.example:65535/a:1"), s("r.example:65535/a:1")),
        ok(s("r.example:1/a"), s("r.example:1/a:latest")),
        ok(
            s("a__b/c.d_e--f:V1.0-rc_1"),
            s("docker.io/a__b/c.d_e--f:V1.0-rc_1"),
        ),
        ok(s("a:_x"), s("docker.io/library/a:_x")),
        ok(
            format!("a:{}", "t".repeat(128)),
            format!("docker.io/library/a:{}", "t".repeat(128)),
        ),
        ok(
            format!("busybox@{d256}"),
            format!("docker.io/library/busybox@{d256}"),
        ),
        ok(format!("r.io/a:1@{d256}"), format!("r.io/a@{d256}")),
        ok(format!("r.io/a@{d384}"), format!("r.io/a@{d384}")),
        ok(format!("r.io/a@{d512}"), format!("r.io/a@{d512}")),
        ok(
            format!("r.io/{}", a(250)),
            format!("r.io/{}:latest", a(250)),
        ),
        ok(a(237), format!("docker.io/library/{}:latest", a(237))),
        ok(
            format!("x/{}", a(243)),
            format!("docker.io/x/{}:latest", a(243)),
        ),
        ok(
            format!("docker.io/{}", a(237)),
            format!("docker.io/library/{}:latest", a(237)),
        ),
        bad(s(""), "empty"),
        bad(s("Busybox"), "lowercase"),
        bad(s("Team/app:1"), "lowercase"),
        bad(s("r.io/A"), "lowercase"),
        bad(s("busy box"), "whitespace"),
        bad(s("busybox "), "whitespace"),
        bad(s("busybox:"), "tag is empty"),
        bad(s("busybox:-x"), "tag must start"),
        bad(format!("a:{}", "t".repeat(129)), "tag is longer than 128"),
        bad(s("r.io/a:1:2"), "may hold only"),
        bad(s("busybox@sha256:abc"), "64 hex"),
        bad(format!("busybox@{}", d256.to_uppercase()), "algorithm"),
        bad(
            format!("busybox@sha256:{}", "ABCDEF0123456789".repeat(4)),
            "lowercase hex",
        ),
        bad(
            format!("busybox@md5:{}", "0123456789abcdef".repeat(2)),
            "algorithm",
        ),
        bad(s("busybox@"), "algorithm:hex"),
        bad(s("a//b"), "empty component"),
        bad(s("a/-b"), "start with a letter"),
        bad(s("a/b-"), "followed by a letter"),
        bad(s("a___b"), "followed by a letter"),
        bad(s("ä"), "start with a letter"),
        bad(s("../../kube-system/x"), "host name"),
        bad(s("r.io/"), "path is empty"),
        bad(s(":tag"), "repository name is empty"),
        bad(s("host.io:port/x"), "port must be a number"),
        bad(s("r.example:123456/a:1"), "port must be a number"),
        bad(s("r.example:65536/a"), "port must be a number"),
        bad(s("r.example:0/a"), "port must be a number"),
        bad(s("r.example:05000/a"), "port must be a number"),
        bad(s("bad_host.io/x"), "host name"),
        bad(s("-h.io/x"), "host name"),
        bad(s("[::1]x/a"), "followed only by a port"),
        bad(format!("r.io/{}", a(300)), too_long),
        bad(format!("r.io/{}", a(251)), too_long),
        bad(a(238), too_long),
        bad(format!("x/{}", a(244)), too_long),
        bad(format!("docker.io/{}", a(238)), too_long),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_gives_every_example_its_normal_form_or_its_reason() {
        for e in examples() {
            let got = Reference::parse(&e.input);
            match (&e.expected, got) {
                (Ok(normal), Ok(r)) => assert_eq!(&r.to_string(), normal, "{:?}", e.input),
                (Err(why), Err(err)) => {
                    assert!(err.to_string().contains(why), "{:?}: {err}", e.input)
                }
                (expected, got) => panic!("{:?}: expected {expected:?}, got {got:?}", e.input),
            }
        }
    }

    #[test]
    fn the_normal_form_is_a_fixed_point() {
        for e in examples() {
            if let Ok(normal) = e.expected {
                let again = Reference::parse(&normal).unwrap();
                assert_eq!(again.to_string(), normal);
                assert_eq!(again.identity(), normal);
            }
        }
    }

    #[test]
    fn the_pattern_accepts_exactly_what_the_parser_accepts_but_for_the_name_length() {
        let re = regex::Regex::new(PATTERN).unwrap();
        for e in examples() {
            if e.expected == Err("longer than 255 characters once normalised") {
                // A regular expression cannot count; the CRD adds a rule for it.
                assert!(re.is_match(&e.input), "{:?}", e.input);
                continue;
            }
            assert_eq!(
                re.is_match(&e.input),
                e.expected.is_ok(),
                "{:?}: expected {:?}",
                e.input,
                e.expected
            );
        }
    }

    #[test]
    fn a_tag_beside_a_digest_is_dropped_because_the_runtime_reports_the_digest() {
        let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let r = Reference::parse(&format!("r.io/a:1@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.identity(), format!("r.io/a@{d}"));
    }

    #[test]
    fn the_longest_reference_fits_reference_max() {
        let longest = format!(
            "r.io/{}:{}@sha512:{}",
            "a".repeat(NAME_MAX - 5),
            "t".repeat(128),
            "0".repeat(128)
        );
        assert_eq!(longest.len(), REFERENCE_MAX);
        assert!(Reference::parse(&longest).is_ok());
        assert!(regex::Regex::new(PATTERN).unwrap().is_match(&longest));
    }
}
