//! Sending calls with an absolute deadline ([`CioClient::with_deadline`]).
//!
//! A send that is still waiting in the rate limiter (or behind a 429's pause) when it should
//! already be on its way can end up leaving after the caller has given up on it, the outcome
//! then being unknown to everyone. With a deadline, the whole attempt is fenced: the request
//! must be able to START by `deadline - request timeout`, so that it is answered (or has timed
//! out) by the deadline. If the limiter cannot give it a turn by then, the call fails with
//! [`SendError::NotSent`] at once, without waiting: that error guarantees nothing left the
//! process, so the caller may send again later without any risk of a double send.

use std::time::Duration;

use tokio::time::Instant;

use crate::campaigns::{NewNewsletter, Newsletter, Trigger};
use crate::client::CioClient;
use crate::config::Api;
use crate::error::CioError;

/// A call that never left the process because it could not start early enough to finish by
/// its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not sent to Customer.io {api} API ({endpoint}): it could not start by its deadline minus \
     the request timeout{}",
    fmt_wait(*.earliest_start_in)
)]
pub struct NotSent {
    /// Which API it was for.
    pub api: Api,
    /// Endpoint template.
    pub endpoint: &'static str,
    /// How long after the refusal the rate limiter could have let it start, when known
    /// (`None`: every place was held by requests still under way).
    pub earliest_start_in: Option<Duration>,
}

fn fmt_wait(wait: Option<Duration>) -> String {
    match wait {
        Some(d) => format!(" (the earliest turn was {:.3}s away)", d.as_secs_f64()),
        None => String::new(),
    }
}

/// The error of a call made with a deadline: either it provably never left ([`NotSent`]), or
/// it failed like any call ([`CioError`]).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing left the process: safe to send again later.
    #[error(transparent)]
    NotSent(#[from] NotSent),
    /// The call's ordinary failure (check [`CioError::is_outcome_unknown`] before sending
    /// again).
    #[error(transparent)]
    Failed(#[from] CioError),
}

impl SendError {
    /// True when the request may have reached Customer.io without an answer coming back;
    /// never for [`SendError::NotSent`].
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            SendError::NotSent(_) => false,
            SendError::Failed(error) => error.is_outcome_unknown(),
        }
    }

    /// True for [`SendError::NotSent`]: the request never left the process.
    pub fn is_not_sent(&self) -> bool {
        matches!(self, SendError::NotSent(_))
    }

    /// The ordinary failure, if that is what it is.
    pub fn as_cio_error(&self) -> Option<&CioError> {
        match self {
            SendError::NotSent(_) => None,
            SendError::Failed(error) => Some(error),
        }
    }
}

impl From<SendError> for CioError {
    /// For callers with a single error type: [`SendError::NotSent`] becomes a
    /// [`CioError::Transport`] with `maybe_sent: false` (the request provably never left).
    fn from(error: SendError) -> Self {
        match error {
            SendError::Failed(error) => error,
            SendError::NotSent(not_sent) => CioError::Transport {
                api: not_sent.api,
                endpoint: not_sent.endpoint,
                message: not_sent.to_string(),
                maybe_sent: false,
            },
        }
    }
}

/// A [`CioClient`] whose sending calls must be finished by a deadline (from
/// [`CioClient::with_deadline`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct DeadlineClient {
    client: CioClient,
    deadline: Instant,
}

impl CioClient {
    /// Sending calls fenced by `deadline` (a `std::time::Instant` or `tokio::time::Instant`):
    /// each must be able to start by `deadline - timeout` ([`DeadlineClient::latest_start`]),
    /// including its wait in the shared rate limiter and behind any 429 pause, or it fails at
    /// once with [`SendError::NotSent`] and nothing is sent.
    pub fn with_deadline(&self, deadline: impl Into<Instant>) -> DeadlineClient {
        DeadlineClient {
            client: self.clone(),
            deadline: deadline.into(),
        }
    }
}

impl DeadlineClient {
    /// The deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The latest moment a request may start: the deadline minus the client's request
    /// timeout (`None`: earlier than this process can represent, i.e. already past).
    pub fn latest_start(&self) -> Option<Instant> {
        self.deadline.checked_sub(self.client.timeout())
    }

    /// [`CioClient::trigger_broadcast`] within the deadline.
    pub async fn trigger_broadcast(
        &self,
        broadcast_id: i64,
        trigger: &Trigger,
    ) -> Result<i64, SendError> {
        self.client
            .trigger_broadcast_by(broadcast_id, trigger, Some(self.deadline))
            .await
    }

    /// [`CioClient::create_newsletter`] within the deadline.
    pub async fn create_newsletter(
        &self,
        newsletter: &NewNewsletter,
    ) -> Result<Newsletter, SendError> {
        self.client
            .create_newsletter_by(newsletter, Some(self.deadline))
            .await
    }

    /// [`CioClient::send_newsletter`] within the deadline.
    pub async fn send_newsletter(&self, newsletter_id: i64) -> Result<(), SendError> {
        self.client
            .send_newsletter_by(newsletter_id, Some(self.deadline))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn not_sent_is_never_outcome_unknown_and_converts_to_a_never_left_transport_error() {
        let not_sent = SendError::NotSent(NotSent {
            api: Api::App,
            endpoint: "/v1/campaigns/{broadcast_id}/triggers",
            earliest_start_in: Some(Duration::from_millis(2500)),
        });
        assert!(!not_sent.is_outcome_unknown());
        assert!(not_sent.is_not_sent());
        assert!(not_sent.as_cio_error().is_none());
        let text = not_sent.to_string();
        assert!(
            text.contains("not sent") && text.contains("2.500s"),
            "{text}"
        );
        let as_cio = CioError::from(not_sent);
        assert!(matches!(
            as_cio,
            CioError::Transport {
                maybe_sent: false,
                ..
            }
        ));
        assert!(!as_cio.is_outcome_unknown());

        let timeout = SendError::Failed(CioError::Timeout {
            api: Api::App,
            endpoint: "/x",
        });
        assert!(timeout.is_outcome_unknown() && !timeout.is_not_sent());
        assert!(matches!(CioError::from(timeout), CioError::Timeout { .. }));
    }
}
