//! Errors of the proxy's top level: what can stop `run` from starting or finishing.

/// Why [`crate::run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `Config::control_plane` is not a URL the discovery client can dial.
    #[error("invalid control plane address `{address}`: {source}")]
    InvalidControlPlane {
        address: String,
        /// The transport's reason, boxed so no tonic type leaks past `discovery`.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `Config::namespaces` or `Config::selector` cannot be reported to the
    /// control plane as given.
    #[error("invalid subset: {0}")]
    InvalidSubset(#[from] crate::SubsetError),
    /// A serving task panicked or was cancelled before shutdown finished.
    #[error("a proxy task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// `Config::access_log` cannot be written to.
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::OpenError),
    /// `Config::data_dir` does not exist and cannot be made.
    #[error("cannot make the data directory {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
