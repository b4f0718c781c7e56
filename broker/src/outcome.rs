//! How a request ended. The relay and the HTTP trigger report a [`RequestOutcome`] when a request ends,
//! the hub passes what it says about the instance's health on to the balancer, and the metrics count it as
//! `vigil_broker_requests_total{outcome}`. It sits below all of them so that each can name it without
//! depending on the others.

use crate::balance::Outcome;

/// How a request ended, as `vigil_broker_requests_total{outcome}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    Ok,
    /// The instance answered with an application error.
    AppError,
    /// The instance failed: connection lost, transport error, timeout.
    Failure,
    /// The requester cancelled.
    Cancelled,
    /// Refused before reaching an instance: queue full, or no instance came in time.
    Rejected,
    Timeout,
    /// No such service, alias or version; or its circuit is open.
    NoRoute,
    CircuitOpen,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::AppError => "app_error",
            RequestOutcome::Failure => "failure",
            RequestOutcome::Cancelled => "cancelled",
            RequestOutcome::Rejected => "rejected",
            RequestOutcome::Timeout => "timeout",
            RequestOutcome::NoRoute => "no_route",
            RequestOutcome::CircuitOpen => "circuit_open",
        }
    }

    /// What the outcome says about the health of the instance that served the request.
    pub fn health(self) -> Outcome {
        match self {
            RequestOutcome::Failure | RequestOutcome::Timeout => Outcome::Failure,
            RequestOutcome::Ok => Outcome::Success,
            // Neither the instance's fault nor a sign of its health.
            _ => Outcome::ApplicationError,
        }
    }
}
