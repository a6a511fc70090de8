//! Problems worth one Warning Event each (an unusable pull Secret, …): a
//! problem is reported when it first appears and again only when it changes,
//! not on every pass, so Events do not grow with time.

use std::collections::HashMap;

/// The problem last reported per subject (e.g. `ns/cache secret regcred`).
#[derive(Debug, Default)]
pub struct ProblemLog {
    reported: HashMap<String, String>,
}

impl ProblemLog {
    /// Whether `problem` of `subject` is news: true the first time and after
    /// it changed or was cleared; records it.
    pub fn is_news(&mut self, subject: &str, problem: &str) -> bool {
        if self.reported.get(subject).is_some_and(|p| p == problem) {
            return false;
        }
        self.reported
            .insert(subject.to_string(), problem.to_string());
        true
    }

    /// `subject` is fine now: its next problem is news again.
    pub fn clear(&mut self, subject: &str) {
        self.reported.remove(subject);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_secret_is_reported_once_until_its_problem_changes() {
        let mut log = ProblemLog::default();
        let subject = "ns/c secret regcred";
        let events = (0..1000)
            .filter(|_| log.is_news(subject, "imagePullSecret ns/regcred does not exist"))
            .count();
        assert_eq!(events, 1, "a thousand passes, one Event");
        assert!(log.is_news(subject, "Secret ns/regcred has no .dockerconfigjson"));
        assert!(!log.is_news(subject, "Secret ns/regcred has no .dockerconfigjson"));
        assert!(log.is_news(
            "ns/other secret regcred",
            "imagePullSecret ns/regcred does not exist"
        ));
        log.clear(subject);
        assert!(
            log.is_news(subject, "Secret ns/regcred has no .dockerconfigjson"),
            "broken again"
        );
    }
}
