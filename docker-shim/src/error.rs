//! The shim's one error type, [`ShimError`], and the one place where any
//! failure becomes a Docker error answer: a status code and
//! `{"message": …}` ([`ShimError::status`], [`ShimError::message`]).
//!
//! gRPC codes from the coordinator map as follows: NotFound → 404,
//! AlreadyExists and FailedPrecondition → 409, InvalidArgument and
//! OutOfRange → 400, Unauthenticated → 401, PermissionDenied → 403,
//! ResourceExhausted → 429, Unavailable → 503, anything else → 500.

use http::StatusCode;
use tonic::Code;

/// What a failed gRPC call was about, so that "not found" reads as Docker's
/// "No such container: …" or "No such image: …".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A container, as the client named it.
    Container(String),
    /// An image reference, as the client gave it.
    Image(String),
    /// A network, as the client named it.
    Network(String),
    /// Nothing in particular (lists, info).
    Other,
}

/// Everything that can go wrong while answering a Docker API call.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The request is malformed or asks for what Berth cannot honour.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is over [`crate::http::MAX_BODY`].
    #[error("request body is larger than {limit} bytes; Berth accepts at most that much")]
    BodyTooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The container is already in the state asked for (Docker's 304).
    #[error("container is already in that state")]
    NotModified,
    /// No such route in the Docker Engine API.
    #[error("page not found")]
    RouteNotFound,
    /// A Docker Engine API endpoint Berth does not implement.
    #[error("Berth does not support {method} {path} yet")]
    Unsupported {
        /// HTTP method of the call.
        method: String,
        /// Path of the call, without the version prefix.
        path: String,
    },
    /// The coordinator refused or failed a call.
    #[error("{}", grpc_message(.status, .subject))]
    Grpc {
        /// What the call was about.
        subject: Subject,
        /// The coordinator's answer.
        status: tonic::Status,
    },
    /// The request clashes with the state of its object (Docker's 409),
    /// e.g. an exec in a container that is not running.
    #[error("{0}")]
    Conflict(String),
    /// No exec instance with this ID (never created, or forgotten).
    #[error("No such exec instance: {0}")]
    NoSuchExec(String),
    /// Docker's 403: an operation the object does not allow (e.g.
    /// removing the default `bridge` network).
    #[error("{0}")]
    Forbidden(String),
    /// No such file or directory in a container (`docker cp`).
    #[error("{0}")]
    NoSuchPath(String),
    /// No plugin of this name (Berth has no engine plugins).
    #[error("plugin {0:?} not found")]
    NoSuchPlugin(String),
    /// No volume of this name (Berth has no Docker volumes yet).
    #[error("get {0}: no such volume")]
    NoSuchVolume(String),
    /// The shim holds as many running exec instances as it keeps.
    #[error("the shim already runs {limit} exec instances; wait for some to end and try again")]
    TooManyExecs {
        /// The bound.
        limit: usize,
    },
    /// A bug or an unexpected condition in the shim itself.
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    /// Wraps a coordinator error about `subject`.
    pub fn grpc(subject: Subject, status: tonic::Status) -> Self {
        ShimError::Grpc { subject, status }
    }

    /// The HTTP status of Docker's answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ShimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ShimError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ShimError::NotModified => StatusCode::NOT_MODIFIED,
            ShimError::RouteNotFound => StatusCode::NOT_FOUND,
            ShimError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            ShimError::Grpc { status, .. } => http_status(status.code()),
            ShimError::Conflict(_) => StatusCode::CONFLICT,
            ShimError::Forbidden(_) => StatusCode::FORBIDDEN,
            ShimError::NoSuchExec(_)
            | ShimError::NoSuchPlugin(_)
            | ShimError::NoSuchPath(_)
            | ShimError::NoSuchVolume(_) => StatusCode::NOT_FOUND,
            ShimError::TooManyExecs { .. } => StatusCode::TOO_MANY_REQUESTS,
            ShimError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The text of Docker's `{"message": …}`.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Docker's error body: `{"message": …}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "message": self.message() })
    }
}

/// The HTTP status for a gRPC code (see the module documentation).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn grpc_message(status: &tonic::Status, subject: &Subject) -> String {
    match (status.code(), subject) {
        (Code::NotFound, Subject::Container(id)) => format!("No such container: {id}"),
        (Code::NotFound, Subject::Image(image)) => format!("No such image: {image}"),
        (Code::NotFound, Subject::Network(n)) => format!("network {n} not found"),
        (Code::Unavailable, _) => format!(
            "the Berth coordinator is unavailable ({}); check --coordinator and that it runs",
            status.message()
        ),
        (code, _) if status.message().is_empty() => {
            format!("the Berth coordinator answered {code:?}")
        }
        _ => status.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_codes_become_docker_status_codes() {
        let cases = [
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::FailedPrecondition, 409),
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ];
        for (code, want) in cases {
            assert_eq!(http_status(code).as_u16(), want, "{code:?}");
        }
    }

    #[test]
    fn a_missing_container_reads_as_dockers_no_such_container() {
        let e = ShimError::grpc(
            Subject::Container("abc".into()),
            tonic::Status::not_found("container record abc not found in default"),
        );
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.body(),
            serde_json::json!({"message": "No such container: abc"})
        );
    }

    #[test]
    fn a_refusal_keeps_the_coordinators_words() {
        let e = ShimError::grpc(
            Subject::Other,
            tonic::Status::permission_denied("alice may not create pods in team-a"),
        );
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.message(), "alice may not create pods in team-a");
    }

    #[test]
    fn missing_execs_networks_and_volumes_read_as_dockers_404s() {
        let cases = [
            (
                ShimError::NoSuchExec("e1".into()),
                "No such exec instance: e1",
            ),
            (
                ShimError::grpc(
                    Subject::Network("n1".into()),
                    tonic::Status::not_found("network n1 not found"),
                ),
                "network n1 not found",
            ),
            (
                ShimError::NoSuchVolume("v1".into()),
                "get v1: no such volume",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(
                (e.status(), e.message().as_str()),
                (StatusCode::NOT_FOUND, want)
            );
        }
        assert_eq!(
            ShimError::Conflict("Container c is not running".into()).status(),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn unsupported_endpoints_say_so() {
        let e = ShimError::Unsupported {
            method: "POST".into(),
            path: "/build".into(),
        };
        assert_eq!(e.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(e.message(), "Berth does not support POST /build yet");
    }
}
