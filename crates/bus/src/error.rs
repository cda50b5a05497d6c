pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus configuration: {0}")]
    Config(String),
    #[error("connecting to nats: {0}")]
    Connect(String),
    /// The server answered and refused us (a login or certificate it rejects, or one we do not
    /// trust): no retry mends it.
    #[error("nats refused the connection: {0}")]
    Refused(String),
    #[error("provisioning jetstream: {0}")]
    Provision(String),
    /// A stream or consumer this cluster needs is not on the server (deleted by hand, or the
    /// server lost its state): run [`Bus::provision`](crate::Bus::provision) again, then retry.
    #[error("missing on the server: {0}")]
    Missing(String),
    #[error("publishing: {0}")]
    Publish(String),
    #[error("subscribing: {0}")]
    Subscribe(String),
    /// Settling a delivered message failed: it is delivered again after the ack wait.
    #[error("settling a delivered message: {0}")]
    Ack(String),
}

impl Error {
    /// Would the same call likely succeed if tried again later? (For [`Error::Missing`]: once
    /// provisioned again.)
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connect(_)
                | Error::Publish(_)
                | Error::Subscribe(_)
                | Error::Missing(_)
                | Error::Ack(_)
        )
    }

    /// Is a stream or consumer gone, so that provisioning again is what fixes it?
    pub fn needs_provisioning(&self) -> bool {
        matches!(self, Error::Missing(_))
    }
}
