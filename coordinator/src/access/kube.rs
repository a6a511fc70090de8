//! The [`Reviewer`] that asks the apiserver: a TokenReview for the caller, a
//! SubjectAccessReview for each read. The coordinator's ClusterRole allows
//! it to create both.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::{AccessError, Caller, ResourceAccess, Reviewer, TokenVerdict};

/// Reviews with the coordinator's own client.
#[derive(Clone)]
pub struct KubeReviewer {
    client: kube::Client,
}

impl KubeReviewer {
    /// Asks the apiserver `client` talks to.
    pub fn new(client: kube::Client) -> Self {
        KubeReviewer { client }
    }
}

fn unavailable(e: kube::Error) -> AccessError {
    AccessError::Unavailable(e.to_string())
}

impl Reviewer for KubeReviewer {
    async fn review_token(&self, token: &str) -> Result<TokenVerdict, AccessError> {
        let review = TokenReview {
            // No audiences: the apiserver's own, which `kubectl create token`
            // issues by default. Agents' `berth` tokens are not accepted here.
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let status = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(TokenVerdict::Invalid(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        Ok(TokenVerdict::Valid(Caller {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        }))
    }

    async fn review_access(
        &self,
        caller: &Caller,
        access: &ResourceAccess,
    ) -> Result<bool, AccessError> {
        let (resource, subresource) = match access.resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (access.resource, None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: Some(caller.uid.clone()).filter(|u| !u.is_empty()),
                groups: Some(caller.groups.clone()),
                extra: Some(caller.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(access.verb.into()),
                    group: Some(access.group.into()),
                    // `pods/exec`: resource `pods`, subresource `exec`.
                    resource: Some(resource.into()),
                    subresource: subresource.map(String::from),
                    namespace: access.namespace.clone(),
                    name: access.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?
            .status
            .unwrap_or_default();
        Ok(status.allowed && status.denied != Some(true))
    }
}
