//! The bearer token sent on every coordinator call, read from a file and read
//! again every refresh interval (projected ServiceAccount tokens rotate).
//! A failed re-read keeps the last good token and says so in the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

/// The current token, shared by every client clone.
#[derive(Debug, Clone, Default)]
pub struct TokenSource {
    token: Arc<RwLock<Option<String>>>,
}

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no token.
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
}

fn read(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_path_buf()));
    }
    Ok(token.to_string())
}

impl TokenSource {
    /// No token: calls go without `authorization` (the coordinator refuses them).
    pub fn none() -> Self {
        TokenSource::default()
    }

    /// A fixed token (tests).
    pub fn fixed(token: &str) -> Self {
        TokenSource {
            token: Arc::new(RwLock::new(Some(token.to_string()))),
        }
    }

    /// Reads `path` now (failing if it cannot) and again every `refresh`, in a
    /// background task of the current runtime.
    pub fn from_file(path: PathBuf, refresh: Duration) -> Result<Self, TokenError> {
        let source = TokenSource::fixed(&read(&path)?);
        let shared = source.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            tick.tick().await;
            loop {
                tick.tick().await;
                match read(&path) {
                    Ok(t) => *shared.token.write().unwrap_or_else(|e| e.into_inner()) = Some(t),
                    Err(e) => tracing::warn!(error = %e, "keeping the last token"),
                }
            }
        });
        Ok(source)
    }

    /// The token now, if any.
    pub fn current(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Interceptor for TokenSource {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.current() {
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                tonic::Status::unauthenticated("the token holds characters a header cannot carry")
            })?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rotated_token_is_picked_up_at_the_next_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let source = TokenSource::from_file(path.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(source.current().as_deref(), Some("first"));
        std::fs::write(&path, "second").unwrap();
        let mut seen = source.current();
        for _ in 0..250 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = source.current();
            if seen.as_deref() == Some("second") {
                break;
            }
        }
        assert_eq!(seen.as_deref(), Some("second"));
    }

    #[tokio::test]
    async fn an_unreadable_or_empty_token_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TokenSource::from_file(dir.path().join("nope"), Duration::from_secs(60));
        assert!(matches!(missing, Err(TokenError::Read { .. })));
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = TokenSource::from_file(dir.path().join("empty"), Duration::from_secs(60));
        assert!(matches!(empty, Err(TokenError::Empty(_))));
    }

    #[test]
    fn every_call_carries_the_bearer_token() {
        let mut source = TokenSource::fixed("abc");
        let req = source.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");
        let mut none = TokenSource::none();
        assert!(
            none.call(tonic::Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
    }
}
