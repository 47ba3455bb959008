//! Errors of the agents: one sentence each, the cause chained as `source`.

use livemig_compact::CompactError;
use livemig_memory::MemoryError;
use livemig_qmp::QmpError;
use livemig_track::TrackError;
use livemig_wire::WireError;
use thiserror::Error;

/// Why a migration did not complete.
#[derive(Debug, Error)]
pub enum AgentError {
    /// A QMP command or connection failed.
    #[error("{what}")]
    Qmp {
        /// What livemig was doing.
        what: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
    /// Guest memory could not be mapped or accessed.
    #[error("guest memory is not usable")]
    Memory(#[source] MemoryError),
    /// Dirty tracking failed.
    #[error("dirty-page tracking failed")]
    Track(#[source] TrackError),
    /// The connection to the peer failed.
    #[error("the migration connection failed")]
    Wire(#[source] WireError),
    /// One of the migration's data connections (`send --connections`) failed: the migration
    /// fails as when its only connection does.
    #[error("data connection {index} of {of} failed")]
    DataConnection {
        /// Its number (the first connection is 0).
        index: u32,
        /// Connections of the migration.
        of: u32,
        /// Why.
        #[source]
        source: Box<AgentError>,
    },
    /// Bad page data from the peer.
    #[error("the peer sent invalid page data")]
    Compact(#[source] CompactError),
    /// A thread of livemig's own could not start or failed (a bug, or the host out of threads).
    #[error("internal error: {0}")]
    Internal(String),
    /// Could not connect or listen.
    #[error("{what}")]
    Network {
        /// What was attempted.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer gave up and said why.
    #[error("the {peer} aborted the migration: {reason}")]
    PeerAborted {
        /// "destination" or "source".
        peer: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The two VMs cannot be migrated between (sizes, versions, states).
    #[error("{0}")]
    Incompatible(String),
    /// The memories differ at switchover.
    #[error("memory verification failed: source digest {source_digest}, destination digest {destination_digest}")]
    VerifyMismatch {
        /// Source digest.
        source_digest: String,
        /// Destination digest.
        destination_digest: String,
    },
    /// The controller gave up.
    #[error("migration did not converge: {0}")]
    NotConverged(String),
    /// The TLS handshake failed (wrong certificate, key or PSK, or not a livemig peer).
    #[error("{what}")]
    Tls {
        /// What failed.
        what: String,
        /// The TLS error (boxed: it is large).
        #[source]
        source: Box<livemig_tls::TlsError>,
    },
    /// The soft-dirty tracker refused to start or failed.
    #[error("the soft-dirty tracker cannot be used")]
    SoftDirty(#[source] livemig_track::softdirty::SoftDirtyError),
    /// A disk image or memory snapshot could not be used.
    #[error("{0}")]
    Holdings(String),
    /// Throttling the source VM failed.
    #[error("throttling the source VM failed: {0}")]
    Throttle(String),
    /// QEMU's device-state migration failed.
    #[error("QEMU's device-state migration failed: {0}")]
    DeviceState(String),
    /// Nothing arrived in time.
    #[error("timed out after {secs:.0} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: f64,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: expected {expected}, received {got}")]
    Protocol {
        /// Expected message.
        expected: String,
        /// What came.
        got: String,
    },
    /// The operator cancelled.
    #[error("cancelled by the operator")]
    Cancelled,
    /// The migration failed and putting the source VM back failed too.
    #[error("{0}")]
    SourceNotRestored(String),
    /// The destination was told to resume but did not confirm.
    #[error("the destination was told to resume but did not confirm ({0}); the source stays paused: check the destination before resuming either VM")]
    Unconfirmed(String),
    /// Someone resumed the source VM (another QMP client's `cont`) after `send` paused it for
    /// the switchover: what it wrote since is not in the final pass.
    #[error("the source VM was resumed during the switchover, after livemig paused it (a `cont` from another QMP client or the management layer?): what it wrote since would be missing on the destination")]
    SourceResumedDuringSwitchover,
    /// Receiver: the commit's `cont` failed and the destination VM's real state could not be
    /// learnt: it may run. The sender is told nothing (no `abort`, which would resume the source).
    #[error("the destination VM's state is unknown after the commit ({0}): it may run; the source stays paused: check the destination before resuming either VM")]
    DestinationStateUnknown(String),
}

impl AgentError {
    /// Shorthand for QMP errors.
    pub fn qmp(what: impl Into<String>) -> impl FnOnce(QmpError) -> AgentError {
        let what = what.into();
        move |source| AgentError::Qmp { what, source }
    }

    /// The error and its causes on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

impl From<WireError> for AgentError {
    fn from(e: WireError) -> Self {
        AgentError::Wire(e)
    }
}

impl From<CompactError> for AgentError {
    fn from(e: CompactError) -> Self {
        AgentError::Compact(e)
    }
}

impl From<MemoryError> for AgentError {
    fn from(e: MemoryError) -> Self {
        AgentError::Memory(e)
    }
}

impl From<TrackError> for AgentError {
    fn from(e: TrackError) -> Self {
        AgentError::Track(e)
    }
}
