//! Typed errors of the Cassandra boundary. Each says whether retrying can help.

use scylla::errors::{
    DbError, DeserializationError, ExecutionError, IntoRowsResultError, NextPageError,
    NextRowError, PagerExecutionError, PrepareError, RequestAttemptError, RequestError, RowsError,
    SchemaAgreementError, TypeCheckError,
};
use std::fmt::Display;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No contact point answered.
    #[error("cannot reach Cassandra at {nodes}: {detail}. Start the local stack with `make infra-up` (or set store.nodes / CHAT_STORE__NODES)")]
    Unreachable {
        /// The contact points tried, comma-separated.
        nodes: String,
        /// What the driver reported.
        detail: String,
    },
    /// A statement failed.
    #[error("cassandra: cannot {what}: {detail}")]
    Query {
        /// What the store was doing, e.g. "write message".
        what: String,
        /// What the driver or the server reported.
        detail: String,
        /// Whether the failure is transient (timeout, overload, lost connection).
        retryable: bool,
    },
    /// The configuration cannot work; an operator must change it.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// True when the same call may succeed later without any change by an operator.
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Query { retryable, .. } => *retryable,
            StoreError::Config(_) => false,
        }
    }

    /// A [`StoreError::Query`] from a driver error, classified by [`Transient`].
    pub(crate) fn query(what: &str, e: impl Transient) -> Self {
        StoreError::Query {
            what: what.to_string(),
            retryable: e.transient(),
            detail: e.to_string(),
        }
    }
}

/// Driver errors that may or may not go away by themselves.
pub(crate) trait Transient: Display {
    fn transient(&self) -> bool;
}

impl Transient for RequestAttemptError {
    fn transient(&self) -> bool {
        match self {
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::TruncateError
                    | DbError::ServerError
                    | DbError::RateLimitReached { .. }
            ),
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_) => false,
            _ => true,
        }
    }
}

impl Transient for PrepareError {
    fn transient(&self) -> bool {
        match self {
            PrepareError::AllAttemptsFailed { first_attempt } => first_attempt.transient(),
            PrepareError::PreparedStatementIdsMismatch => false,
            _ => true,
        }
    }
}

impl Transient for ExecutionError {
    fn transient(&self) -> bool {
        match self {
            ExecutionError::BadQuery(_) => false,
            ExecutionError::PrepareError(e) => e.transient(),
            ExecutionError::LastAttemptError(e) => e.transient(),
            _ => true,
        }
    }
}

impl Transient for RequestError {
    fn transient(&self) -> bool {
        match self {
            RequestError::LastAttemptError(e) => e.transient(),
            _ => true,
        }
    }
}

impl Transient for NextPageError {
    fn transient(&self) -> bool {
        match self {
            NextPageError::RequestFailure(e) => e.transient(),
            NextPageError::PartitionKeyError(_) | NextPageError::TypeCheckError(_) => false,
            _ => true,
        }
    }
}

impl Transient for PagerExecutionError {
    fn transient(&self) -> bool {
        match self {
            PagerExecutionError::PrepareError(e) => e.transient(),
            PagerExecutionError::NextPageError(e) => e.transient(),
            PagerExecutionError::SerializationError(_) => false,
            _ => true,
        }
    }
}

impl Transient for NextRowError {
    fn transient(&self) -> bool {
        match self {
            NextRowError::NextPageError(e) => e.transient(),
            _ => false,
        }
    }
}

impl Transient for SchemaAgreementError {
    fn transient(&self) -> bool {
        true
    }
}

/// A result that does not have the expected shape: a schema or code bug.
macro_rules! permanent {
    ($($t:ty),*) => {$(
        impl Transient for $t {
            fn transient(&self) -> bool {
                false
            }
        }
    )*};
}
permanent!(
    IntoRowsResultError,
    RowsError,
    DeserializationError,
    TypeCheckError
);
