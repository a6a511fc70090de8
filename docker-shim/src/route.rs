//! Which Docker Engine API call a request is: the optional `/v1.NN` prefix
//! is taken off (and checked against [`MIN_API`]..=[`MAX_API`]), the rest is
//! matched against the endpoints Berth implements ([`Route`]); a path the
//! Engine API knows but Berth does not implement is
//! [`RouteError::Unsupported`] (501), anything else [`RouteError::NotFound`]
//! (404, as Docker answers unknown paths).
//!
//! Image names may hold slashes (`/images/host:5000/a/b:tag/json`), so image
//! routes take every segment between `images` and the final verb.

use http::Method;

/// Lowest API minor version accepted in a `/v1.NN` prefix.
pub const MIN_API: u32 = 24;
/// The API minor version the shim advertises (and assumes without a prefix).
pub const MAX_API: u32 = 47;

/// An API version `1.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion {
    /// The number after `1.`.
    pub minor: u32,
}

impl ApiVersion {
    /// The version the shim speaks when the client names none.
    pub const CURRENT: ApiVersion = ApiVersion { minor: MAX_API };
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "1.{}", self.minor)
    }
}

/// An endpoint Berth implements; container and image names are percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET|HEAD /_ping`
    Ping,
    /// `GET /version`
    Version,
    /// `GET /info`
    Info,
    /// `GET /events`
    Events,
    /// `POST /images/create`
    ImageCreate,
    /// `GET /images/{name}/json`
    ImageInspect(String),
    /// `GET /images/json`
    ImageList,
    /// `POST /containers/create`
    ContainerCreate,
    /// `GET /containers/json`
    ContainerList,
    /// `GET /containers/{id}/json`
    ContainerInspect(String),
    /// `POST /containers/{id}/start`
    ContainerStart(String),
    /// `POST /containers/{id}/stop`
    ContainerStop(String),
    /// `POST /containers/{id}/kill`
    ContainerKill(String),
    /// `POST /containers/{id}/restart`
    ContainerRestart(String),
    /// `POST /containers/{id}/wait`
    ContainerWait(String),
    /// `DELETE /containers/{id}`
    ContainerRemove(String),
    /// `GET /containers/{id}/logs`
    ContainerLogs(String),
    /// `POST /containers/{id}/attach`
    ContainerAttach(String),
    /// `POST /containers/{id}/exec`
    ExecCreate(String),
    /// `POST /exec/{id}/start`
    ExecStart(String),
    /// `GET /exec/{id}/json`
    ExecInspect(String),
    /// `GET /networks`
    NetworkList,
    /// `GET /networks/{id}`
    NetworkInspect(String),
    /// `POST /networks/create`
    NetworkCreate,
    /// `DELETE /networks/{id}`
    NetworkRemove(String),
    /// `POST /networks/{id}/connect`
    NetworkConnect(String),
    /// `POST /networks/{id}/disconnect`
    NetworkDisconnect(String),
    /// `HEAD /containers/{id}/archive`
    ArchiveStat(String),
    /// `GET /containers/{id}/archive`
    ArchiveGet(String),
    /// `PUT /containers/{id}/archive`
    ArchivePut(String),
    /// `GET /plugins/{name}/json`
    PluginInspect(String),
    /// `GET /volumes`
    VolumeList,
    /// `GET /volumes/{name}`
    VolumeInspect(String),
}

impl Route {
    /// The container a route names, if it names one.
    pub fn container(&self) -> Option<&str> {
        use Route as R;
        match self {
            R::ContainerInspect(id)
            | R::ContainerStart(id)
            | R::ContainerStop(id)
            | R::ContainerKill(id)
            | R::ContainerRestart(id)
            | R::ContainerWait(id)
            | R::ContainerRemove(id)
            | R::ContainerLogs(id)
            | R::ContainerAttach(id)
            | R::ExecCreate(id)
            | R::ArchiveStat(id)
            | R::ArchiveGet(id)
            | R::ArchivePut(id) => Some(id),
            _ => None,
        }
    }
}

/// A request that is not one of the [`Route`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not a Docker Engine API path.
    NotFound,
    /// A Docker Engine API endpoint Berth does not implement; carries the
    /// path without its version prefix.
    Unsupported(String),
    /// `/v1.NN` below [`MIN_API`].
    TooOld(String),
    /// `/v1.NN` above [`MAX_API`].
    TooNew(String),
}

impl RouteError {
    /// The Docker error answer for this request.
    pub fn into_error(self, method: &Method) -> crate::error::ShimError {
        use crate::error::ShimError;
        match self {
            RouteError::NotFound => ShimError::RouteNotFound,
            RouteError::Unsupported(path) => ShimError::Unsupported {
                method: method.to_string(),
                path,
            },
            RouteError::TooOld(v) => ShimError::BadRequest(format!(
                "client version {v} is too old. Minimum supported API version is 1.{MIN_API}, please upgrade your client to a newer version"
            )),
            RouteError::TooNew(v) => ShimError::BadRequest(format!(
                "client version {v} is too new. Maximum supported API version is 1.{MAX_API}"
            )),
        }
    }
}

/// Finds the endpoint of `method path`, and the API version the client asked for.
pub fn route(method: &Method, path: &str) -> Result<(ApiVersion, Route), RouteError> {
    let (version, rest) = split_version(path)?;
    let segments: Vec<String> = rest
        .split('/')
        .skip(1)
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    let found = match segs.as_slice() {
        ["_ping"] if get || method == Method::HEAD => Some(Route::Ping),
        ["version"] if get => Some(Route::Version),
        ["info"] if get => Some(Route::Info),
        ["events"] if get => Some(Route::Events),
        ["images", "create"] if post => Some(Route::ImageCreate),
        ["images", "json"] if get => Some(Route::ImageList),
        ["images", name @ .., "json"]
            if get && !name.is_empty() && name.iter().all(|s| !s.is_empty()) =>
        {
            Some(Route::ImageInspect(name.join("/")))
        }
        ["containers", "create"] if post => Some(Route::ContainerCreate),
        ["containers", "json"] if get => Some(Route::ContainerList),
        ["containers", id] if method == Method::DELETE && !id.is_empty() => {
            Some(Route::ContainerRemove(id.to_string()))
        }
        ["containers", id, verb] if !id.is_empty() => {
            let id = id.to_string();
            match (*verb, get, post) {
                ("json", true, _) => Some(Route::ContainerInspect(id)),
                ("logs", true, _) => Some(Route::ContainerLogs(id)),
                ("start", _, true) => Some(Route::ContainerStart(id)),
                ("stop", _, true) => Some(Route::ContainerStop(id)),
                ("kill", _, true) => Some(Route::ContainerKill(id)),
                ("restart", _, true) => Some(Route::ContainerRestart(id)),
                ("wait", _, true) => Some(Route::ContainerWait(id)),
                ("attach", _, true) => Some(Route::ContainerAttach(id)),
                ("archive", true, _) => Some(Route::ArchiveGet(id)),
                ("archive", _, _) if method == Method::HEAD => Some(Route::ArchiveStat(id)),
                ("archive", _, _) if method == Method::PUT => Some(Route::ArchivePut(id)),
                ("exec", _, true) => Some(Route::ExecCreate(id)),
                _ => None,
            }
        }
        ["exec", id, "start"] if post && !id.is_empty() => Some(Route::ExecStart(id.to_string())),
        ["exec", id, "json"] if get && !id.is_empty() => Some(Route::ExecInspect(id.to_string())),
        ["networks"] if get => Some(Route::NetworkList),
        ["networks", "create"] if post => Some(Route::NetworkCreate),
        ["networks", id] if get && !id.is_empty() => Some(Route::NetworkInspect(id.to_string())),
        ["networks", id] if method == Method::DELETE && !id.is_empty() => {
            Some(Route::NetworkRemove(id.to_string()))
        }
        ["networks", id, "connect"] if post && !id.is_empty() => {
            Some(Route::NetworkConnect(id.to_string()))
        }
        ["networks", id, "disconnect"] if post && !id.is_empty() => {
            Some(Route::NetworkDisconnect(id.to_string()))
        }
        ["plugins", name @ .., "json"] if get && !name.is_empty() => {
            Some(Route::PluginInspect(name.join("/")))
        }
        ["volumes"] if get => Some(Route::VolumeList),
        ["volumes", name] if get && !name.is_empty() => {
            Some(Route::VolumeInspect(name.to_string()))
        }
        _ => None,
    };
    match found {
        Some(route) => Ok((version, route)),
        None if is_engine_endpoint(method, &segs) => Err(RouteError::Unsupported(rest.to_string())),
        None => Err(RouteError::NotFound),
    }
}

/// Takes `/v1.NN` off `path`: the version (current without one) and the rest.
fn split_version(path: &str) -> Result<(ApiVersion, &str), RouteError> {
    let Some(after) = path.strip_prefix("/v") else {
        return Ok((ApiVersion::CURRENT, path));
    };
    let (v, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let Some(minor) = v.strip_prefix("1.") else {
        // `/version` and friends start with `/v` too.
        return Ok((ApiVersion::CURRENT, path));
    };
    let Ok(minor) = minor.parse::<u32>() else {
        return Err(RouteError::NotFound);
    };
    if minor < MIN_API {
        return Err(RouteError::TooOld(v.to_string()));
    }
    if minor > MAX_API {
        return Err(RouteError::TooNew(v.to_string()));
    }
    Ok((ApiVersion { minor }, rest))
}

/// Whether the Engine API has this endpoint (one Berth does not implement).
fn is_engine_endpoint(method: &Method, segs: &[&str]) -> bool {
    let m = method.as_str();
    if let Some(first) = segs.first()
        && matches!(
            *first,
            "swarm" | "services" | "nodes" | "tasks" | "secrets" | "configs" | "plugins"
        )
    {
        return true;
    }
    match (m, segs) {
        ("POST", ["build"] | ["build", "prune"] | ["commit"] | ["auth"] | ["session"]) => true,
        ("GET", ["system", "df"]) => true,
        ("GET", ["distribution", name @ .., "json"]) => !name.is_empty(),
        ("GET", ["images", "search" | "get"]) => true,
        ("POST", ["images", "load" | "prune"]) => true,
        ("GET", ["images", name @ .., "history" | "get"]) => !name.is_empty(),
        ("POST", ["images", name @ .., "push" | "tag"]) => !name.is_empty(),
        ("DELETE", ["images", name @ ..]) => !name.is_empty(),
        ("POST", ["containers", "prune"]) => true,
        ("GET", ["containers", _, "top" | "changes" | "export" | "stats"]) => true,
        ("GET", ["containers", _, "attach", "ws"]) => true,
        (
            "POST",
            [
                "containers",
                _,
                "resize" | "pause" | "unpause" | "update" | "rename",
            ],
        ) => true,
        ("POST", ["exec", _, "resize"]) => true,
        ("DELETE", ["networks", _]) => true,
        ("POST", ["networks", "create" | "prune"]) => true,
        ("POST", ["networks", _, "connect" | "disconnect"]) => true,
        ("PUT" | "DELETE", ["volumes", _]) => true,
        ("POST", ["volumes", "create" | "prune"]) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: Method, path: &str) -> (ApiVersion, Route) {
        route(&method, path).unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
    }

    #[test]
    fn paths_without_a_version_speak_the_current_one() {
        assert_eq!(
            ok(Method::GET, "/_ping"),
            (ApiVersion::CURRENT, Route::Ping)
        );
        assert_eq!(ok(Method::GET, "/version").1, Route::Version);
    }

    #[test]
    fn every_version_prefix_from_1_24_to_1_47_is_accepted() {
        for minor in MIN_API..=MAX_API {
            let (v, r) = ok(Method::HEAD, &format!("/v1.{minor}/_ping"));
            assert_eq!((v.minor, r), (minor, Route::Ping));
        }
    }

    #[test]
    fn versions_outside_the_range_are_refused_with_dockers_words() {
        assert_eq!(
            route(&Method::GET, "/v1.23/info"),
            Err(RouteError::TooOld("1.23".into()))
        );
        assert_eq!(
            route(&Method::GET, "/v1.48/info"),
            Err(RouteError::TooNew("1.48".into()))
        );
        let msg = RouteError::TooNew("1.48".into())
            .into_error(&Method::GET)
            .message();
        assert!(
            msg.contains("Maximum supported API version is 1.47"),
            "{msg}"
        );
    }

    #[test]
    fn image_names_keep_their_slashes_and_ports() {
        assert_eq!(
            ok(Method::GET, "/v1.41/images/host:5000/a/b:tag/json").1,
            Route::ImageInspect("host:5000/a/b:tag".into())
        );
        assert_eq!(
            ok(Method::GET, "/images/busybox/json").1,
            Route::ImageInspect("busybox".into())
        );
    }

    #[test]
    fn container_routes_carry_the_decoded_id() {
        let cases = [
            (
                Method::GET,
                "/containers/abc/json",
                Route::ContainerInspect("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/start",
                Route::ContainerStart("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/stop",
                Route::ContainerStop("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/kill",
                Route::ContainerKill("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/restart",
                Route::ContainerRestart("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/wait",
                Route::ContainerWait("abc".into()),
            ),
            (
                Method::DELETE,
                "/containers/abc",
                Route::ContainerRemove("abc".into()),
            ),
            (
                Method::GET,
                "/containers/abc/logs",
                Route::ContainerLogs("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/attach",
                Route::ContainerAttach("abc".into()),
            ),
            (
                Method::POST,
                "/containers/abc/exec",
                Route::ExecCreate("abc".into()),
            ),
            (Method::POST, "/containers/create", Route::ContainerCreate),
            (Method::GET, "/containers/json", Route::ContainerList),
            (Method::POST, "/images/create", Route::ImageCreate),
            (
                Method::GET,
                "/containers/my%20c/json",
                Route::ContainerInspect("my c".into()),
            ),
        ];
        for (m, p, want) in cases {
            assert_eq!(ok(m.clone(), p).1, want, "{m} {p}");
            assert_eq!(
                ok(m.clone(), &format!("/v1.44{p}")).1,
                want,
                "{m} /v1.44{p}"
            );
        }
    }

    #[test]
    fn exec_network_and_volume_reads_carry_their_ids() {
        let cases = [
            (
                Method::POST,
                "/exec/e1/start",
                Route::ExecStart("e1".into()),
            ),
            (
                Method::GET,
                "/exec/e1/json",
                Route::ExecInspect("e1".into()),
            ),
            (Method::GET, "/networks", Route::NetworkList),
            (
                Method::PUT,
                "/containers/abc/archive",
                Route::ArchivePut("abc".into()),
            ),
            (
                Method::HEAD,
                "/containers/abc/archive",
                Route::ArchiveStat("abc".into()),
            ),
            (
                Method::GET,
                "/plugins/vieux/sshfs:latest/json",
                Route::PluginInspect("vieux/sshfs:latest".into()),
            ),
            (
                Method::GET,
                "/networks/bridge",
                Route::NetworkInspect("bridge".into()),
            ),
            (Method::POST, "/networks/create", Route::NetworkCreate),
            (
                Method::DELETE,
                "/networks/n1",
                Route::NetworkRemove("n1".into()),
            ),
            (
                Method::POST,
                "/networks/n1/connect",
                Route::NetworkConnect("n1".into()),
            ),
            (
                Method::POST,
                "/networks/n1/disconnect",
                Route::NetworkDisconnect("n1".into()),
            ),
            (Method::GET, "/volumes", Route::VolumeList),
            (
                Method::GET,
                "/volumes/data",
                Route::VolumeInspect("data".into()),
            ),
        ];
        for (m, p, want) in cases {
            assert_eq!(ok(m.clone(), p).1, want, "{m} {p}");
            assert_eq!(
                ok(m.clone(), &format!("/v1.24{p}")).1,
                want,
                "{m} /v1.24{p}"
            );
        }
    }

    #[test]
    fn known_engine_endpoints_berth_lacks_are_unsupported_not_missing() {
        let cases = [
            (Method::POST, "/v1.47/exec/abc/resize", "/exec/abc/resize"),
            (Method::POST, "/networks/prune", "/networks/prune"),
            (Method::POST, "/volumes/create", "/volumes/create"),
            (Method::GET, "/system/df", "/system/df"),
            (
                Method::DELETE,
                "/images/host:5000/a:1",
                "/images/host:5000/a:1",
            ),
            (Method::GET, "/images/search", "/images/search"),
            (Method::POST, "/build", "/build"),
            (Method::GET, "/swarm", "/swarm"),
        ];
        for (m, p, rest) in cases {
            assert_eq!(
                route(&m, p),
                Err(RouteError::Unsupported(rest.into())),
                "{m} {p}"
            );
        }
    }

    #[test]
    fn paths_docker_does_not_know_are_not_found() {
        for (m, p) in [
            (Method::GET, "/nope"),
            (Method::GET, "/containers/abc/frobnicate"),
            (Method::DELETE, "/_ping"),
            (Method::GET, "/v1.x/info"),
            (Method::GET, "/containers//json"),
            (Method::GET, "/exec/e1/start"),
            (Method::POST, "/exec/e1/json"),
        ] {
            assert_eq!(route(&m, p), Err(RouteError::NotFound), "{m} {p}");
        }
    }
}
