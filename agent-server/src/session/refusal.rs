//! A request refused, with the code on the wire that the source acts on.

use common::protocol::{ErrorCode, ServerMessage};

/// A request refused, with the code the source acts on.
pub(super) struct Refusal {
    pub(super) code: ErrorCode,
    pub(super) error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Refusal {
    fn from(error: E) -> Self {
        Self {
            code: ErrorCode::Host,
            error: error.into(),
        }
    }
}

pub(super) fn refuse(code: ErrorCode, error: impl Into<anyhow::Error>) -> Refusal {
    Refusal {
        code,
        error: error.into(),
    }
}

pub(super) fn invalid(error: impl Into<anyhow::Error>) -> Refusal {
    refuse(ErrorCode::Invalid, error)
}

pub(super) type Reply = Result<ServerMessage, Refusal>;
